"""Exact DeepSpeed resume (ZeRO-2 and ZeRO-3, CPU, one process): SIGKILL inside a finetune step, resume, and
compare the final weights, fp32 master weights and Adam moments with an uninterrupted run; the checkpoint holds
them in safetensors only. GPU RNG states go into every checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from test_stage2_train import BASE, ROOT, parts, pretrained, world  # noqa: F401 (fixtures)

from common.checkpoint import latest_checkpoint
from common.io import load_safetensors
from stage2_llava import ds_state

STEPS, KILL_AT = 6, 4


def _finetune(world, out, stage: str, kill_at: int | None = None) -> subprocess.CompletedProcess:  # noqa: F811
    over = [*BASE, *parts(world), f"stage2.finetune.deepspeed={stage}",
            f"stage2.finetune.max_steps={STEPS}", "stage2.finetune.checkpoint_every_steps=1", "stage2.keep_checkpoints=8"]
    code = ("import sys, torch; torch.set_num_threads(1)\n"
            f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
            "from test_stage2_train import run_phase, load_config\n"
            f"cfg = load_config('tiny', {over!r}).stage2\n"
            f"run_phase('finetune', cfg, init_dir_or_sources={str(world['root'] / 'pre')!r}, data_json={world['fin']!r}, "
            f"image_folder={world['folder']!r}, out_dir={str(out)!r}, num_workers=0)\n")
    env = {k: v for k, v in os.environ.items() if k != "ITO_MLLM_KILL_AT"}
    if kill_at is not None:
        env["ITO_MLLM_KILL_AT"] = f"-:train.step:{kill_at}"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_kill_and_resume_restores_weights_masters_and_moments(world, pretrained, tmp_path, stage):  # noqa: F811
    ref = _finetune(world, tmp_path / "ref", stage)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _finetune(world, tmp_path / "run", stage, kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == f"step_{KILL_AT - 1:08d}"
    resumed = _finetune(world, tmp_path / "run", stage)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == KILL_AT - 1 and summary["steps"] == STEPS and summary["deepspeed"] == stage

    a = load_safetensors(tmp_path / "ref" / "hf" / "model.safetensors")
    b = load_safetensors(tmp_path / "run" / "hf" / "model.safetensors")
    assert _max_diff(a, b) <= 1e-6
    print(f"deepspeed {stage} resume: max |weight diff| {_max_diff(a, b):.3g}")
    for step in (KILL_AT, STEPS):  # the first step after the resume and the last
        name = f"step_{step:08d}"
        sa = load_safetensors(tmp_path / "ref" / "checkpoints" / name / ds_state.FILE)
        sb = load_safetensors(tmp_path / "run" / "checkpoints" / name / ds_state.FILE)
        moments = {k: v for k, v in sa.items() if k.endswith(("::exp_avg", "::exp_avg_sq"))}
        assert moments and any(v.abs().max() > 0 for v in moments.values())
        assert _max_diff(sa, sb) <= 1e-6, (step, _max_diff(sa, sb))
        print(f"  step {step}: {len(sa)} fp32/moment tensors, max |diff| {_max_diff(sa, sb):.3g}")
        meta = json.loads((tmp_path / "run" / "checkpoints" / name / "state.json").read_text())["deepspeed"]
        assert meta["adam_step"] == step
    files = {p.name for p in (tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "state.json", ds_state.FILE}  # no pickles


def test_checkpoint_keeps_and_restores_gpu_rng_states(tmp_path, monkeypatch):
    """With CUDA (patched in), every visible GPU's generator state is saved and set back."""
    from common import checkpoint as ck

    states = {0: torch.arange(8, dtype=torch.uint8), 1: torch.arange(8, 16, dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i: states[i].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, i: restored.__setitem__(i, t.clone()))
    path = ck.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, None, {})
    saved = load_safetensors(path / "optimizer.safetensors")
    assert torch.equal(saved["rng.cuda.0"], states[0]) and torch.equal(saved["rng.cuda.1"], states[1])
    ck.load_checkpoint(path)
    assert restored.keys() == {0, 1} and torch.equal(restored[1], states[1])
