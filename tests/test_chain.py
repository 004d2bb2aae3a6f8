"""The chain on the tiny preset: every stage for both A/B arms, then skip, invalidation and resume."""

from __future__ import annotations

import json

import pytest

from pipeline import chain
from pipeline.cli import main
from pipeline.config import arm_config, load_config
from pipeline.rundir import RunDir

STAGE_OUTPUTS = {
    "data": {"root"},
    "stage1": {"checkpoint_dir", "open_clip_dir", "hf_clip_dir", "metrics_json"},
    "stage2_pretrain": {"hf_dir"},
    "stage2_finetune": {"hf_dir"},
    "eval": {"results_json", "samples_dir"},
    "eval_blind": {"results_json", "samples_dir"},
}
ARMS = ("clip", "ito", "random")


@pytest.fixture(scope="module")
def tiny_ab(tmp_path_factory):
    top = tmp_path_factory.mktemp("ab")
    assert main(["ab", "--config", "tiny", "--run-dir", str(top)]) == 0
    return top


def test_ab_runs_every_stage_of_every_arm(tiny_ab):
    for arm in ARMS:
        rd = RunDir(tiny_ab / "arms" / arm)
        for stage, keys in STAGE_OUTPUTS.items():
            entry = rd.stage(stage)
            assert entry["status"] == "done", (arm, stage)
            assert keys <= set(entry["outputs"]), (arm, stage, entry["outputs"])
            for key in keys:
                assert rd.output(stage, key).exists(), (arm, stage, key)
        saved = load_config(str(rd.path / "config.yaml"))
        assert saved.stage1.method == {"random": "clip"}.get(arm, arm) and saved.stage1.augment == "ito"
    top = RunDir(tiny_ab)
    assert top.stage("report")["status"] == "done"
    assert top.output("report", "markdown").read_text().startswith("# A/B report")


def test_report_numbers_trace_to_lmms_eval_outputs(tiny_ab):
    report = json.loads(RunDir(tiny_ab).output("report", "json").read_text())
    checked = 0
    for arm in ARMS:
        results = json.loads(RunDir(tiny_ab / "arms" / arm).output("eval", "results_json").read_text())
        assert results["tasks"], "no task ran"
        for task, entry in results["tasks"].items():
            assert report["table"][arm][task] == entry["value_pct"], (arm, task)
            checked += 1
    assert checked >= 10


def test_rerun_skips_then_invalidates_downstream_then_resumes(tiny_ab):
    cfg = load_config(str(tiny_ab / "arms" / "clip" / "config.yaml"))
    rd = RunDir(tiny_ab / "arms" / "clip")
    assert set(chain.run_chain(cfg, rd, shared_cache=tiny_ab / "cache").values()) == {"skipped"}

    changed = load_config(str(tiny_ab / "arms" / "clip" / "config.yaml"), ["stage2.finetune.lr=0.002"])
    done = chain.run_chain(changed, rd, shared_cache=tiny_ab / "cache")
    assert done == {"data": "skipped", "stage1": "skipped", "stage2_pretrain": "skipped",
                    "stage2_finetune": "ran", "eval": "ran", "eval_blind": "ran"}
    # the blind floor is a step of its own: switching it off leaves the normal evaluation alone
    no_blind = load_config(str(tiny_ab / "arms" / "clip" / "config.yaml"), ["stage2.finetune.lr=0.002", "eval.blind=false"])
    assert chain.run_chain(no_blind, rd, shared_cache=tiny_ab / "cache") == {
        "data": "skipped", "stage1": "skipped", "stage2_pretrain": "skipped", "stage2_finetune": "skipped",
        "eval": "skipped"}

    # A stage left `running` (killed) is resumed, and only it and what follows it run.
    manifest = json.loads(rd.manifest_path.read_text())
    manifest["stages"]["eval"]["status"] = "running"
    rd.manifest_path.write_text(json.dumps(manifest))
    done = chain.run_chain(changed, rd, shared_cache=tiny_ab / "cache")
    assert done["eval"] == "ran" and done["stage2_finetune"] == "skipped"


def test_random_arm_is_the_untrained_tower(tiny_ab):
    """The control arm exports its initialised towers: no training step, and the clip arm's init differs only by training."""
    from safetensors.torch import load_file

    summaries = {a: json.loads((tiny_ab / "arms" / a / "stage1" / "train" / "train_summary.json").read_text())
                 for a in ("clip", "random")}
    assert summaries["random"]["steps"] == 0 and summaries["clip"]["steps"] > 0
    w = {a: load_file(str(tiny_ab / "arms" / a / "stage1" / "train" / "final" / "model.safetensors"))
         for a in ("clip", "random")}
    assert w["clip"].keys() == w["random"].keys()
    assert any(not (w["clip"][k] == w["random"][k]).all() for k in w["clip"])


def test_report_has_control_blind_and_verdict(tiny_ab):
    report = json.loads(RunDir(tiny_ab).output("report", "json").read_text())
    assert report["control"] == "random" and report["baseline"] == "clip"
    assert set(report["blind_table"]) == set(ARMS)
    for arm in ARMS:
        blind = json.loads(RunDir(tiny_ab / "arms" / arm).output("eval_blind", "results_json").read_text())
        assert blind["blind"] is True
        assert report["blind_table"][arm] == {t: e["value_pct"] for t, e in blind["tasks"].items()}
    compared = {arm for per_task in report["vs_control"].values() for arm in per_task}
    assert compared == {"clip", "ito"}
    assert {arm for per_task in report["vs_blind"].values() for arm in per_task} == set(ARMS)
    assert report["stage1_info"]["ito"]["augment"] == report["stage1_info"]["clip"]["augment"] == "ito"
    md = RunDir(tiny_ab).output("report", "markdown").read_text()
    assert md.index("## Verdict") < md.index("## Benchmarks")
    assert report["verdict"][0].startswith(("**Sensitive.**", "**Not sensitive.**"))
    assert "Every arm pretrained with the `ito` augmentation policy" in md


def test_arm_keys_differ_only_from_stage1_on():
    cfg = load_config("tiny")
    a, b = chain.step_keys(arm_config(cfg, "clip")), chain.step_keys(arm_config(cfg, "ito"))
    assert a["data"] == b["data"]
    assert all(a[s] != b[s] for s in ("stage1", "stage2_pretrain", "stage2_finetune", "eval"))


@pytest.mark.slow
def test_tiny_ab_with_the_papers_baselines(tmp_path):
    """clip, slip, flair and ito as A/B arms: each trains, exports and feeds stage 2 and eval."""
    arms = {"clip": "clip", "slip": "slip", "flair": "flair", "ito": "ito"}
    spec = "{" + ", ".join(f"{a}: {{stage1.method: {m}}}" for a, m in arms.items()) + "}"
    assert main(["ab", "--config", "tiny", "--run-dir", str(tmp_path), f"ab.arms={spec}", "ab.control="]) == 0
    report = json.loads(RunDir(tmp_path).output("report", "json").read_text())
    assert set(report["table"]) == set(arms)
    for arm, method in arms.items():
        rd = RunDir(tmp_path / "arms" / arm)
        assert all(rd.stage(s)["status"] == "done" for s in STAGE_OUTPUTS), arm
        assert f"method: {method}" in (rd.path / "config.yaml").read_text()
        log = [json.loads(x) for x in rd.output("stage1", "train_log").read_text().splitlines()]
        losses = {k for r in log for k in r if k.endswith("_loss")}
        assert losses == {"clip": {"contrastive_loss"}, "slip": {"contrastive_loss", "ssl_loss"},
                          "flair": {"tcs_loss", "mps_loss"}, "ito": {"contrastive_loss", "fusion_loss"}}[arm], arm
        assert json.loads(rd.output("stage1", "metrics_json").read_text()), arm
