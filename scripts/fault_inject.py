"""Fault injection: SIGKILL long-running stages at random points, resume, compare with an uninterrupted run.

For each stage (stage-1 training, stage-2 pretrain) the script runs the real CLI command once
uninterrupted (the reference), then `--trials` times: start the command in a fresh copy of
the run directory, SIGKILL it after a random delay (up to --kills times per trial, so kills
land in training steps and in checkpoint writes alike), rerun it until it exits, and compare
the final weights with the reference. It prints a table and writes JSON:
kills, resumes, runs whose final artifacts differ (max abs diff > 1e-6), run directories left
unusable (a resume that exits non-zero).

    python scripts/fault_inject.py --out fault.json --trials 5 --kills 2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.io import atomic_write_json, load_safetensors

STAGES = {
    # name: (CLI args, final weights relative to the run dir, extra overrides)
    "stage1": (["stage1", "train"], "stage1/train/final/model.safetensors",
               ["stage1.epochs=2", "stage1.checkpoint_every_steps=2"]),
    "stage2_pretrain": (["stage2", "pretrain"], "stage2_pretrain/hf/model.safetensors",
                        ["stage2.pretrain.max_steps=6", "stage2.pretrain.checkpoint_every_steps=2"]),
}


def _cmd(stage: str, run_dir: Path) -> list[str]:
    args, _, over = STAGES[stage]
    return [sys.executable, "-m", "pipeline.cli", *args, "--config", "tiny", "--run-dir", str(run_dir), *over]


def _run(cmd: list[str], kill_after: float | None) -> tuple[int | None, float]:
    """Run cmd; SIGKILL it after kill_after seconds (None: let it finish). Returns (exit code or None if killed, s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None, time.perf_counter() - t0


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = load_safetensors(a), load_safetensors(b)
    if ta.keys() != tb.keys():
        return float("inf")
    return max(((ta[k].float() - tb[k].float()).abs().max().item() for k in ta), default=0.0)


def _prepare(base: Path, stage: str, work: Path) -> Path:
    """A run directory ready for `stage`: data (and stage 1 for stage 2) copied from the base run."""
    run = work / f"{stage}-{random.randrange(10**9)}"
    shutil.copytree(base, run, ignore=shutil.ignore_patterns("stage2_*", "cache") if stage != "stage1" else
                    shutil.ignore_patterns("stage1", "stage2_*", "cache"))
    manifest = json.loads((run / "manifest.json").read_text())
    keep = {"data"} if stage == "stage1" else {"data", "stage1"}
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in keep}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--trials", type=int, default=5, help="killed runs per stage")
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs per trial (fewer if the run finishes first)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    random.seed(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault_inject_"))
    base = work / "base"
    # The reference: data + stage 1 + stage 2 pretrain, uninterrupted.
    for stage in STAGES:
        code, _ = _run(_cmd(stage, base), None)
        if code != 0:
            raise SystemExit(f"reference run of {stage} failed with exit code {code}")
    durations = {}
    report: dict = {"stages": {}, "workdir": str(work)}
    for stage in args.stages.split(","):
        ref = base / STAGES[stage][1]
        t_ref = durations.setdefault(stage, _run(_cmd(stage, _prepare(base, stage, work)), None)[1])
        row = {"trials": args.trials, "kills": 0, "resumes": 0, "differ": 0, "unusable": 0, "max_abs_diff": 0.0}
        for _ in range(args.trials):
            run = _prepare(base, stage, work)
            for _ in range(args.kills):
                code, _ = _run(_cmd(stage, run), random.uniform(0.3, 1.0) * t_ref)
                if code is not None:
                    break
                row["kills"] += 1
            row["resumes"] += 1
            code, _ = _run(_cmd(stage, run), None)
            final = run / STAGES[stage][1]
            if code != 0 or not final.is_file():
                row["unusable"] += 1
                continue
            diff = _max_diff(ref, final)
            row["max_abs_diff"] = max(row["max_abs_diff"], diff)
            row["differ"] += int(diff > 1e-6)
            shutil.rmtree(run, ignore_errors=True)
        report["stages"][stage] = row
    total = {k: sum(r[k] for r in report["stages"].values()) for k in ("kills", "resumes", "differ", "unusable")}
    report["total"] = total
    atomic_write_json(args.out, report)
    print(f"{'stage':18s} {'kills':>6s} {'resumes':>8s} {'differ':>7s} {'unusable':>9s} {'max|diff|':>10s}")
    for stage, r in report["stages"].items():
        print(f"{stage:18s} {r['kills']:6d} {r['resumes']:8d} {r['differ']:7d} {r['unusable']:9d} {r['max_abs_diff']:10.2e}")
    print(f"{'total':18s} {total['kills']:6d} {total['resumes']:8d} {total['differ']:7d} {total['unusable']:9d}")
    return report


if __name__ == "__main__":
    main()
