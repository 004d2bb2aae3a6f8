"""The chain: data -> stage 1 (train, export, eval) -> stage 2 (pretrain, finetune) -> eval, and A/B runs.

`STEPS` is the chain, top to bottom: each step names the config it depends on, the functions it runs (each
calls one stage entry point: stage1_pretrain.stage, stage2_llava.stage, eval_mllm.stage), the directories it
owns and the outputs that mean "done". `run_step` is the one runner: the chain, `ito-mllm run` / `ab`, and
every stage command of the CLI (`stage1 train|export|eval` run one part of the stage1 step) go through it.

Each step has a key: the hash of its own config section plus its upstream step's key, so a change anywhere
reruns that step and everything after it. A rerun skips steps that are `done` with the same key and outputs
on disk, resumes a step left `running` (the stages resume from their own checkpoints), and wipes a step's
directories when its key changed. Multi-process stages start through `common.launch`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import demo_world
from common import faults
from common.console import log
from common.io import InputError, read_json, sweep_partial_writes
from common.launch import Nodes
from common.schema import to_dict
from eval_mllm import stage as eval_stage
from pipeline.config import RunConfig, arm_config, config_hash, dump_yaml
from pipeline.rundir import RunDir
from stage1_pretrain import stage as stage1
from stage2_llava import stage as stage2

Outputs = dict[str, Path]


@dataclass(frozen=True)
class Context:
    """What a command adds to a step besides the config and the run directory."""

    nodes: Nodes | None = None  # several machines (stage 1 train, stage 2): node 0 keeps the manifest
    shared_cache: Path | None = None  # A/B arms share the LM build and the feature cache
    model_dir: Path | None = None  # `ito-mllm eval --model DIR`
    data_out: Path | None = None  # `ito-mllm data demo --out DIR`


# ------------------------------------------------------------------------------------ data and its paths


def generate_world(cfg: RunConfig, out: Path) -> dict:
    """Render the demo world into `out`; its manifest."""
    return demo_world.generate(out, size=cfg.data.size, seed=cfg.data.seed, image_size=cfg.data.image_size)


def ensure_data(cfg: RunConfig, rd: RunDir) -> tuple[Path, dict]:
    """The demo-world root and its manifest: `data.root`, the run's data step, or the data step run now."""
    if cfg.data.root:
        root = Path(cfg.data.root)
    else:
        root = rd.output("data", "root")
        if root is None or not (root / "manifest.json").is_file():
            run_step(cfg, rd, "data", force=True)
            root = rd.require_output("data", "root")
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


def probe_sources(cfg: RunConfig, rd: RunDir) -> tuple[str, str] | None:
    """(train, test) JSONLs of the paper-style linear probe: the config's, else the demo world's, else None."""
    if cfg.stage1.probe_train or cfg.stage1.probe_test:
        return cfg.stage1.probe_train, cfg.stage1.probe_test
    if cfg.stage1.eval_data:
        return None  # the user's own eval set: the quick probe on its halves
    root, manifest = ensure_data(cfg, rd)
    paths = manifest["paths"]
    if "stage1_probe_train" not in paths:
        return None
    return str(root / paths["stage1_probe_train"]), str(root / paths["stage1_probe_test"])


def stage1_dirs(rd: RunDir) -> dict[str, Path]:
    base = rd.path / "stage1"
    return {"train": base / "train", "open_clip": base / "open_clip", "hf_clip": base / "hf_clip", "eval": base / "eval"}


def stage2_sources(cfg: RunConfig, rd: RunDir, phase: str) -> tuple[str, str]:
    """(LLaVA JSON, image folder) of a phase: the config's, else the demo world's."""
    pc = getattr(cfg.stage2, phase)
    if pc.data:
        return pc.data, pc.image_folder
    root, manifest = ensure_data(cfg, rd)
    paths = manifest["paths"]
    return str(root / paths[f"stage2_{phase}"]), str(root / paths["stage2_images"])


def cache_dir(rd: RunDir, ctx: Context) -> Path:
    return Path(ctx.shared_cache or rd.path / "cache")  # shared by A/B arms: one LM build, one feature cache


def vision_tower(cfg: RunConfig, rd: RunDir, ctx: Context) -> str:
    """stage2.vision_tower as the directory stage 2 loads (stage2_llava's tower registry): the run's stage-1
    export, an HF directory as given, or an open_clip checkpoint converted to HF CLIP by stage 1's exporter
    (numerically checked, cached under the run's cache, shared by A/B arms)."""
    spec = stage2.tower_spec(cfg.stage2.vision_tower)
    if spec.kind == "stage1":
        return str(rd.require_output("stage1", "hf_clip_dir"))
    if spec.kind == "open_clip":
        return str(stage1.convert_open_clip(spec.path, spec.arch, cache_dir(rd, ctx) / "towers"))
    return spec.text


def language_model(cfg: RunConfig, rd: RunDir, ctx: Context) -> str:
    """stage2.language_model, or for a demo LM the directory built from the text of both phases' data."""
    name = cfg.stage2.language_model
    if not stage2.is_demo_lm(name):
        return name
    lms = cache_dir(rd, ctx) / "language_models"
    sources = [stage2_sources(cfg, rd, phase) for phase in ("pretrain", "finetune")]
    corpus = stage2.write_lm_corpus(sources, lms, skip_bad=cfg.stage2.skip_bad_records)
    return str(stage2.build_demo_lm(name, corpus, lms, seed=cfg.stage2.seed))


# ------------------------------------------------------------------------- what each step runs, in order


def data(cfg: RunConfig, rd: RunDir, ctx: Context, earlier: Outputs) -> Outputs:
    if cfg.data.root and ctx.data_out is None:
        return {"root": ensure_data(cfg, rd)[0]}
    out = ctx.data_out or rd.path / "data"
    generate_world(cfg, out)
    return {"root": out}


def stage1_train(cfg: RunConfig, rd: RunDir, ctx: Context, earlier: Outputs) -> Outputs:
    train_data, eval_data = stage1_sources(cfg, rd)
    return stage1.train(cfg.stage1, train_data, eval_data, stage1_dirs(rd)["train"], ctx.nodes)


def stage1_export(cfg: RunConfig, rd: RunDir, ctx: Context, earlier: Outputs) -> Outputs:
    d = stage1_dirs(rd)
    return stage1.export(cfg.stage1, d["train"], d["open_clip"], d["hf_clip"])


def stage1_eval(cfg: RunConfig, rd: RunDir, ctx: Context, earlier: Outputs) -> Outputs:
    open_clip_dir = earlier.get("open_clip_dir") or rd.require_output("stage1", "open_clip_dir")
    _, eval_data = stage1_sources(cfg, rd)
    return stage1.evaluate(cfg.stage1, open_clip_dir, eval_data, stage1_dirs(rd)["eval"], probe_sources(cfg, rd))


def stage2_pretrain(cfg: RunConfig, rd: RunDir, ctx: Context, earlier: Outputs) -> Outputs:
    data_json, image_folder = stage2_sources(cfg, rd, "pretrain")
    return stage2.pretrain(cfg.stage2, vision_tower=vision_tower(cfg, rd, ctx), language_model=language_model(cfg, rd, ctx),
                           data_json=data_json, image_folder=image_folder, out_dir=rd.path / "stage2_pretrain",
                           cache_dir=cache_dir(rd, ctx) / "features", nodes=ctx.nodes)


def stage2_finetune(cfg: RunConfig, rd: RunDir, ctx: Context, earlier: Outputs) -> Outputs:
    data_json, image_folder = stage2_sources(cfg, rd, "finetune")
    return stage2.finetune(cfg.stage2, init_dir=rd.require_output("stage2_pretrain", "hf_dir"), data_json=data_json,
                           image_folder=image_folder, out_dir=rd.path / "stage2_finetune",
                           cache_dir=cache_dir(rd, ctx) / "features", nodes=ctx.nodes)


def _evaluate(cfg: RunConfig, rd: RunDir, ctx: Context, blind: bool) -> Outputs:
    model = ctx.model_dir or rd.require_output("stage2_finetune", "hf_dir")
    data_root = ensure_data(cfg, rd)[0] if eval_stage.uses_demo_world(cfg.eval) else None
    out = rd.path / ("eval_blind" if blind else "eval")
    return eval_stage.evaluate(cfg.eval, model, out, data_root=data_root, blind=blind)


def evaluate(cfg: RunConfig, rd: RunDir, ctx: Context, earlier: Outputs) -> Outputs:
    return _evaluate(cfg, rd, ctx, blind=False)


def evaluate_blind(cfg: RunConfig, rd: RunDir, ctx: Context, earlier: Outputs) -> Outputs:
    return _evaluate(cfg, rd, ctx, blind=True)


def report(cfg: RunConfig, rd: RunDir, ctx: Context, earlier: Outputs) -> Outputs:
    arms = {arm: arm_inputs(arm_config(cfg, arm), RunDir(rd.path / "arms" / arm)) for arm in cfg.ab.arms}
    return eval_stage.report(cfg.eval, arms, rd.path / "report", baseline=cfg.ab.baseline or None,
                             control=cfg.ab.control or None)


# ------------------------------------------------------------------------- the config each step depends on


def data_section(cfg: RunConfig) -> Any:
    return cfg.data


def data_inputs(cfg: RunConfig) -> dict:
    return {} if cfg.data.root else {"size": cfg.data.size, "seed": cfg.data.seed}


def stage1_section(cfg: RunConfig) -> Any:
    return cfg.stage1


def runs_stage1(cfg: RunConfig) -> bool:
    """False for an external tower (stage2.vision_tower not from this run's stage 1): the chain skips stage 1."""
    return not stage2.is_external_tower(cfg.stage2.vision_tower)


def _stage2_without(cfg: RunConfig, other_phase: str) -> dict:
    d = to_dict(cfg.stage2)
    d.pop(other_phase)  # a phase must not rerun because the other phase's knob changed
    return d


def stage2_pretrain_section(cfg: RunConfig) -> Any:
    return _stage2_without(cfg, "finetune")


def stage2_finetune_section(cfg: RunConfig) -> Any:
    return _stage2_without(cfg, "pretrain")


def eval_section(cfg: RunConfig) -> Any:
    d = to_dict(cfg.eval)
    d.pop("blind")  # turning the blind floor on or off must not rerun the normal evaluation
    return d


def eval_blind_section(cfg: RunConfig) -> Any:
    return cfg.eval


def blind_enabled(cfg: RunConfig) -> bool:
    return cfg.eval.blind


def whole_config(cfg: RunConfig) -> Any:
    return cfg


# ------------------------------------------------------------------------------------------- the steps


def _always(cfg: RunConfig) -> bool:
    return True


def _no_inputs(cfg: RunConfig) -> dict:
    return {}


@dataclass(frozen=True)
class Step:
    name: str  # the step's entry in manifest.json
    section: Callable[[RunConfig], Any]  # the config this step depends on (besides upstream)
    parts: dict[str, Callable[..., Outputs]]  # run in order; the CLI's `stage1 train` runs one of them
    dirs: tuple[str, ...]  # under the run directory, wiped when the step's key changes
    outputs: tuple[str, ...]  # what "done" means
    enabled: Callable[[RunConfig], bool] = _always  # a disabled step is left out of the chain
    inputs: Callable[[RunConfig], dict] = _no_inputs  # recorded in the manifest next to the key
    chained: bool = True  # False: keyed by its section alone, outside the chain (the A/B report)


STEPS = (
    Step("data", data_section, {"data": data}, (), ("root",), inputs=data_inputs),
    Step("stage1", stage1_section, {"train": stage1_train, "export": stage1_export, "eval": stage1_eval},
         ("stage1",), ("checkpoint_dir", "open_clip_dir", "hf_clip_dir", "metrics_json"), enabled=runs_stage1),
    Step("stage2_pretrain", stage2_pretrain_section, {"pretrain": stage2_pretrain}, ("stage2_pretrain",), ("hf_dir",)),
    Step("stage2_finetune", stage2_finetune_section, {"finetune": stage2_finetune}, ("stage2_finetune",), ("hf_dir",)),
    Step("eval", eval_section, {"eval": evaluate}, ("eval",), ("results_json", "samples_dir")),
    Step("eval_blind", eval_blind_section, {"eval": evaluate_blind}, ("eval_blind",), ("results_json", "samples_dir"),
         enabled=blind_enabled),
)
REPORT = Step("report", whole_config, {"report": report}, ("report",), ("markdown", "json"), chained=False)
_BY_NAME = {s.name: s for s in (*STEPS, REPORT)}


# ------------------------------------------------------------------------------------------- the runner


def step_keys(cfg: RunConfig) -> dict[str, str]:
    """Each chain step's key: its config section's hash chained with the upstream step's key (a disabled step,
    such as stage 1 for an external tower, is not upstream of anything)."""
    keys, upstream = {}, ""
    for step in STEPS:
        keys[step.name] = config_hash({"config": to_dict(step.section(cfg)), "upstream": upstream})
        if step.enabled(cfg):
            upstream = keys[step.name]
    return keys


def _key(cfg: RunConfig, step: Step) -> str:
    return step_keys(cfg)[step.name] if step.chained else config_hash(step.section(cfg))


def _outputs_exist(rd: RunDir, step: Step) -> bool:
    outputs = rd.stage(step.name).get("outputs", {})
    return all(k in outputs for k in step.outputs) and all(
        (rd.path / p if not Path(p).is_absolute() else Path(p)).exists() for p in outputs.values()
    )


def _begin(cfg: RunConfig, rd: RunDir, step: Step, key: str) -> None:
    """Wipe the step's directories when its key changed, or sweep what a kill left; then mark it running."""
    entry = rd.stage(step.name)
    if entry.get("config_hash") not in (None, key):
        log(f"{step.name}: config or inputs changed; rerunning it (and everything after it)")
        for d in step.dirs:
            shutil.rmtree(rd.path / d, ignore_errors=True)
    elif entry.get("status") == "running":
        log(f"{step.name}: interrupted earlier; resuming")
        for d in step.dirs:
            if (rd.path / d).is_dir():
                sweep_partial_writes(rd.path / d)
    rd.mark_running(step.name, key, step.inputs(cfg))


def _run_parts(cfg: RunConfig, rd: RunDir, step: Step, parts: list[str], ctx: Context) -> Outputs:
    """The step's parts in order, each seeing the outputs of the ones before; a failure is recorded."""
    outputs: Outputs = {}
    with faults.in_step(step.name):
        try:
            for part in parts:
                outputs.update(step.parts[part](cfg, rd, ctx, dict(outputs)))
        except BaseException as e:
            if not isinstance(e, KeyboardInterrupt):
                rd.mark_failed(step.name, f"{type(e).__name__}: {e}".splitlines()[0][:500])
            raise
    return outputs


def run_step(cfg: RunConfig, rd: RunDir, name: str, *, force: bool = False, part: str | None = None,
             ctx: Context | None = None) -> str:
    """Run step `name` (or only its `part`, from the CLI) unless it is done with the same key; "skipped" or "ran".

    A whole step is marked running, runs every part, and is marked done with all outputs. A part is always run:
    the first part starts the step as a whole step does, every part adds its outputs as it finishes (so
    `stage1 train` then `stage1 export` then `stage1 eval` add up to the stage1 step). On nodes other than 0
    (`ctx.nodes`) the parts run and the manifest, kept by node 0, is left alone.
    """
    step, ctx = _BY_NAME[name], ctx or Context()
    if ctx.nodes is not None and not ctx.nodes.is_main:
        with faults.in_step(name):
            for p in [part] if part else step.parts:
                step.parts[p](cfg, rd, ctx, {})
        return "ran"
    key = _key(cfg, step)
    if part is not None:
        return _run_part(cfg, rd, step, part, key, ctx)
    entry = rd.stage(name)
    if not force and entry.get("status") == "done" and entry.get("config_hash") == key and _outputs_exist(rd, step):
        log(f"{name}: done with the same config, skipped")
        return "skipped"
    _begin(cfg, rd, step, key)
    t0 = time.perf_counter()
    outputs = _run_parts(cfg, rd, step, list(step.parts), ctx)
    rd.mark_done(name, outputs, config_hash=key, seconds=round(time.perf_counter() - t0, 1))
    return "ran"


def _run_part(cfg: RunConfig, rd: RunDir, step: Step, part: str, key: str, ctx: Context) -> str:
    if part not in step.parts:
        raise ValueError(f"step {step.name} has no part {part!r}; parts: {', '.join(step.parts)}")
    if part == next(iter(step.parts)):
        _begin(cfg, rd, step, key)
    t0 = time.perf_counter()
    outputs = _run_parts(cfg, rd, step, [part], ctx)
    rd.add_outputs(step.name, outputs, **{f"{part}_seconds": round(time.perf_counter() - t0, 1)})
    return "ran"


def run_chain(cfg: RunConfig, rd: RunDir, shared_cache: Path | None = None) -> dict[str, str]:
    """Run every step not already done with the same key; returns {step: "skipped"|"ran"}."""
    rd.save_config(dump_yaml(cfg))
    ctx = Context(shared_cache=shared_cache)
    return {step.name: run_step(cfg, rd, step.name, ctx=ctx) for step in STEPS if step.enabled(cfg)}


def arm_inputs(cfg: RunConfig, rd: RunDir) -> dict:
    """What the A/B report reads of one arm's run directory (an external-tower arm has no stage-1 outputs)."""
    hf = rd.require_output("stage2_finetune", "hf_dir")
    info = read_json(hf / "ito_mllm.json") if (hf / "ito_mllm.json").is_file() else {}
    spec = {
        "results_json": rd.require_output("eval", "results_json"),
        "samples_dir": rd.require_output("eval", "samples_dir"),
        "tower": {"spec": cfg.stage2.vision_tower or "stage1", **(info.get("tower") or {})},
        "train_logs": {
            "stage2_pretrain": rd.require_output("stage2_pretrain", "train_log"),
            "stage2_finetune": rd.require_output("stage2_finetune", "train_log"),
        },
    }
    if runs_stage1(cfg):
        summary = rd.require_output("stage1", "checkpoint_dir").parent / "train_summary.json"
        spec.update({
            "stage1_metrics": rd.require_output("stage1", "metrics_json"),
            "stage1_info": {"method": cfg.stage1.method, "augment": cfg.stage1.augment,
                            "steps": read_json(summary)["steps"] if summary.is_file() else None},
            "umap_png": rd.require_output("stage1", "umap_png"),
        })
        spec["train_logs"] = {"stage1": rd.require_output("stage1", "train_log"), **spec["train_logs"]}
    if cfg.eval.blind:
        spec["blind_results_json"] = rd.require_output("eval_blind", "results_json")
        spec["blind_samples_dir"] = rd.require_output("eval_blind", "samples_dir")
    return spec


def run_ab(cfg: RunConfig, top: RunDir) -> None:
    """Every arm of `ab.arms` on shared data and LM initialisation, then the A/B report (step `report`)."""
    top.save_config(dump_yaml(cfg))
    root, _ = ensure_data(cfg, top)
    for arm in cfg.ab.arms:
        acfg = arm_config(cfg, arm)
        acfg.data.root = str(root.resolve())
        log(f"arm {arm}: {', '.join(f'{k}={v}' for k, v in cfg.ab.arms[arm].items())}")
        run_chain(acfg, RunDir(top.path / "arms" / arm), shared_cache=top.path / "cache")
    run_step(cfg, top, "report", force=True)
