"""Training checkpoints: exact round trip of weights, optimizer and RNG; atomic pointer; rotation."""

from __future__ import annotations

import random

import numpy as np
import torch

from common.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    return model, opt


def _step(model, opt):
    loss = model(torch.randn(5, 4)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_round_trip_resumes_identically(tmp_path):
    model, opt = _model_and_opt()
    _step(model, opt)
    random.seed(3)
    np.random.seed(4)
    save_checkpoint(tmp_path, 1, model.state_dict(), opt, {"epoch": 0, "batches_done": 1})
    # Reference: continue without interruption.
    _step(model, opt)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ref_py, ref_np = random.random(), np.random.rand()

    model2, opt2 = _model_and_opt()
    ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.name == "step_00000001"
    state_dict, state = load_checkpoint(ck, opt2)
    model2.load_state_dict(state_dict)
    assert state["epoch"] == 0 and state["batches_done"] == 1 and state["step"] == 1
    _step(model2, opt2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert random.random() == ref_py and np.random.rand() == ref_np


def test_rotation_and_torn_write_recovery(tmp_path):
    model, opt = _model_and_opt()
    for s in range(1, 5):
        save_checkpoint(tmp_path, s, model.state_dict(), opt, {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    # A kill between the directory rename and the pointer update: the pointer is stale.
    (tmp_path / "latest").write_text("step_00000002\n")
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    # A kill mid-write leaves a hidden temp dir and a step dir without state.json: both ignored.
    (tmp_path / ".step_00000005.tmp").mkdir()
    (tmp_path / "step_00000006").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    save_checkpoint(tmp_path, 7, model.state_dict(), opt, {}, keep=2)
    assert not (tmp_path / ".step_00000005.tmp").exists() and not (tmp_path / "step_00000006").exists()
    assert latest_checkpoint(tmp_path).name == "step_00000007"
