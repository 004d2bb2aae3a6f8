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
}


@pytest.fixture(scope="module")
def tiny_ab(tmp_path_factory):
    top = tmp_path_factory.mktemp("ab")
    assert main(["ab", "--config", "tiny", "--run-dir", str(top)]) == 0
    return top


def test_ab_runs_every_stage_of_both_arms(tiny_ab):
    for arm in ("clip", "ito"):
        rd = RunDir(tiny_ab / "arms" / arm)
        for stage, keys in STAGE_OUTPUTS.items():
            entry = rd.stage(stage)
            assert entry["status"] == "done", (arm, stage)
            assert keys <= set(entry["outputs"]), (arm, stage, entry["outputs"])
            for key in keys:
                assert rd.output(stage, key).exists(), (arm, stage, key)
        saved = (rd.path / "config.yaml").read_text()
        assert f"method: {arm}" in saved
    top = RunDir(tiny_ab)
    assert top.stage("report")["status"] == "done"
    assert top.output("report", "markdown").read_text().startswith("# A/B report")


def test_report_numbers_trace_to_lmms_eval_outputs(tiny_ab):
    report = json.loads(RunDir(tiny_ab).output("report", "json").read_text())
    checked = 0
    for arm in ("clip", "ito"):
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
                    "stage2_finetune": "ran", "eval": "ran"}

    # A stage left `running` (killed) is resumed, and only it and what follows it run.
    manifest = json.loads(rd.manifest_path.read_text())
    manifest["stages"]["eval"]["status"] = "running"
    rd.manifest_path.write_text(json.dumps(manifest))
    done = chain.run_chain(changed, rd, shared_cache=tiny_ab / "cache")
    assert done["eval"] == "ran" and done["stage2_finetune"] == "skipped"


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
    assert main(["ab", "--config", "tiny", "--run-dir", str(tmp_path), f"ab.arms={spec}"]) == 0
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
