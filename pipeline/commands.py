"""Handlers behind the `ito-mllm` subcommands: resolve the config, open the run dir, call a stage.

Stage imports happen inside the handlers so `ito-mllm --help` and config errors stay fast.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.config import RunConfig, config_hash, dump_yaml, load_config
from pipeline.io import InputError
from pipeline.rundir import RunDir
from pipeline.schema import ConfigError, describe


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


def _not_yet(what: str, issue: int):
    from pipeline.cli import NotImplementedYet

    raise NotImplementedYet(f"{what}: not implemented yet (lands with issue #{issue})")


def data_demo(args) -> int:
    extra = []
    if args.size:
        extra.append(f"data.size={args.size}")
    if args.seed is not None:
        extra.append(f"data.seed={args.seed}")
    cfg, rd = resolve(args, extra, save=args.run_dir is not None)
    if args.out is None and rd is None:
        raise ConfigError("data demo: give --out DIR or --run-dir DIR")
    from pipeline import world

    out = args.out if args.out is not None else rd.path / "data"
    if rd is not None:
        rd.mark_running("data", config_hash(cfg.data), {"size": cfg.data.size, "seed": cfg.data.seed})
    t0 = time.perf_counter()
    manifest = world.generate(out, size=cfg.data.size, seed=cfg.data.seed, image_size=cfg.data.image_size)
    dt = time.perf_counter() - t0
    if rd is not None:
        rd.mark_done("data", {"root": out}, seconds=round(dt, 2))
    counts = ", ".join(f"{k}={v}" for k, v in manifest.get("counts", {}).items())
    print(f"demo world ({cfg.data.size}, seed {cfg.data.seed}) written to {out} in {dt:.1f}s: {counts}")
    return 0


def ensure_data(cfg: RunConfig, rd: RunDir) -> tuple[Path, dict]:
    """The demo-world root and its manifest: `data.root`, the run's data stage, or a new generation."""
    from pipeline import world
    from pipeline.io import read_json

    if cfg.data.root:
        root = Path(cfg.data.root)
    else:
        root = rd.output("data", "root")
        if root is None or not (root / "manifest.json").is_file():
            root = rd.path / "data"
            rd.mark_running("data", config_hash(cfg.data), {"size": cfg.data.size, "seed": cfg.data.seed})
            world.generate(root, size=cfg.data.size, seed=cfg.data.seed, image_size=cfg.data.image_size)
            rd.mark_done("data", {"root": root})
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"{manifest}: data root has no manifest.json (data.root={cfg.data.root!r})")
    return root, read_json(manifest)


def stage1_sources(cfg: RunConfig, rd: RunDir) -> tuple[str, str]:
    """(train_data, eval_data) for stage 1: the config's, else the demo world's."""
    train, evald = cfg.stage1.train_data, cfg.stage1.eval_data
    if not train or not evald:
        root, manifest = ensure_data(cfg, rd)
        paths = manifest["paths"]
        train = train or str(root / paths["stage1_shards"])
        evald = evald or str(root / paths["stage1_eval"])
    return train, evald


def _stage1_dirs(rd: RunDir) -> dict[str, Path]:
    base = rd.path / "stage1"
    return {"train": base / "train", "open_clip": base / "open_clip", "hf_clip": base / "hf_clip", "eval": base / "eval"}


def stage1_train(args) -> int:
    from pipeline import launch
    from stage1_pretrain.train import train

    extra = [f"stage1.nproc={args.nproc}"] if args.nproc else []
    cfg, rd = resolve(args, extra)
    train_data, eval_data = stage1_sources(cfg, rd)
    dirs = _stage1_dirs(rd)
    rd.mark_running("stage1", config_hash(cfg.stage1), {"train_data": train_data, "eval_data": eval_data})
    t0 = time.perf_counter()
    summary = launch.run(train, (cfg.stage1, train_data, eval_data, dirs["train"]), cfg.stage1.nproc)
    dt = time.perf_counter() - t0
    rd.add_outputs("stage1", {"checkpoint_dir": dirs["train"] / "checkpoints"}, train_seconds=round(dt, 1))
    print(f"stage1 {cfg.stage1.method}: {summary['steps']} steps in {dt:.0f}s -> {dirs['train']}")
    return 0


def stage1_export(args) -> int:
    from stage1_pretrain import stage

    cfg, rd = resolve(args)
    dirs = _stage1_dirs(rd)
    outs = stage.export(cfg.stage1, dirs["train"], dirs["open_clip"], dirs["hf_clip"])
    rd.add_outputs("stage1", outs)
    print(f"exported: open_clip -> {outs['open_clip_dir']}, Hugging Face CLIP -> {outs['hf_clip_dir']}")
    return 0


def stage1_eval(args) -> int:
    from stage1_pretrain import stage

    cfg, rd = resolve(args)
    _, eval_data = stage1_sources(cfg, rd)
    dirs = _stage1_dirs(rd)
    open_clip_dir = rd.require_output("stage1", "open_clip_dir")
    outs = stage.evaluate(cfg.stage1, open_clip_dir, eval_data, dirs["eval"])
    rd.add_outputs("stage1", {"metrics_json": outs["metrics_json"], "umap_png": outs["umap_png"]})
    print(Path(outs["metrics_md"]).read_text())
    return 0


def stage2_pretrain(args) -> int:
    resolve(args)
    _not_yet("stage2 pretrain", 4)


def stage2_finetune(args) -> int:
    resolve(args)
    _not_yet("stage2 finetune", 4)


def evaluate(args) -> int:
    resolve(args, [f"eval.tasks={args.tasks}"] if args.tasks else [])
    _not_yet("eval", 5)


def run(args) -> int:
    resolve(args)
    _not_yet("run", 5)


def ab(args) -> int:
    resolve(args)
    _not_yet("ab", 5)


def demo(args) -> int:
    resolve(args)
    _not_yet("demo (the full A/B; for now run `ito-mllm data demo --out DIR`)", 5)


def config_show(args) -> int:
    cfg, _ = resolve(args, save=False)
    sys.stdout.write(dump_yaml(cfg))
    return 0


def config_keys(args) -> int:
    for key, tp, default, help_ in describe(RunConfig):
        print(f"{key:42s} {tp:22s} {default!r:24s} {help_}")
    return 0
