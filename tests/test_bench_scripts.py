"""scripts/bench_stage1.py: the target arithmetic, and one tiny end-to-end run of every configuration."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_stage1.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_stage1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg(step, flops, base=100.0, peak=200.0):
    return {"step_time_s": step, "end_to_end_step_time_s": step * 1.2, "samples_per_s": 64 / step,
            "end_to_end_samples_per_s": 64 / (step * 1.2), "flops_per_step": flops,
            "peak_rss_mb": peak, "baseline_rss_mb": base, "peak_minus_baseline_mb": peak - base}


def test_summarize_ratios_and_targets():
    bench = _bench()
    configs = {
        "clip/gc_on": _cfg(1.0, 10.0, peak=300.0),  # 200 MB training memory
        "ito/gc_on": _cfg(2.2, 20.0, peak=320.0),  # time 2.2x for 2x FLOPs: 1.1 > 1.05; memory 220/200
        "ito_sub2/gc_on": _cfg(3.0, 30.0, peak=400.0),  # 1.0x the FLOP ratio; memory 1.5x
        "open_clip_train/gc_on": _cfg(1.25, 10.0),
    }
    ratios, targets = bench.summarize(configs)
    r = ratios["gc_on"]
    assert r["clip_vs_open_clip_train_throughput_compute"] == pytest.approx(1.25)
    assert r["ito_over_clip_flops"] == pytest.approx(2.0)
    assert r["ito_time_ratio_over_flop_ratio"] == pytest.approx(1.1)
    assert r["ito_over_clip_peak_memory_training"] == pytest.approx(1.1)
    assert targets["clip_throughput_ge_open_clip_train_compute/gc_on"]["pass"] is True
    assert targets["ito_time_le_1.05x_flop_ratio/gc_on"]["pass"] is False
    assert targets["ito_sub2_time_le_1.05x_flop_ratio/gc_on"]["pass"] is True
    assert targets["ito_peak_memory_le_1.15x_clip/gc_on"]["pass"] is True
    assert targets["ito_sub2_peak_memory_le_1.15x_clip/gc_on"]["pass"] is False
    del configs["open_clip_train/gc_on"]  # a missing (or failed) config: n/a, not a crash
    _, targets = bench.summarize(configs)
    assert targets["clip_throughput_ge_open_clip_train_compute/gc_on"]["pass"] is None


def test_overhead_table_puts_the_papers_ratios_beside_ours(capsys):
    bench = _bench()
    configs = {"clip/gc_off": _cfg(1.0, 10.0, peak=300.0), "slip/gc_off": _cfg(1.5, 25.0, peak=350.0),
               "flair/gc_off": _cfg(1.2, 12.0, peak=260.0), "siglip/gc_off": _cfg(1.0, 10.0, peak=300.0)}
    for c in configs.values():
        c["tensor_peak_mb"] = c["peak_rss_mb"] / 2
    ratios, _ = bench.summarize(configs)
    report = {"configs": configs, "ratios": ratios}
    rows = {r["method"]: r for r in bench.overhead_rows(report)}
    assert set(rows) == {"slip", "flair", "siglip"}  # ito/ito_sub2 not run: no row
    assert rows["slip"]["time"] == pytest.approx(1.5) and rows["slip"]["peak_memory_training"] == pytest.approx(1.25)
    assert (rows["slip"]["paper_time"], rows["slip"]["paper_memory"]) == (1.4, 1.27)
    assert (rows["siglip"]["paper_time"], rows["siglip"]["paper_memory"]) == (1.0, 1.07)
    assert rows["flair"]["paper_time"] is None and rows["flair"]["flops"] == pytest.approx(1.2)
    bench.print_overhead(report)
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert "1.50x" in lines["slip"] and lines["slip"].rstrip().endswith("1.40x     1.27x")
    assert lines["flair"].rstrip().endswith("none      none")
    assert bench.PAPER_OVERHEAD["ito"] == (1.4, 1.15)


@pytest.mark.slow
def test_bench_runs_every_config_tiny(tmp_path):
    """~2 min on 2 loaded cores: seven subprocesses, each importing torch and open_clip."""
    bench = _bench()
    out = tmp_path / "bench.json"
    report = bench.main(["--out", str(out), "--model", "ito-tiny", "--batch", "8", "--steps", "2", "--warmup", "1",
                         "--threads", "1", "--grad-checkpointing", "off", "--matmul-size", "256"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["configs"]) == {f"{m}/gc_off" for m in ("clip", "ito", "ito_sub2", "siglip", "slip", "flair",
                                                                  "open_clip_train")}
    for name, c in report["configs"].items():
        assert "error" not in c, (name, c.get("stderr_tail"))
        assert len(c["compute_step_times_s"]) == 2 and len(c["end_to_end_step_times_s"]) == 2
        assert c["samples_per_s"] == pytest.approx(8 / c["step_time_s"])
        assert 0 < c["mfu"] < 1 and c["peak_rss_mb"] >= c["baseline_rss_mb"] > 0
        assert c["torch_threads"] == 1
        assert c["tensor_peak_mb"] > 0
    peaks = {k.split("/")[0]: c["tensor_peak_mb"] for k, c in report["configs"].items()}
    assert peaks["clip"] < peaks["ito"]  # a second image view and the fusion head's activations
    flops = {k.split("/")[0]: c["flops_per_step"] for k, c in report["configs"].items()}
    assert flops["clip"] == flops["open_clip_train"]  # same model, batch and loss
    assert flops["clip"] < flops["ito"] < flops["ito_sub2"]  # 2 image views + fusion; then 2 text views too
    assert report["configs"]["ito/gc_off"]["input_shapes"]["images"] == [8, 2, 3, 64, 64]
    assert report["configs"]["ito_sub2/gc_off"]["input_shapes"]["texts"][:2] == [8, 2]
    assert report["configs"]["slip/gc_off"]["input_shapes"]["images"][:2] == [8, 3]  # + 2 SSL views
    assert report["configs"]["flair/gc_off"]["input_shapes"]["texts"][:2] == [8, 8]  # K = 8 sub-captions
    assert flops["clip"] < flops["slip"] and flops["clip"] < flops["flair"]
    assert {r["method"] for r in report["overhead_vs_clip"]} == {"ito", "ito_sub2", "siglip", "slip", "flair"}
    r = report["ratios"]["gc_off"]
    assert r["ito_over_clip_flops"] == pytest.approx(flops["ito"] / flops["clip"])
    assert {t["pass"] for t in report["targets"].values()} <= {True, False}
    assert report["machine"]["matmul_gflops"] > 0
