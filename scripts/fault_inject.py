"""Fault injection: SIGKILL the chain inside training steps and checkpoint writes, resume, compare.

One reference run of `ito-mllm run` (data -> stage 1 -> export -> stage 2 pretrain/finetune ->
eval, the `tiny` preset with ITO and a few more steps) goes uninterrupted and records every
failpoint hit (common.faults). Then each trial starts a fresh run directory and kills the same
command up to --kills-per-trial times before letting a last resume finish. Each kill is either
- a failpoint kill: a (step, failpoint) pair of stages 1 and 2 not yet done drawn uniformly, at a
  hit drawn uniformly from the reference's count (train.step; ckpt.partial / before_rename / before_latest
  / rotate; file.before_rename; dir.before_rename / mid_swap), the process SIGKILLs itself there;
- a timed kill: SIGKILL to the whole process group after a random fraction of the reference time.
A trial's run directory is *unusable* when the last resume exits non-zero or a final artifact is
missing, and *differs* when a final weight differs from the reference by more than --atol or an
eval output is not byte-identical. Trials repeat until --kills kills have landed. The table and a
JSON report (every kill's point) are printed and written to --out.

    python scripts/fault_inject.py --out fault.json --kills 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common.io import atomic_write_json, load_safetensors

OVERRIDES = [
    "stage1.method=ito", "stage1.epochs=2", "stage1.checkpoint_every_steps=3",
    "stage2.pretrain.max_steps=8", "stage2.pretrain.checkpoint_every_steps=3",
    "stage2.finetune.max_steps=8", "stage2.finetune.checkpoint_every_steps=3",
    "eval.tasks=demo_pope_random,demo_vqav2", "eval.limit=8",
]
KILL_STEPS = ("stage1", "stage2_pretrain", "stage2_finetune")  # the long-running training stages
WEIGHTS = ("stage1/train/final/model.safetensors", "stage1/open_clip/open_clip_model.safetensors",
           "stage1/hf_clip/model.safetensors", "stage2_pretrain/hf/model.safetensors",
           "stage2_finetune/hf/model.safetensors")
EVAL_FILES = ("eval/samples/demo_pope_random.jsonl", "eval/samples/demo_vqav2.jsonl")


def _cmd(run_dir: Path, preset: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", "--config", preset, "--run-dir", str(run_dir), *OVERRIDES]


def _run(cmd: list[str], env_extra: dict[str, str], kill_after: float | None, log_path: Path) -> tuple[int, float]:
    """Run cmd in its own process group; SIGKILL the group after kill_after s. Returns (exit code, seconds)."""
    env = {**os.environ, **env_extra}
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # a failpoint kills only the main process: reap what it leaves (data-loader workers, launched ranks)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, time.perf_counter() - t0


def _statuses(run_dir: Path) -> dict[str, str] | None:
    """{step: status} from the run's manifest; None before the manifest exists."""
    try:
        stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return None
    return {name: st.get("status") for name, st in stages.items()}


def _running_step(run_dir: Path) -> str:
    statuses = _statuses(run_dir)
    if statuses is None:
        return "startup"
    return next((name for name, status in statuses.items() if status == "running"), "between steps")


def _compare(ref: Path, run: Path) -> tuple[str | None, float]:
    """(what is missing or None, max |weight difference|; inf when an eval output differs)."""
    worst = 0.0
    for rel in WEIGHTS:
        if not (run / rel).is_file():
            return rel, float("inf")
        a, b = load_safetensors(ref / rel), load_safetensors(run / rel)
        if a.keys() != b.keys():
            return None, float("inf")
        worst = max([worst] + [(a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()])
    for rel in EVAL_FILES:
        if not (run / rel).is_file():
            return rel, float("inf")
        if (ref / rel).read_bytes() != (run / rel).read_bytes():
            worst = float("inf")
    return None, worst


def _leftovers(run: Path) -> list[str]:
    """Temp files and directories of interrupted writes that survived the final run."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*") if p.name.endswith((".tmp", ".old", ".del"))
                  or p.name.startswith(".step_"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument("--kills", type=int, default=20, help="stop once this many kills have landed")
    p.add_argument("--kills-per-trial", type=int, default=3)
    p.add_argument("--max-trials", type=int, default=30)
    p.add_argument("--timed-fraction", type=float, default=0.25, help="share of kills sent from outside at a random time")
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a new temp directory (kept, for inspection)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault_inject_"))
    work.mkdir(parents=True, exist_ok=True)

    ref, trace = work / "reference", work / "reference.trace"
    shutil.rmtree(ref, ignore_errors=True)
    trace.unlink(missing_ok=True)
    code, t_ref = _run(_cmd(ref, args.preset), {"ITO_MLLM_FAILPOINT_TRACE": str(trace)}, None, work / "reference.log")
    if code != 0:
        raise SystemExit(f"reference run failed with exit code {code}; see {work / 'reference.log'}")
    hits = Counter(tuple(line.split()) for line in trace.read_text().splitlines())
    targets = sorted((step, name) for step, name in hits if step in KILL_STEPS)
    print(f"reference: {t_ref:.1f}s, {sum(hits.values())} failpoint hits, {len(targets)} kill targets")

    kills, trials, rows = [], 0, []
    while len(kills) < args.kills and trials < args.max_trials:
        trials += 1
        run = work / f"trial_{trials:03d}"
        shutil.rmtree(run, ignore_errors=True)
        log_path = work / f"trial_{trials:03d}.log"
        landed = 0
        for _ in range(args.kills_per_trial):
            if rng.random() < args.timed_fraction:
                at = rng.uniform(0.1, 1.0) * t_ref
                code, _ = _run(_cmd(run, args.preset), {}, at, log_path)
                point = {"kind": "timed", "after_s": round(at, 2)}
            else:  # a point of a step that is not done yet: a resumed run skips the finished ones
                done = {name for name, status in (_statuses(run) or {}).items() if status == "done"}
                step, name = rng.choice([t for t in targets if t[0] not in done] or targets)
                n = rng.randint(1, hits[step, name])
                code, _ = _run(_cmd(run, args.preset), {"ITO_MLLM_KILL_AT": f"{step}:{name}:{n}"}, None, log_path)
                point = {"kind": "failpoint", "step": step, "failpoint": name, "hit": n}
            if code != -signal.SIGKILL:
                if code != 0:
                    point["exit_code"] = code  # an interrupted run that cannot resume: counted unusable below
                break  # the run finished before the kill point came
            point["running"] = _running_step(run)
            kills.append({"trial": trials, **point})
            landed += 1
        code, _ = _run(_cmd(run, args.preset), {}, None, log_path)
        missing, diff = _compare(ref, run) if code == 0 else (f"exit code {code}", float("inf"))
        row = {"trial": trials, "kills": landed, "resume_exit": code, "missing": missing, "max_abs_diff": diff,
               "leftovers": _leftovers(run) if code == 0 else []}
        row["unusable"] = code != 0 or missing is not None
        row["differs"] = not row["unusable"] and diff > args.atol
        rows.append(row)
        print(f"trial {trials:3d}: {landed} kills, resume exit {code}, max|diff| {diff:.2e}"
              + (f", missing {missing}" if missing else "") + (f", leftovers {row['leftovers']}" if row["leftovers"] else ""))
        if not row["unusable"] and not row["differs"]:
            shutil.rmtree(run, ignore_errors=True)

    by_step = Counter(k["running"] for k in kills)
    by_point = Counter(k.get("failpoint", "timed") for k in kills)
    killed_trials = [r for r in rows if r["kills"]]
    report = {
        "preset": args.preset, "overrides": OVERRIDES, "reference_seconds": round(t_ref, 1), "workdir": str(work),
        "kills": len(kills), "resumes": sum(r["kills"] for r in rows), "trials": len(rows),
        "killed_trials": len(killed_trials),
        "differ": sum(r["differs"] for r in killed_trials), "unusable": sum(r["unusable"] for r in killed_trials),
        "leftover_temp_files": sum(len(r["leftovers"]) for r in rows),
        "max_abs_diff": max((r["max_abs_diff"] for r in rows), default=0.0),
        "kills_by_step": dict(by_step), "kills_by_point": dict(by_point), "kill_log": kills, "trial_rows": rows,
    }
    atomic_write_json(args.out, report)
    print(f"\n{'kills':>6s} {'resumes':>8s} {'killed runs':>12s} {'differ':>7s} {'unusable':>9s} {'max|diff|':>10s}")
    print(f"{report['kills']:6d} {report['resumes']:8d} {report['killed_trials']:12d} {report['differ']:7d} "
          f"{report['unusable']:9d} {report['max_abs_diff']:10.2e}")
    print("kills by running step: " + ", ".join(f"{k} {v}" for k, v in sorted(by_step.items())))
    print("kills by point: " + ", ".join(f"{k} {v}" for k, v in sorted(by_point.items())))
    return report


if __name__ == "__main__":
    main()
