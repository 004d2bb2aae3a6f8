"""GPU smoke test: the tiny chain on every visible GPU, in bf16, and a table of what ran where in which dtype.

    python scripts/gpu_smoke.py [--out DIR] [--gpus N] [KEY=VALUE ...]

Runs `ito-mllm run --config tiny` with stage 1 in N processes (NCCL), both LLaVA phases under DeepSpeed
ZeRO-3 in N processes, and stage 3 on CUDA in N processes (eval.nproc), all in bf16, then prints a JSON
table built from the run's own records (train_summary.json of each training step, eval/results.json):
step, device, processes, collective backend, dtype. It exits 1, naming each problem, when any step ran on
the CPU, in another dtype, in fewer processes, without NCCL or without ZeRO-3: a silent CPU fallback
fails loudly. Without a CUDA device it stops at once (exit 2). N defaults to every visible GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides(gpus: int) -> list[str]:
    """The tiny preset sized for `gpus` processes, everything on the GPU in bf16."""
    return [f"stage1.nproc={gpus}", f"stage1.batch_size={8 * gpus}", "stage1.precision=bf16",
            f"stage2.nproc={gpus}", "stage2.precision=bf16",
            *(f"stage2.{ph}.{k}" for ph in ("pretrain", "finetune")
              for k in ("deepspeed=zero3", "per_device_batch_size=2", f"global_batch_size={2 * gpus}")),
            "eval.device=cuda", "eval.precision=bf16", f"eval.nproc={gpus}"]


def collect(run_dir: Path) -> list[dict]:
    """One row per step from the run's own records."""
    def read(rel: str) -> dict:
        return json.loads((run_dir / rel).read_text(encoding="utf-8"))

    s1 = read("stage1/train/train_summary.json")
    rows = [{"step": "stage1 train", "device": s1["device"], "processes": s1["world_size"], "backend": s1["backend"],
             "dtype": s1["autocast"]}]
    for phase in ("pretrain", "finetune"):
        s = read(f"stage2_{phase}/train_summary.json")
        rows.append({"step": f"stage2 {phase}", "device": s["device"], "processes": s["world_size"],
                     "backend": s["backend"], "dtype": s["param_dtype"], "deepspeed": s["deepspeed"]})
    for step, rel in (("eval", "eval/results.json"), ("eval blind", "eval_blind/results.json")):
        if step == "eval" or (run_dir / rel).is_file():  # the grey-image run exists with eval.blind (default on)
            e = read(rel)
            rows.append({"step": step, "device": e["device"], "processes": e["nproc"], "backend": "accelerate",
                         "dtype": e["precision"], "model_args": e.get("model_args", "")})
    return rows


def problems(rows: list[dict], gpus: int) -> list[str]:
    """Everything that did not run where and how the smoke test asked (empty: all good)."""
    out = []
    for r in rows:
        step = r["step"]
        if not str(r["device"]).startswith("cuda"):
            out.append(f"{step}: ran on {r['device']}, expected cuda (silent CPU fallback)")
        if r["processes"] != gpus:
            out.append(f"{step}: {r['processes']} process(es), expected {gpus}")
        if r["dtype"] not in ("bf16", "bfloat16"):
            out.append(f"{step}: dtype {r['dtype']}, expected bf16")
        if gpus > 1 and step.startswith("stage") and r["backend"] != "nccl":
            out.append(f"{step}: collective backend {r['backend']}, expected nccl")
        if step.startswith("stage2") and r.get("deepspeed") != "zero3":
            out.append(f"{step}: deepspeed {r.get('deepspeed')}, expected zero3")
        if step.startswith("eval") and not ("device=cuda" in r["model_args"] and "dtype=bfloat16" in r["model_args"]):
            out.append(f"{step}: lmms-eval model_args {r['model_args']!r} do not put the model on cuda in bfloat16")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/gpu-smoke"), help="run directory (default runs/gpu-smoke)")
    p.add_argument("--gpus", type=int, help="processes / GPUs to use (default: every visible GPU)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra config overrides for the tiny chain")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: torch sees no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    gpus = a.gpus or torch.cuda.device_count()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--config", "tiny", "--run-dir", str(a.out), *overrides(gpus),
           *a.overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        print(f"gpu_smoke: FAILED: `{' '.join(cmd)}` exited {proc.returncode}", file=sys.stderr)
        return 1
    rows = collect(a.out)
    bad = problems(rows, gpus)
    print(json.dumps({"gpus": gpus, "gpu_name": torch.cuda.get_device_name(0), "seconds": round(time.perf_counter() - t0),
                      "steps": rows, "ok": not bad}, indent=2))
    for line in bad:
        print(f"gpu_smoke: FAILED: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
