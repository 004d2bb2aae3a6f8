"""Write the sbatch file of an ito-mllm run on a SLURM cluster: stage 1 and both stage-2 phases on every node,
export, stage-1 eval and stage 3 on one node.

    python scripts/slurm.py --config paper --run-dir /shared/runs/datacomp-ito --nodes 4 --gpus-per-node 8 \\
        stage1.method=ito stage1.train_data='/data/datacomp/{00000000..00139999}.tar' ... > job.sbatch
    sbatch job.sbatch

Every training step is one `srun` with one task per node; each task runs `ito-mllm ... --nnodes N --node-rank
$SLURM_NODEID --master-addr <first node> --master-port PORT`, i.e. torchrun's static rendezvous through
common.launch, and starts --gpus-per-node processes on its node. The run directory must be on a filesystem
every node sees; node 0 keeps the manifest. The config is resolved here first, so a bad key fails before
submission. Prints the sbatch file (or writes --out); submits nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = ("stage1", "stage2", "eval")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="preset or YAML (as for ito-mllm)")
    p.add_argument("--run-dir", required=True, help="run directory on a filesystem shared by all nodes")
    p.add_argument("--nodes", type=int, default=1, help="nodes for the training steps (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= processes) per node (default 8)")
    p.add_argument("--cpus-per-task", type=int, default=64, help="CPU cores per node task (default 64)")
    p.add_argument("--time", default="7-00:00:00", help="wall-clock limit (default 7-00:00:00; see ito-mllm plan)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default 29500)")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of stage1,stage2,eval")
    p.add_argument("--ito-mllm", default="ito-mllm", help="the command on the nodes (default: ito-mllm on PATH)")
    p.add_argument("--out", type=Path, help="write here instead of printing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for ito-mllm")
    return p.parse_args(argv)


def _header(a: argparse.Namespace, name: str) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name=ito-mllm-{name}", f"#SBATCH --nodes={a.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={a.gpus_per_node}",
             f"#SBATCH --cpus-per-task={a.cpus_per_task}", f"#SBATCH --time={a.time}",
             f"#SBATCH --output={a.run_dir}/slurm-%j.out"]
    lines += [f"#SBATCH --partition={a.partition}"] * bool(a.partition) + [f"#SBATCH --account={a.account}"] * bool(a.account)
    return lines + ["set -euo pipefail", 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                    f"export MASTER_PORT={a.port}", "export OMP_NUM_THREADS=8", ""]


def _on_all_nodes(a: argparse.Namespace, command: list[str]) -> str:
    """One task per node; the node rank is the task's $SLURM_NODEID, evaluated on that node."""
    args = [shlex.quote(x) for x in command]
    args += ["--nnodes", str(a.nodes), "--master-addr", '"$MASTER_ADDR"', "--master-port", '"$MASTER_PORT"']
    script = f'exec {shlex.quote(a.ito_mllm)} "$@" --node-rank "$SLURM_NODEID"'
    return f"srun --nodes={a.nodes} --ntasks-per-node=1 bash -c {shlex.quote(script)} _ " + " ".join(args)


def _on_one_node(a: argparse.Namespace, command: list[str]) -> str:
    return f"srun --nodes=1 --ntasks=1 {shlex.quote(a.ito_mllm)} " + " ".join(shlex.quote(x) for x in command)


def _per_device(a: argparse.Namespace, overrides: list[str]) -> tuple[list[str], list[str]]:
    """Per-device stage-2 batches that fit the GPU count (the global batch, which is the recipe, stays)."""
    from pipeline.config import load_config

    s2 = load_config(a.config, [*overrides, "stage2.nproc=1", "stage2.nnodes=1"]).stage2
    world, extra, notes = a.nodes * a.gpus_per_node, [], []
    for phase in ("pretrain", "finetune"):
        ph = getattr(s2, phase)
        if ph.global_batch_size % (ph.per_device_batch_size * world) and ph.global_batch_size % world == 0:
            per = max(d for d in range(1, ph.per_device_batch_size + 1) if ph.global_batch_size % (d * world) == 0)
            extra.append(f"stage2.{phase}.per_device_batch_size={per}")
            notes.append(f"# stage2.{phase}.per_device_batch_size={per}: global batch {ph.global_batch_size} over "
                         f"{world} GPUs (the config's {ph.per_device_batch_size} does not divide it)")
    return extra, notes


def sbatch(a: argparse.Namespace) -> str:
    from pipeline.config import load_config

    gpus = a.gpus_per_node
    # every command resolves the same config (the chain's step keys hash it), one node or all
    overrides = [*a.overrides, f"stage1.nproc={gpus}", f"stage2.nproc={gpus}", f"eval.nproc={gpus}",
                 f"stage1.nnodes={a.nodes}", f"stage2.nnodes={a.nodes}"]
    extra, notes = _per_device(a, overrides)
    overrides += extra
    cfg = load_config(a.config, overrides)
    common = ["--config", a.config, "--run-dir", a.run_dir, *overrides]
    steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise SystemExit(f"slurm.py: --steps: unknown {', '.join(unknown)}, expected a subset of {', '.join(STEPS)}")
    body = []
    if "stage1" in steps:
        body += ["# stage 1 on every node, then export and the stage-1 evaluation on one",
                 _on_all_nodes(a, ["stage1", "train", *common]), _on_one_node(a, ["stage1", "export", *common]),
                 _on_one_node(a, ["stage1", "eval", *common]), ""]
    if "stage2" in steps:
        body += ["# LLaVA-1.5 phases on every node",
                 _on_all_nodes(a, ["stage2", "pretrain", *common]), _on_all_nodes(a, ["stage2", "finetune", *common]), ""]
    if "eval" in steps:
        body += [f"# the benchmarks on one node, {gpus} processes (eval.nproc)", _on_one_node(a, ["eval", *common]), ""]
    return "\n".join([*_header(a, cfg.name), *notes, *body])


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    try:
        text = sbatch(a)
    except ValueError as e:  # ConfigError / InputError: one line, as the CLI prints them
        print(f"slurm.py: config error: {e}", file=sys.stderr)
        return 2
    if a.out:
        a.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
