"""Stage-1 entry points for the CLI and the chain: train, export, eval on run-directory paths.

Each takes plain paths and a Stage1Config and returns the outputs it wrote, so `pipeline`
can record them in the manifest; nothing here knows about manifests.
"""

from __future__ import annotations

from pathlib import Path

from common.io import InputError, load_safetensors

from . import export as _export
from . import models
from .methods import resolve


def export(cfg, train_dir: str | Path, open_clip_dir: str | Path, hf_clip_dir: str | Path) -> dict[str, Path]:
    """Drop the fusion head (it is not in final/) and write the open_clip and HF CLIP directories."""
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


def load_exported(open_clip_dir: str | Path):
    """(model, preprocess_val, tokenizer) from an exported open_clip directory, as a user loads it."""
    import open_clip

    ref = f"local-dir:{Path(open_clip_dir).resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(ref)
    return model.eval(), preprocess, open_clip.get_tokenizer(ref)


def evaluate(cfg, open_clip_dir: str | Path, eval_data: str | Path, out_dir: str | Path,
             probe: tuple[str, str] | None = None) -> dict[str, Path]:
    """Stage-1 metrics of the exported model; `probe` (train JSONL, test JSONL) selects the paper's linear probe."""
    from .evaluate import evaluate as run_eval

    model, preprocess, tokenizer = load_exported(open_clip_dir)
    train, test = probe or (None, None)
    run_eval(model, preprocess, tokenizer, eval_data, out_dir, batch_size=cfg.eval_batch_size, seed=cfg.seed,
             probe_train=train, probe_test=test)
    out = Path(out_dir)
    return {"metrics_json": out / "metrics.json", "metrics_md": out / "metrics.md", "umap_png": out / "umap.png"}
