"""SIGKILL at every failpoint of a checkpoint or directory write leaves the previous version usable.

Each case runs a child process that writes checkpoint 1 (or directory version 1), then is killed by
common.faults at a named spot of the second write; the parent checks what a resume would see. The
whole-chain version with random kills is scripts/fault_inject.py (and test_fault_inject_script).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, sweep_partial
from common.io import staged_dir, sweep_partial_writes

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys, torch
    from common.checkpoint import save_checkpoint
    from common.io import staged_dir
    out = sys.argv[1]
    if sys.argv[2] == "ckpt":
        for step in (1, 2, 3):
            save_checkpoint(out, step, {"w": torch.full((4,), float(step))}, None, {"note": step}, keep=2)
    else:
        for version in ("1", "2"):
            with staged_dir(out) as tmp:
                (tmp / "v.txt").write_text(version)
    print("finished")
""")


def _child(out: Path, kind: str, kill_at: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ITO_MLLM_KILL_AT": kill_at, "ITO_MLLM_FAULT_STEP": "test",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", CHILD, str(out), kind], env=env, capture_output=True, text=True,
                          timeout=120)


# failpoint hit -> the newest checkpoint a resume must find (3 writes; rotation starts at the third)
# (a complete step dir whose `latest` pointer was not yet updated is not chosen: the resume redoes its steps)
CKPT_CASES = {
    "ckpt.partial:2": 1, "ckpt.partial:3": 2, "ckpt.before_rename:2": 1, "ckpt.before_latest:2": 1,
    "ckpt.rotate:1": 3, "file.before_rename:4": 1, "file.before_rename:5": 1,
}


@pytest.mark.parametrize("point", sorted(CKPT_CASES))
def test_kill_inside_a_checkpoint_write_keeps_a_complete_checkpoint(tmp_path, point):
    proc = _child(tmp_path, "ckpt", f"test:{point}")
    assert proc.returncode == -signal.SIGKILL and "finished" not in proc.stdout, proc.stderr
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == f"step_{CKPT_CASES[point]:08d}"
    tensors, state = load_checkpoint(latest, restore_rng=False)
    assert state["note"] == CKPT_CASES[point] and torch.equal(tensors["w"], torch.full((4,), float(state["note"])))
    sweep_partial(tmp_path)
    assert not list(tmp_path.glob(".*")) and all((p / "state.json").is_file() for p in tmp_path.glob("step_*"))
    # the next write after a resume rotates normally
    save_checkpoint(tmp_path, 9, {"w": torch.zeros(4)}, None, {"note": 9}, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_00000009" and len(list(tmp_path.glob("step_*"))) == 2


@pytest.mark.parametrize("point,expect", [("dir.before_rename:2", "1"), ("dir.mid_swap:1", None)])
def test_kill_inside_a_directory_swap_leaves_old_or_nothing(tmp_path, point, expect):
    out = tmp_path / "export"
    proc = _child(out, "dir", f"test:{point}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # a reader sees version 1 or no directory (the step is then redone), never a half-written one
    assert (out / "v.txt").read_text() == expect if expect else not out.exists()
    leftovers = sweep_partial_writes(tmp_path)
    assert leftovers and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with staged_dir(out) as tmp:
        (tmp / "v.txt").write_text("3")
    assert (out / "v.txt").read_text() == "3"


def test_failpoints_are_inert_without_the_environment(tmp_path):
    proc = _child(tmp_path, "ckpt", "")
    assert proc.returncode == 0 and "finished" in proc.stdout
    assert latest_checkpoint(tmp_path).name == "step_00000003"


@pytest.mark.slow
def test_fault_inject_script_loses_nothing(tmp_path):
    spec = importlib.util.spec_from_file_location("fault_inject", ROOT / "scripts" / "fault_inject.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--out", str(tmp_path / "report.json"), "--kills", "3", "--kills-per-trial", "2",
                          "--max-trials", "6", "--workdir", str(tmp_path / "work"), "--seed", "1"])
    assert report["kills"] >= 3, report
    assert report["unusable"] == 0 and report["differ"] == 0 and report["leftover_temp_files"] == 0, report
    assert json.loads((tmp_path / "report.json").read_text())["kills"] == report["kills"]
