"""The chain: data -> stage 1 (train, export, eval) -> stage 2 (pretrain, finetune) -> eval, and A/B runs.

Each step has a key: the hash of its own config section plus its upstream step's key, so a
change anywhere reruns that step and everything after it. A rerun of the chain skips steps
that are `done` with the same key and outputs on disk, resumes a step left `running` (the
stages resume from their own checkpoints), and wipes a step's directory when its key changed.
Stages are called through Python APIs; multi-process stages start through `common.launch`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import faults
from common.io import InputError, read_json, sweep_partial_writes
from common.schema import to_dict
from pipeline.config import RunConfig, arm_config, config_hash, dump_yaml
from pipeline.rundir import RunDir


def log(msg: str) -> None:
    print(f"[ito-mllm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- steps


def generate_data(cfg: RunConfig, rd: RunDir | None, out: Path) -> dict:
    """Generate the demo world into `out` (recorded as the run's data step when `rd` is given); its manifest."""
    import demo_world as world

    if rd is not None:
        rd.mark_running("data", step_keys(cfg)["data"], {"size": cfg.data.size, "seed": cfg.data.seed})
    t0 = time.perf_counter()
    manifest = world.generate(out, size=cfg.data.size, seed=cfg.data.seed, image_size=cfg.data.image_size)
    if rd is not None:
        rd.mark_done("data", {"root": out}, seconds=round(time.perf_counter() - t0, 2))
    return manifest


def ensure_data(cfg: RunConfig, rd: RunDir) -> tuple[Path, dict]:
    """The demo-world root and its manifest: `data.root`, the run's data stage, or a new generation."""
    if cfg.data.root:
        root = Path(cfg.data.root)
    else:
        root = rd.output("data", "root")
        if root is None or not (root / "manifest.json").is_file():
            root = rd.path / "data"
            generate_data(cfg, rd, root)
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


def stage1_dirs(rd: RunDir) -> dict[str, Path]:
    base = rd.path / "stage1"
    return {"train": base / "train", "open_clip": base / "open_clip", "hf_clip": base / "hf_clip", "eval": base / "eval"}


def run_stage1_train(cfg: RunConfig, rd: RunDir, nodes=None) -> dict[str, Path]:
    """Stage-1 training in cfg.stage1.nproc processes (per node: `nodes`, a common.launch.Nodes)."""
    from common import launch
    from stage1_pretrain.train import train

    train_data, eval_data = stage1_sources(cfg, rd)
    d = stage1_dirs(rd)
    summary = launch.run(train, (cfg.stage1, train_data, eval_data, d["train"]), cfg.stage1.nproc, nodes)
    log(f"stage1 {cfg.stage1.method}: {summary['steps']} steps, {summary['data_counters']['bad']} bad samples")
    return {"checkpoint_dir": d["train"] / "checkpoints", "train_log": d["train"] / "logs" / "metrics.jsonl"}


def run_stage1_export(cfg: RunConfig, rd: RunDir) -> dict[str, Path]:
    from stage1_pretrain import stage

    d = stage1_dirs(rd)
    return stage.export(cfg.stage1, d["train"], d["open_clip"], d["hf_clip"])


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


def run_stage1_eval(cfg: RunConfig, rd: RunDir, open_clip_dir: Path) -> dict[str, Path]:
    from stage1_pretrain import stage

    _, eval_data = stage1_sources(cfg, rd)
    outs = stage.evaluate(cfg.stage1, open_clip_dir, eval_data, stage1_dirs(rd)["eval"], probe_sources(cfg, rd))
    return {"metrics_json": outs["metrics_json"], "umap_png": outs["umap_png"]}


def _stage1(cfg: RunConfig, rd: RunDir) -> dict[str, Path]:
    outs = run_stage1_train(cfg, rd)
    outs.update(run_stage1_export(cfg, rd))
    outs.update(run_stage1_eval(cfg, rd, outs["open_clip_dir"]))
    return outs


def stage2_sources(cfg: RunConfig, rd: RunDir, phase: str) -> tuple[str, str]:
    """(LLaVA JSON, image folder) of a phase: the config's, else the demo world's."""
    pc = getattr(cfg.stage2, phase)
    if pc.data:
        return pc.data, pc.image_folder
    root, manifest = ensure_data(cfg, rd)
    paths = manifest["paths"]
    return str(root / paths[f"stage2_{phase}"]), str(root / paths["stage2_images"])


def _stage2_entry(kwargs: dict) -> dict:
    """Module-level (picklable) entry for the launcher: one stage-2 phase in every process."""
    from stage2_llava.train import run_phase

    return run_phase(**kwargs)


def demo_lm_texts(cfg: RunConfig, rd: RunDir) -> list[str] | None:
    """Both phases' conversations as vicuna_v1 text: what a registered demo LM learns before stage 2."""
    if not cfg.stage2.language_model.startswith("demo-"):
        return None
    from stage2_llava.llava_json import load_llava_json
    from stage2_llava.train import demo_texts_of

    texts = []
    for phase in ("pretrain", "finetune"):
        data_json, image_folder = stage2_sources(cfg, rd, phase)
        texts += demo_texts_of(load_llava_json(data_json, image_folder, skip_bad=cfg.stage2.skip_bad_records)[0])
    return texts


def run_stage2_phase(cfg: RunConfig, rd: RunDir, phase: str, shared_cache: Path | None = None,
                     nodes=None) -> dict[str, Path]:
    """One stage-2 phase in cfg.stage2.nproc processes (per node: `nodes`, a common.launch.Nodes)."""
    from common import launch

    data_json, image_folder = stage2_sources(cfg, rd, phase)
    out_dir = rd.path / f"stage2_{phase}"
    cache = Path(shared_cache or rd.path / "cache")  # shared by A/B arms: one LM initialisation for all
    if phase == "pretrain":
        tower = cfg.stage2.vision_tower or str(rd.require_output("stage1", "hf_clip_dir"))
        init = (tower, cfg.stage2.language_model)
    else:
        init = str(rd.require_output("stage2_pretrain", "hf_dir"))
    kwargs = dict(phase=phase, cfg=cfg.stage2, init_dir_or_sources=init, data_json=data_json,
                  image_folder=image_folder, out_dir=out_dir, cache_dir=cache / "features",
                  lm_cache_dir=cache / "language_models",
                  demo_texts=demo_lm_texts(cfg, rd) if phase == "pretrain" else None)
    summary = launch.run(_stage2_entry, (kwargs,), cfg.stage2.nproc, nodes)
    log(f"stage2 {phase}: {summary.get('steps')} steps in {summary.get('seconds', 0):.0f}s")
    return {"hf_dir": out_dir / "hf", "train_log": out_dir / "logs" / "metrics.jsonl"}


def run_eval(cfg: RunConfig, rd: RunDir, model_dir: str | Path | None = None, blind: bool = False) -> dict[str, Path]:
    """lmms-eval on the run's finetuned MLLM (or `model_dir`); `blind`: with grey images, into eval_blind/."""
    from eval_mllm.runner import run_lmms_eval

    model = Path(model_dir) if model_dir else rd.require_output("stage2_finetune", "hf_dir")
    data_root = None
    if any(t.startswith("demo") for t in cfg.eval.tasks):
        data_root, _ = ensure_data(cfg, rd)
    out = rd.path / ("eval_blind" if blind else "eval")
    run_lmms_eval(model, cfg.eval.tasks, out, data_root=data_root, limit=cfg.eval.limit,
                  batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.eval.seed,
                  textvqa_ocr=cfg.eval.textvqa_ocr, blind=blind, device=cfg.eval.device,
                  precision=cfg.eval.precision, nproc=cfg.eval.nproc)
    return {"results_json": out / "results.json", "samples_dir": out / "samples"}


def _eval_section(cfg: RunConfig) -> dict:
    d = to_dict(cfg.eval)
    d.pop("blind")  # turning the blind floor on or off must not rerun the normal evaluation
    return d


@dataclass(frozen=True)
class Step:
    name: str
    section: Callable[[RunConfig], Any]  # the config this step depends on (besides upstream)
    run: Callable[..., dict[str, Path]]
    dirs: Callable[[RunDir], list[Path]]  # wiped when the step's key changes
    outputs: tuple[str, ...]  # what "done" means (stage 1's train alone records only some of them)
    enabled: Callable[[RunConfig], bool] = lambda cfg: True  # a disabled step is left out of the chain


def _stage2_section(phase: str) -> Callable[[RunConfig], Any]:
    def section(cfg: RunConfig) -> Any:
        d = to_dict(cfg.stage2)
        other = "finetune" if phase == "pretrain" else "pretrain"
        d.pop(other)  # the pretrain phase must not rerun because a finetune knob changed
        return d

    return section


STEPS = (
    Step("data", lambda c: c.data, lambda c, rd, **_: {"root": ensure_data(c, rd)[0]}, lambda rd: [], ("root",)),
    Step("stage1", lambda c: c.stage1, lambda c, rd, **_: _stage1(c, rd), lambda rd: [rd.path / "stage1"],
         ("checkpoint_dir", "open_clip_dir", "hf_clip_dir", "metrics_json")),
    Step("stage2_pretrain", _stage2_section("pretrain"),
         lambda c, rd, **kw: run_stage2_phase(c, rd, "pretrain", kw.get("shared_cache"), kw.get("nodes")),
         lambda rd: [rd.path / "stage2_pretrain"], ("hf_dir",)),
    Step("stage2_finetune", _stage2_section("finetune"),
         lambda c, rd, **kw: run_stage2_phase(c, rd, "finetune", kw.get("shared_cache"), kw.get("nodes")),
         lambda rd: [rd.path / "stage2_finetune"], ("hf_dir",)),
    Step("eval", _eval_section, lambda c, rd, **kw: run_eval(c, rd, kw.get("model_dir")), lambda rd: [rd.path / "eval"],
         ("results_json", "samples_dir")),
    Step("eval_blind", lambda c: c.eval, lambda c, rd, **kw: run_eval(c, rd, kw.get("model_dir"), blind=True),
         lambda rd: [rd.path / "eval_blind"], ("results_json", "samples_dir"), enabled=lambda c: c.eval.blind),
)


def _outputs_exist(rd: RunDir, step: Step) -> bool:
    outputs = rd.stage(step.name).get("outputs", {})
    return all(k in outputs for k in step.outputs) and all(
        (rd.path / p if not Path(p).is_absolute() else Path(p)).exists() for p in outputs.values()
    )


def step_keys(cfg: RunConfig) -> dict[str, str]:
    """Each step's key: its config section's hash chained with the upstream step's key."""
    keys, upstream = {}, ""
    for step in STEPS:
        upstream = keys[step.name] = config_hash({"config": to_dict(step.section(cfg)), "upstream": upstream})
    return keys


def run_step(cfg: RunConfig, rd: RunDir, name: str, *, force: bool = False, **kw) -> str:
    """Run one step unless it is done with the same key; "skipped" or "ran"."""
    step = next(s for s in STEPS if s.name == name)
    key = step_keys(cfg)[name]
    entry = rd.stage(name)
    if not force and entry.get("status") == "done" and entry.get("config_hash") == key and _outputs_exist(rd, step):
        log(f"{name}: done with the same config, skipped")
        return "skipped"
    if entry.get("config_hash") not in (None, key):
        log(f"{name}: config or inputs changed; rerunning it (and everything after it)")
        for d in step.dirs(rd):
            shutil.rmtree(d, ignore_errors=True)
    elif entry.get("status") == "running":
        log(f"{name}: interrupted earlier; resuming")
        for d in step.dirs(rd):
            if d.is_dir():
                sweep_partial_writes(d)
    rd.mark_running(name, key)
    t0 = time.perf_counter()
    faults.set_step(name)
    try:
        outputs = step.run(cfg, rd, **kw)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            rd.mark_failed(name, f"{type(e).__name__}: {e}".splitlines()[0][:500])
        raise
    finally:
        faults.set_step(None)
    rd.mark_done(name, outputs, config_hash=key, seconds=round(time.perf_counter() - t0, 1))
    return "ran"


def run_chain(cfg: RunConfig, rd: RunDir, shared_cache: Path | None = None) -> dict[str, str]:
    """Run every step not already done with the same key; returns {step: "skipped"|"ran"}."""
    rd.save_config(dump_yaml(cfg))
    return {step.name: run_step(cfg, rd, step.name, shared_cache=shared_cache) for step in STEPS if step.enabled(cfg)}


def _arm_inputs(cfg: RunConfig, rd: RunDir) -> dict:
    """What the A/B report reads of one arm's run directory."""
    summary = rd.require_output("stage1", "checkpoint_dir").parent / "train_summary.json"
    spec = {
        "results_json": rd.require_output("eval", "results_json"),
        "samples_dir": rd.require_output("eval", "samples_dir"),
        "stage1_metrics": rd.require_output("stage1", "metrics_json"),
        "stage1_info": {"method": cfg.stage1.method, "augment": cfg.stage1.augment,
                        "steps": read_json(summary)["steps"] if summary.is_file() else None},
        "umap_png": rd.require_output("stage1", "umap_png"),
        "train_logs": {
            "stage1": rd.require_output("stage1", "train_log"),
            "stage2_pretrain": rd.require_output("stage2_pretrain", "train_log"),
            "stage2_finetune": rd.require_output("stage2_finetune", "train_log"),
        },
    }
    if cfg.eval.blind:
        spec["blind_results_json"] = rd.require_output("eval_blind", "results_json")
        spec["blind_samples_dir"] = rd.require_output("eval_blind", "samples_dir")
    return spec


def run_ab(cfg: RunConfig, top: RunDir) -> dict:
    """Every arm of `ab.arms` on shared data and LM initialisation, then the A/B report."""
    from eval_mllm.report import write_report

    top.save_config(dump_yaml(cfg))
    root, _ = ensure_data(cfg, top)
    arms: dict[str, dict] = {}
    for arm in cfg.ab.arms:
        acfg = arm_config(cfg, arm)
        acfg.data.root = str(root.resolve())
        ard = RunDir(top.path / "arms" / arm)
        log(f"arm {arm}: {', '.join(f'{k}={v}' for k, v in cfg.ab.arms[arm].items())}")
        run_chain(acfg, ard, shared_cache=top.path / "cache")
        arms[arm] = _arm_inputs(acfg, ard)
    out = top.path / "report"
    top.mark_running("report", config_hash(cfg))
    report = write_report(arms, out, cfg.ab.baseline or None, cfg.ab.control or None,
                          n_resamples=cfg.eval.bootstrap_samples, seed=cfg.eval.seed)
    top.mark_done("report", {"markdown": out / "report.md", "json": out / "report.json"})
    return report
