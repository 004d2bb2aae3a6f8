"""Handlers behind the `ito-mllm` subcommands: resolve the config, open the run dir, run a step.

Every stage command goes through the chain's step runner (`chain.run_step`), which keeps the manifest.
`pipeline.chain` (and through it the stages) is imported inside the handlers so `ito-mllm --help` and
config errors stay fast.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common.io import atomic_write_json, read_json
from common.launch import Nodes
from common.schema import ConfigError, describe
from pipeline.config import RunConfig, dump_yaml, load_config
from pipeline.rundir import RunDir


def resolve(args, extra: list[str] | None = None, save: bool = True) -> tuple[RunConfig, RunDir | None]:
    """The run config of a command (preset/YAML + overrides) and its run directory."""
    overrides = [*(extra or []), *args.overrides]
    run_dir = getattr(args, "run_dir", None)
    config = args.config
    if config is None and run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
        config = str(Path(run_dir) / "config.yaml")
    cfg = load_config(config, overrides)
    rd = None
    if run_dir is not None or save:
        rd = RunDir(run_dir if run_dir is not None else Path("runs") / cfg.name)
        if save:
            rd.save_config(dump_yaml(cfg))
    return cfg, rd


def data_demo(args) -> int:
    from pipeline import chain
    from pipeline.chain import Context

    extra = []
    if args.size:
        extra.append(f"data.size={args.size}")
    if args.seed is not None:
        extra.append(f"data.seed={args.seed}")
    cfg, rd = resolve(args, extra, save=args.run_dir is not None)
    if args.out is None and rd is None:
        raise ConfigError("data demo: give --out DIR or --run-dir DIR")
    out = Path(args.out) if args.out is not None else rd.path / "data"
    t0 = time.perf_counter()
    if rd is None:
        manifest = chain.generate_world(cfg, out)
    else:
        chain.run_step(cfg, rd, "data", force=True, ctx=Context(data_out=out))
        manifest = read_json(out / "manifest.json")
    dt = time.perf_counter() - t0
    counts = ", ".join(f"{k}={v}" for k, v in manifest.get("counts", {}).items())
    print(f"demo world ({cfg.data.size}, seed {cfg.data.seed}) written to {out} in {dt:.1f}s: {counts}")
    return 0


def data_paper13_fixtures(args) -> int:
    from demo_world.paper13 import summary_lines, write_paper13_fixtures

    t0 = time.perf_counter()
    manifest = write_paper13_fixtures(args.out, seed=args.seed)
    print("\n".join(summary_lines(manifest)))
    print(f"paper13 fixtures written to {args.out} in {time.perf_counter() - t0:.1f}s; evaluate with "
          f"HF_HOME={args.out} ito-mllm eval --model MODEL --tasks paper13")
    return 0


def _nodes(args, stage: str) -> tuple[list[str], Nodes]:
    """Overrides and common.launch.Nodes from --nnodes/--node-rank/--master-addr/--master-port."""
    nodes = Nodes(args.nnodes or 1, args.node_rank, args.master_addr, args.master_port)
    if nodes.nnodes > 1 and args.run_dir is None:
        raise ConfigError("--run-dir: several nodes write one run directory, so give it (on a shared filesystem)")
    if not 0 <= nodes.node_rank < nodes.nnodes:
        raise ConfigError(f"--node-rank: {nodes.node_rank} is outside 0..{nodes.nnodes - 1} for --nnodes {nodes.nnodes}")
    return ([f"{stage}.nnodes={args.nnodes}"] if args.nnodes else []), nodes


def stage1_train(args) -> int:
    from pipeline import chain

    extra, nodes = _nodes(args, "stage1")
    extra += [f"stage1.nproc={args.nproc}"] if args.nproc else []
    cfg, rd = resolve(args, extra, save=nodes.is_main)  # only node 0 writes; the others train into the same dirs
    chain.run_step(cfg, rd, "stage1", part="train", ctx=chain.Context(nodes=nodes))
    return 0


def stage1_export(args) -> int:
    from pipeline import chain

    cfg, rd = resolve(args)
    chain.run_step(cfg, rd, "stage1", part="export")
    print(f"exported: open_clip -> {rd.require_output('stage1', 'open_clip_dir')}, "
          f"Hugging Face CLIP -> {rd.require_output('stage1', 'hf_clip_dir')}")
    return 0


def stage1_eval(args) -> int:
    from pipeline import chain

    cfg, rd = resolve(args)
    chain.run_step(cfg, rd, "stage1", part="eval")
    print(rd.require_output("stage1", "metrics_json").with_suffix(".md").read_text())
    return 0


def _stage2(args, phase: str) -> int:
    from pipeline import chain

    extra, nodes = _nodes(args, "stage2")
    cfg, rd = resolve(args, extra, save=nodes.is_main)
    # node 0 keeps the manifest (and wipes a changed step) before the nodes meet
    chain.run_step(cfg, rd, f"stage2_{phase}", force=True, ctx=chain.Context(nodes=nodes))
    if nodes.is_main:
        print(f"stage2 {phase} -> {rd.require_output(f'stage2_{phase}', 'hf_dir')}")
    return 0


def stage2_pretrain(args) -> int:
    return _stage2(args, "pretrain")


def stage2_finetune(args) -> int:
    return _stage2(args, "finetune")


def evaluate(args) -> int:
    from pipeline import chain

    cfg, rd = resolve(args, [f"eval.tasks={args.tasks}"] if args.tasks else [])
    chain.run_step(cfg, rd, "eval", force=True, ctx=chain.Context(model_dir=args.model))
    _print_results(rd.require_output("eval", "results_json"))
    return 0


def _print_results(path: Path) -> None:
    res = read_json(path)
    table = Path(path).with_name("table.md")
    if table.is_file():
        print(table.read_text(encoding="utf-8"))
    for task, entry in res.get("tasks", {}).items():
        print(f"{task:24s} {entry.get('metric', ''):18s} {entry.get('value_pct')}  (n={entry.get('n_samples')})")
    for task, why in res.get("skipped", {}).items():
        print(f"{task:24s} skipped: {why}")


def run(args) -> int:
    from pipeline import chain

    cfg, rd = resolve(args)
    done = chain.run_chain(cfg, rd)
    print(f"run {rd.path}: " + ", ".join(f"{k} {v}" for k, v in done.items()))
    _print_results(rd.require_output("eval", "results_json"))
    return 0


def ab(args) -> int:
    from pipeline import chain

    cfg, rd = resolve(args)
    t0 = time.perf_counter()
    chain.run_ab(cfg, rd)
    md = rd.require_output("report", "markdown")
    print(md.read_text())
    print(f"A/B report: {md} ({time.perf_counter() - t0:.0f}s)")
    return 0


def demo(args) -> int:
    """The first-time user's command: `ab` with the demo preset into runs/demo."""
    if args.config is None and args.run_dir is None:
        args.config = "demo"
    if args.run_dir is None:
        args.run_dir = Path("runs") / "demo"
    return ab(args)


def chat(args) -> int:
    """`ito-mllm chat`: the run's finetuned MLLM (or --model), one-shot with --prompt or interactive."""
    from stage2_llava import stage as stage2

    model_dir = args.model
    if model_dir is None:
        cfg, rd = resolve(args, save=False)
        model_dir = (rd or RunDir(Path("runs") / cfg.name)).require_output("stage2_finetune", "hf_dir")
    stage2.chat(model_dir, image=args.image, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=args.device)
    return 0


def plan(args) -> int:
    from pipeline.plan import make_plan, render

    cfg, _ = resolve(args, save=False)  # a plan writes no config: the run that follows may still change it
    result = make_plan(cfg)
    print(render(result))
    path = atomic_write_json(Path(args.run_dir or Path("runs") / cfg.name) / "plan.json", result)
    print(f"\nplan.json: {path}")
    return 0


def config_show(args) -> int:
    cfg, _ = resolve(args, save=False)
    sys.stdout.write(dump_yaml(cfg))
    return 0


def config_keys(args) -> int:
    for key, tp, default, help_ in describe(RunConfig):
        print(f"{key:42s} {tp:22s} {default!r:24s} {help_}")
    return 0
