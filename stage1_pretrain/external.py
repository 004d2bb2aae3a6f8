"""open_clip checkpoints from outside the run: stage 1's warm start and stage 2's `open_clip` tower source.

A checkpoint is either
- an open_clip `local-dir:` model directory: `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) +
  `open_clip_model.safetensors`, as stage 1 exports it (export.export_open_clip) and open_clip loads it; or
- a `.safetensors` state dict of a named architecture (stage1.model for a warm start; ARCH for a tower).
Pickled files (.bin/.pt/.pth) are never read. Both text-tower layouts (open_clip's standard CLIP keys and
the custom-text `text.*` keys) and a DDP `module.` prefix are accepted.

Warm start (`stage1.init_from`, `warm_start`): both towers, the logit scale (and SigLIP's logit bias when the
checkpoint has one) are copied into the freshly created stage-1 model before training; the training-only heads
(ITO's fusion head and its temperature, FLAIR's pooling, SLIP's SSL head) are not part of the open_clip model
and keep their fresh initialisation. A directory's `model_cfg` must describe stage1.model's architecture, and
every tensor must exist with the same shape, else a one-line InputError says what differs.

Tower conversion (`convert_to_hf`): the open_clip model built from the checkpoint is exported as an HF CLIP
directory by export.export_hf_clip, which reloads it and checks every hidden state and both embeddings against
open_clip before renaming it into place (`export_check.json` holds the max differences). The directory is
cached under `cache_root/open_clip-<sha256 of weights + architecture>/` and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.io import InputError, atomic_write_json, load_safetensors, read_json, sha256_file
from common.schema import ConfigError

from . import models
from .export import EXPORT_CHECK, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, export_hf_clip

ARCH_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")
OPTIONAL_TENSORS = ("logit_bias",)  # SigLIP's bias: kept fresh when the checkpoint has none, dropped when unused
CONVERSION_FILE = "conversion.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    path: Path
    weights: Path
    state: dict[str, torch.Tensor]  # custom-text layout (the stage-1 models' own)
    model_cfg: dict | None  # a directory's architecture; None for a bare state dict
    preprocess_cfg: dict | None


def _custom_text_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from open_clip.model import convert_to_custom_text_state_dict

    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return convert_to_custom_text_state_dict(state)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """An open_clip checkpoint from a local-dir model directory or a .safetensors state dict."""
    path = Path(path)
    model_cfg = preprocess_cfg = None
    if path.is_dir():
        config, weights = path / OPEN_CLIP_CONFIG, path / OPEN_CLIP_WEIGHTS
        if not config.is_file() or not weights.is_file():
            raise InputError(f"{path}: expected an open_clip model directory with {OPEN_CLIP_CONFIG} and "
                             f"{OPEN_CLIP_WEIGHTS} (pickled checkpoints are never loaded)")
        meta = read_json(config)
        model_cfg = meta.get("model_cfg") if isinstance(meta, dict) else None
        if not isinstance(model_cfg, dict):
            raise InputError(f"{config}: no 'model_cfg' object, expected open_clip's local-dir config")
        preprocess_cfg = meta.get("preprocess_cfg") or None
    elif path.is_file() and path.suffix == ".safetensors":
        weights = path
    elif path.is_file():
        hint = " (it may hold pickled code; convert it to safetensors first)" if path.suffix in PICKLE_SUFFIXES else ""
        raise InputError(f"{path}: not a .safetensors file or an open_clip model directory{hint}")
    else:
        raise InputError(f"{path}: not found, expected an open_clip model directory or a .safetensors file")
    return Checkpoint(path, weights, _custom_text_layout(load_safetensors(weights)), model_cfg, preprocess_cfg)


def _normal(cfg: dict) -> dict:
    return json.loads(json.dumps({k: cfg.get(k) for k in ARCH_KEYS}))


def describe_arch(cfg: dict) -> str:
    """One phrase for an open_clip model_cfg: tower widths, depths, patch and image size."""
    v, t = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    return (f"ViT width {v.get('width')} x {v.get('layers')} layers, patch {v.get('patch_size')}, "
            f"{v.get('image_size')} px; text width {t.get('width')} x {t.get('layers')} layers; "
            f"embed {cfg.get('embed_dim')}")


def check_architecture(ckpt: Checkpoint, expected: dict, name: str, where: str) -> None:
    """One-line InputError when a checkpoint directory's architecture is not `expected` (named `name`)."""
    if ckpt.model_cfg is None:
        return
    got, want = _normal(ckpt.model_cfg), _normal(expected)
    if got != want:
        keys = [k for k in ARCH_KEYS if got.get(k) != want.get(k)]
        raise InputError(f"{where}: {ckpt.path} is a {describe_arch(ckpt.model_cfg)} model, {name} is a "
                         f"{describe_arch(expected)} model ({', '.join(keys)} differ); expected the same architecture")


def load_into(model: nn.Module, ckpt: Checkpoint, name: str, where: str) -> dict[str, Any]:
    """Copy the checkpoint's tensors into `model` after checking names and shapes; {"loaded", "kept_fresh"}."""
    own = model.state_dict()
    missing = [k for k in own if k not in ckpt.state and k not in OPTIONAL_TENSORS]
    unexpected = [k for k in ckpt.state if k not in own and k not in OPTIONAL_TENSORS]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in ckpt.state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {items[:3]}" for label, items in (("missing", missing), ("unexpected", unexpected),
                                                               ("shape", shapes)) if items]
        raise InputError(f"{where}: {ckpt.path} does not fit {name} ({'; '.join(parts)}); expected the same "
                         "architecture")
    loaded = {k: v for k, v in ckpt.state.items() if k in own}
    model.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "kept_fresh": sorted(k for k in own if k not in loaded)}


def warm_start(model: nn.Module, model_cfg: dict, source: str | os.PathLike, arch: str) -> dict[str, Any]:
    """`stage1.init_from`: load an open_clip checkpoint into the stage-1 model `model` (built from `model_cfg`)."""
    where = "stage1.init_from"
    ckpt = read_checkpoint(source)
    check_architecture(ckpt, model_cfg, f"stage1.model={arch}", where)
    info = load_into(model, ckpt, f"stage1.model={arch}", where)
    return {"init_from": str(ckpt.path.resolve()), "weights_sha256": sha256_file(ckpt.weights), **info}


def build_open_clip(ckpt: Checkpoint, arch: str | None) -> nn.Module:
    """The open_clip model of a checkpoint: a directory's own config, or architecture `arch` for a state dict."""
    import open_clip

    if ckpt.model_cfg is not None:
        model = open_clip.create_model(f"local-dir:{ckpt.path.resolve()}", load_weights=False, force_custom_text=True)
        name = f"the model of {ckpt.path / OPEN_CLIP_CONFIG}"
    elif arch:
        try:
            model = models.create(arch)[0]
        except ConfigError as e:
            raise InputError(f"stage2.vision_tower: {e}") from None
        name = f"open_clip architecture {arch}"
    else:
        raise InputError(f"stage2.vision_tower: {ckpt.path} is a bare state dict; name its architecture as "
                         "open_clip:ARCH:FILE.safetensors")
    load_into(model, ckpt, name, "stage2.vision_tower")
    return model.eval()


def convert_to_hf(source: str | os.PathLike, arch: str | None, cache_root: str | os.PathLike) -> Path:
    """The HF CLIP directory of an open_clip checkpoint, converted once (numerically checked) and cached."""
    ckpt = read_checkpoint(source)
    digest = hashlib.sha256(json.dumps({"weights": sha256_file(ckpt.weights), "model_cfg": ckpt.model_cfg,
                                        "arch": None if ckpt.model_cfg else arch}, sort_keys=True).encode())
    out = Path(cache_root) / f"open_clip-{digest.hexdigest()[:16]}"
    if (out / CONVERSION_FILE).is_file():
        return out
    model = build_open_clip(ckpt, arch)
    try:
        export_hf_clip(model, out)
    except ValueError as e:
        raise InputError(f"stage2.vision_tower: {ckpt.path}: {e}") from None
    except OSError:  # another process (node) renamed its identical conversion into place first
        if not (out / EXPORT_CHECK).is_file():
            raise
    atomic_write_json(out / CONVERSION_FILE, {"source": str(ckpt.path.resolve()), "arch": arch,
                                              "weights_sha256": sha256_file(ckpt.weights),
                                              "check": read_json(out / EXPORT_CHECK)})
    return out
