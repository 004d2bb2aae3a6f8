"""Disk guard: estimates match what the stages write; a short disk refuses to start and loses nothing."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest

from common import disk
from common.disk import DiskSpaceError, require_free, tree_bytes
from pipeline.cli import main
from stage2_llava.train import TOKENIZER_FILES_BYTES

Usage = namedtuple("Usage", "total used free")


def _short_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: Usage(10 * free + 1, 0, free))


def test_require_free_refuses_counts_present_bytes_and_can_be_skipped(tmp_path, monkeypatch):
    _short_disk(monkeypatch, 1000)
    need = {"checkpoints": 3000, "final": 500}
    with pytest.raises(DiskSpaceError, match=r"ckpt: run needs about 3.4 KB more disk \(checkpoints 2.9 KB, final 500 B; "
                                             r"0 B already written\), 1000 B free"):
        require_free(tmp_path / "ckpt", "run", need)
    est = require_free(tmp_path / "ckpt", "run", need, present=2600)  # a resume already holds most of it
    assert est["remaining_bytes"] == 900 and est["free_bytes"] == 1000
    monkeypatch.setenv("ITO_MLLM_SKIP_DISK_CHECK", "1")
    assert require_free(tmp_path, "run", need)["remaining_bytes"] == 3500


def test_tree_bytes_counts_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1" * 10)
    (tmp_path / "y").write_bytes(b"1" * 5)
    assert tree_bytes(tmp_path) == 15 and tree_bytes(tmp_path / "y") == 5 and tree_bytes(tmp_path / "nope") == 0


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("step_*"))


def test_estimates_match_written_bytes_and_a_short_disk_refuses(tmp_path, monkeypatch, capsys):
    rd = tmp_path / "run"
    over = ["stage1.keep_checkpoints=1", "stage2.keep_checkpoints=1"]
    assert main(["run", "--config", "tiny", "--run-dir", str(rd), "eval.tasks=demo_pope_random", "eval.limit=4", *over]) == 0

    # keep_checkpoints=1 in both stages: one complete checkpoint left after rotation
    assert [len(_step_dirs(rd / d)) for d in ("stage1/train/checkpoints", "stage2_pretrain/checkpoints",
                                              "stage2_finetune/checkpoints")] == [1, 1, 1]
    # Stage 1: one checkpoint per (keep+1) share of the estimate, the final weights a third of the rest.
    s1 = json.loads((rd / "stage1/train/train_summary.json").read_text())["disk_estimate"]["parts"]
    ckpt = tree_bytes(_step_dirs(rd / "stage1/train/checkpoints")[-1])
    assert ckpt == pytest.approx(s1["2 checkpoints"] / 2, rel=0.05)
    final = tree_bytes(rd / "stage1/train/final/model.safetensors")
    assert final == pytest.approx(s1["final weights + open_clip/HF exports"] / 3, rel=0.05)
    exports = tree_bytes(rd / "stage1/open_clip") + tree_bytes(rd / "stage1/hf_clip")
    assert exports <= 1.05 * 2 * final

    # Stage 2 pretrain: projector checkpoints, the HF directory, the feature cache (an upper bound).
    summary = json.loads((rd / "stage2_pretrain/train_summary.json").read_text())
    s2 = summary["disk_estimate"]["parts"]
    ckpt = tree_bytes(_step_dirs(rd / "stage2_pretrain/checkpoints")[-1])
    assert ckpt == pytest.approx(s2["2 checkpoints"] / 2, rel=0.05)
    hf = tree_bytes(rd / "stage2_pretrain/hf")
    assert hf <= s2["HF model directory"] <= hf + TOKENIZER_FILES_BYTES
    # the pretrain phase's own cache: finetune pads to a square (image_aspect_ratio), so its features are another key
    cache = tree_bytes(summary["feature_cache"]["dir"])
    assert 0.5 * s2["feature cache (upper bound)"] <= cache <= 1.1 * s2["feature cache (upper bound)"]

    # A short disk: a changed stage-2 config reruns stage 2, which refuses before writing anything.
    before = {p: p.read_bytes() for p in (rd / "stage1").rglob("*") if p.is_file()}
    _short_disk(monkeypatch, 4096)
    capsys.readouterr()
    assert main(["stage2", "pretrain", "--run-dir", str(rd), "stage2.pretrain.lr=2e-3", *over]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ito-mllm:")]
    assert len(err) == 1 and "stage 2 pretrain needs about" in err[0] and "4.0 KB free" in err[0], err
    assert {p: p.read_bytes() for p in (rd / "stage1").rglob("*") if p.is_file()} == before
    manifest = json.loads((rd / "manifest.json").read_text())["stages"]
    assert manifest["stage1"]["status"] == "done" and manifest["stage2_pretrain"]["status"] == "failed"
    assert not _step_dirs(rd / "stage2_pretrain/checkpoints")
