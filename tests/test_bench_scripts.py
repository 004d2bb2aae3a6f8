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


@pytest.mark.slow
def test_bench_runs_every_config_tiny(tmp_path):
    """~70 s on 2 loaded cores: four subprocesses, each importing torch and open_clip."""
    bench = _bench()
    out = tmp_path / "bench.json"
    report = bench.main(["--out", str(out), "--model", "ito-tiny", "--batch", "8", "--steps", "2", "--warmup", "1",
                         "--threads", "1", "--grad-checkpointing", "off", "--matmul-size", "256"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["configs"]) == {"clip/gc_off", "ito/gc_off", "ito_sub2/gc_off", "open_clip_train/gc_off"}
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
    r = report["ratios"]["gc_off"]
    assert r["ito_over_clip_flops"] == pytest.approx(flops["ito"] / flops["clip"])
    assert {t["pass"] for t in report["targets"].values()} <= {True, False}
    assert report["machine"]["matmul_gflops"] > 0
