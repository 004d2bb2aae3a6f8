"""scripts/gpu_smoke.py on a CPU-only machine: its help, its refusal without CUDA, its checks (a CPU fallback, a
wrong dtype, a missing NCCL or ZeRO-3 is named), its tiny-chain overrides, and the stages' device/precision
resolution with CUDA patched in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_smoke  # noqa: E402


def _rows(device="cuda:0", dtype="bfloat16", backend="nccl", n=2):
    return [{"step": "stage1 train", "device": device, "processes": n, "backend": backend, "dtype": "bf16"},
            {"step": "stage2 pretrain", "device": device, "processes": n, "backend": backend, "dtype": dtype,
             "deepspeed": "zero3"},
            {"step": "stage2 finetune", "device": device, "processes": n, "backend": backend, "dtype": dtype,
             "deepspeed": "zero3"},
            {"step": "eval", "device": "cuda", "processes": n, "backend": "accelerate", "dtype": "bf16",
             "model_args": "pretrained=/m,device=cuda:0,device_map=cuda:0,dtype=bfloat16"}]


def test_help_documents_the_script():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "--gpus" in out.stdout and "silent CPU fallback" in out.stdout


def test_without_cuda_it_stops_before_running_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main(["--out", str(tmp_path / "run")]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_checks_pass_on_a_gpu_run_and_name_every_fallback():
    assert gpu_smoke.problems(_rows(), 2) == []
    bad = gpu_smoke.problems(_rows(device="cpu", dtype="float32", backend="gloo"), 2)
    assert "stage1 train: ran on cpu, expected cuda (silent CPU fallback)" in bad
    assert "stage2 finetune: dtype float32, expected bf16" in bad
    assert "stage2 pretrain: collective backend gloo, expected nccl" in bad
    rows = _rows()
    rows[3]["model_args"] = "pretrained=/m,device=cpu,device_map=cpu,dtype=float32"
    rows[1]["deepspeed"], rows[0]["processes"] = "zero2", 1
    bad = gpu_smoke.problems(rows, 2)
    assert any(b.startswith("eval: lmms-eval model_args") for b in bad)
    assert "stage2 pretrain: deepspeed zero2, expected zero3" in bad and "stage1 train: 1 process(es), expected 2" in bad


def test_rows_come_from_the_runs_own_records(tmp_path):
    for rel, data in (("stage1/train/train_summary.json", {"device": "cuda:0", "world_size": 2, "backend": "nccl",
                                                           "autocast": "bf16"}),
                      ("stage2_pretrain/train_summary.json", {"device": "cuda:0", "world_size": 2, "backend": "nccl",
                                                              "param_dtype": "bfloat16", "deepspeed": "zero3"}),
                      ("stage2_finetune/train_summary.json", {"device": "cuda:0", "world_size": 2, "backend": "nccl",
                                                              "param_dtype": "bfloat16", "deepspeed": "zero3"}),
                      ("eval/results.json", {"device": "cuda", "nproc": 2, "precision": "bf16",
                                             "model_args": "pretrained=/m,device=cuda:0,device_map=cuda:0,dtype=bfloat16"})):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(data))
    assert gpu_smoke.problems(gpu_smoke.collect(tmp_path), 2) == []


@pytest.mark.parametrize("gpus", [1, 2, 3, 8])
def test_smoke_overrides_are_a_valid_tiny_config(gpus):
    cfg = load_config("tiny", gpu_smoke.overrides(gpus))
    assert (cfg.stage1.nproc, cfg.stage2.nproc, cfg.eval.nproc) == (gpus, gpus, gpus)
    assert cfg.stage2.pretrain.deepspeed == cfg.stage2.finetune.deepspeed == "zero3"
    assert (cfg.stage1.precision, cfg.stage2.precision, cfg.eval.precision, cfg.eval.device) == ("bf16", "bf16", "bf16",
                                                                                                "cuda")


def test_stages_resolve_auto_to_bf16_on_a_gpu(monkeypatch):
    from stage1_pretrain.train import where_it_ran
    from stage2_llava.train import use_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_bf16("auto") and not use_bf16("fp32")
    assert where_it_ran(torch.device("cuda", 0), "auto") == {"device": "cuda:0", "backend": None, "autocast": "bf16"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_bf16("auto")
    assert where_it_ran(torch.device("cpu"), "auto")["autocast"] == "fp32"
