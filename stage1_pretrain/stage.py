"""Stage 1's public entry points: train, export, evaluate, and convert_open_clip (an outside open_clip checkpoint
as an HF CLIP tower for stage 2). The chain (`pipeline.chain`) calls only these.

Each takes the stage-1 config section and plain paths and returns the outputs it wrote ({key: path}),
which the chain records in the run directory's manifest; nothing here knows about manifests.
"""

from __future__ import annotations

from pathlib import Path

from common import launch
from common.console import log
from common.io import InputError, load_safetensors

from . import export as _export
from . import models
from .config import Stage1Config
from .methods import resolve


def train(cfg: Stage1Config, train_data: str, eval_data: str | None, out_dir: str | Path,
          nodes: launch.Nodes | None = None) -> dict[str, Path]:
    """Pretrain (or resume) the dual encoder into `out_dir` in cfg.nproc processes per node (`nodes`: several
    machines, common.launch.Nodes); returns {"checkpoint_dir", "train_log"}."""
    from .train import train as train_in_process

    out = Path(out_dir)
    summary = launch.run(train_in_process, (cfg, train_data, eval_data, out), cfg.nproc, nodes)
    log(f"stage1 {cfg.method}: {summary['steps']} steps, {summary['data_counters']['bad']} bad samples")
    return {"checkpoint_dir": out / "checkpoints", "train_log": out / "logs" / "metrics.jsonl"}


def export(cfg: Stage1Config, train_dir: str | Path, open_clip_dir: str | Path,
           hf_clip_dir: str | Path) -> dict[str, Path]:
    """Drop the fusion head (it is not in final/) and write the open_clip and HF CLIP directories;
    returns {"open_clip_dir", "hf_clip_dir"}."""
    weights = Path(train_dir) / "final" / "model.safetensors"
    if not weights.is_file():
        raise InputError(f"{weights}: no trained weights; run `ito-mllm stage1 train` first")
    model, _, _, _ = models.create(cfg.model, **resolve(cfg).model_kwargs)
    missing, unexpected = model.load_state_dict(load_safetensors(weights), strict=False)
    if missing or unexpected:
        raise InputError(f"{weights}: weights do not fit stage1.model={cfg.model} (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.eval()
    model_cfg = models.model_config(cfg.model, **resolve(cfg).model_kwargs)
    return {
        "open_clip_dir": _export.export_open_clip(model, model_cfg, open_clip_dir),
        "hf_clip_dir": _export.export_hf_clip(model, hf_clip_dir),
    }


def convert_open_clip(source: str | Path, arch: str | None, cache_dir: str | Path) -> Path:
    """An open_clip checkpoint from outside the run (an open_clip model directory, or a .safetensors state dict of
    architecture `arch`) as an HF CLIP directory, exported like stage 1's own and checked numerically against
    open_clip; converted once under `cache_dir`/open_clip-<digest> and reused. Returns the directory."""
    from .external import convert_to_hf

    return convert_to_hf(source, arch, cache_dir)


def load_exported(open_clip_dir: str | Path):
    """(model, preprocess_val, tokenizer) from an exported open_clip directory, as a user loads it."""
    import open_clip

    ref = f"local-dir:{Path(open_clip_dir).resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(ref)
    return model.eval(), preprocess, open_clip.get_tokenizer(ref)


def evaluate(cfg: Stage1Config, open_clip_dir: str | Path, eval_data: str | Path, out_dir: str | Path,
             probe: tuple[str, str] | None = None) -> dict[str, Path]:
    """Stage-1 metrics of the exported model (metrics.json/.md, umap.png in `out_dir`); `probe` (train JSONL,
    test JSONL) selects the paper's linear probe. Returns {"metrics_json", "umap_png"}."""
    from .evaluate import evaluate as run_eval

    model, preprocess, tokenizer = load_exported(open_clip_dir)
    train_jsonl, test_jsonl = probe or (None, None)
    run_eval(model, preprocess, tokenizer, eval_data, out_dir, batch_size=cfg.eval_batch_size, seed=cfg.seed,
             probe_train=train_jsonl, probe_test=test_jsonl)
    out = Path(out_dir)
    return {"metrics_json": out / "metrics.json", "umap_png": out / "umap.png"}
