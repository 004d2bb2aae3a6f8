"""The `ito-mllm` contract: help on every subcommand, one-line errors with exit 2, run-dir bookkeeping."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from common.io import InputError
from pipeline.cli import EXIT_CONFIG, EXIT_INPUT, main
from pipeline.rundir import RunDir

SUBCOMMANDS = [
    ["data", "demo"], ["stage1", "train"], ["stage1", "export"], ["stage1", "eval"],
    ["stage2", "pretrain"], ["stage2", "finetune"], ["eval"], ["run"], ["ab"], ["demo"],
    ["config", "show"], ["config", "keys"],
]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=lambda c: " ".join(c))
def test_help_on_every_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ito-mllm" in out and len(out.splitlines()) > 3
    if cmd[0] not in ("config",) or cmd[1] == "show":
        assert "--config" in out and "--run-dir" in out and "KEY=VALUE" in out


def test_unknown_key_is_one_line_exit_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "data", "demo", "--out", str(tmp_path / "d"), "nonsense.key=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == EXIT_CONFIG
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "nonsense.key" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()  # nothing written for a rejected config


def test_bad_values_exit_2(tmp_path, capsys):
    assert main(["config", "show", "stage1.epochs=zero"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage1.epochs" in err
    assert main(["config", "show", "--config", str(tmp_path / "nope.yaml")]) == EXIT_CONFIG


def test_config_saved_and_reused_from_run_dir(tmp_path, capsys):
    rd = tmp_path / "run"
    # Stage 2 without a stage-1 tower fails with one line naming what is missing, after saving the config.
    code = main(["stage2", "pretrain", "--config", "tiny", "--run-dir", str(rd), "stage1.epochs=3"])
    saved = yaml.safe_load((rd / "config.yaml").read_text())
    assert saved["stage1"]["epochs"] == 3 and saved["preset"] == "tiny"
    assert code == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert "no finished output 'hf_clip_dir'" in err and "\n" not in err
    # Without --config the run dir's config is the base; overrides still apply on top.
    assert main(["config", "show", "--run-dir", str(rd), "stage1.lr=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stage1"]["epochs"] == 3 and shown["stage1"]["lr"] == 0.5


def test_manifest_contract(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    rd.mark_running("stage1", "abc", {"train_data": "x"})
    assert rd.stage("stage1")["status"] == "running"
    assert rd.output("stage1", "checkpoint_dir") is None
    (rd.path / "stage1" / "ckpt").mkdir(parents=True)
    rd.mark_done("stage1", {"checkpoint_dir": rd.path / "stage1" / "ckpt"})
    m = json.loads(rd.manifest_path.read_text())
    assert m["stages"]["stage1"]["outputs"] == {"checkpoint_dir": "stage1/ckpt"}
    assert m["stages"]["stage1"]["config_hash"] == "abc"
    assert rd.output("stage1", "checkpoint_dir") == rd.path / "stage1" / "ckpt"
    with pytest.raises(InputError, match="stage 'eval' has no finished output 'results_json'"):
        rd.require_output("eval", "results_json")
    rd.mark_failed("stage1", "boom")
    assert rd.stage("stage1")["status"] == "failed" and rd.output("stage1", "checkpoint_dir") is None
    with pytest.raises(ValueError):
        rd.mark_running("not_a_stage", "x")


def test_corrupt_manifest_is_one_line_input_error(tmp_path):
    rd = RunDir(tmp_path).create()
    rd.manifest_path.write_text("{not json")
    with pytest.raises(InputError) as e:
        rd.manifest()
    assert "manifest.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["yaml", "unknown", "type", "range"])
def test_bad_config_exits_2_in_one_line_and_keeps_the_run_dir(tmp_path, capsys, bad):
    """A rejected config (bad YAML, unknown key, wrong type, out of range) changes nothing in an existing run dir."""
    rd = tmp_path / "run"
    assert main(["stage2", "pretrain", "--config", "tiny", "--run-dir", str(rd), "stage1.epochs=3"]) == EXIT_INPUT
    before = {str(p.relative_to(rd)): p.read_bytes() for p in rd.rglob("*") if p.is_file()}
    assert "config.yaml" in before
    capsys.readouterr()
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage1: [unclosed\n")
    args = {"yaml": ["--config", str(broken)], "unknown": ["stage1.epochz=4"], "type": ["stage1.epochs=many"],
            "range": ["stage1.batch_size=0"]}[bad]
    assert main(["stage2", "pretrain", "--run-dir", str(rd), *args]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ito-mllm: config error: ")
    assert {"yaml": f"{broken}: not valid YAML", "unknown": "stage1.epochz: unknown key",
            "type": "stage1.epochs: expected an integer", "range": "stage1.batch_size: must be >= 1"}[bad] in err
    assert {str(p.relative_to(rd)): p.read_bytes() for p in rd.rglob("*") if p.is_file()} == before


def test_stage1_commands_run_the_parts_of_the_stage1_step_through_the_runner(tmp_path, capsys):
    """`stage1 train`, `export`, `eval` are the stage1 step's parts: together they record what `run` records."""
    from pipeline import chain
    from pipeline.config import load_config

    rd = RunDir(tmp_path / "run")
    assert main(["stage1", "train", "--config", "tiny", "--run-dir", str(rd.path), "stage1.epochs=1"]) == 0
    entry = rd.stage("stage1")
    assert entry["status"] == "done" and set(entry["outputs"]) == {"checkpoint_dir", "train_log"}
    assert "train_seconds" in entry and rd.stage("data")["status"] == "done"  # the data it needed, as a step
    capsys.readouterr()
    assert main(["stage1", "eval", "--run-dir", str(rd.path)]) == EXIT_INPUT  # nothing exported yet
    assert "no finished output 'open_clip_dir'" in capsys.readouterr().err
    assert main(["stage1", "export", "--run-dir", str(rd.path)]) == 0
    assert main(["stage1", "eval", "--run-dir", str(rd.path)]) == 0
    entry = rd.stage("stage1")
    assert set(entry["outputs"]) == {"checkpoint_dir", "train_log", "open_clip_dir", "hf_clip_dir", "metrics_json",
                                     "umap_png"} and entry["status"] == "done"
    cfg = load_config(str(rd.config_path))
    assert entry["config_hash"] == chain.step_keys(cfg)["stage1"]
    assert chain.run_step(cfg, rd, "stage1") == "skipped"  # `run` finds the step done
    # a changed stage-1 config: `stage1 train` starts the step afresh (its directory wiped), as `run` would
    stale = rd.path / "stage1" / "open_clip"
    assert stale.is_dir()
    assert main(["stage1", "train", "--run-dir", str(rd.path), "stage1.epochs=0"]) == 0
    assert not stale.exists() and set(rd.stage("stage1")["outputs"]) == {"checkpoint_dir", "train_log"}
