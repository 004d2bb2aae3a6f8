"""open_clip models for stage 1: the project's small architectures, model creation, token-level outputs.

Architectures: the JSON files in `stage1_pretrain/model_configs/` (`ito-tiny` for tests, `ito-demo`
for the 2-core CPU demo) are registered with open_clip's own config registry
(`open_clip.add_model_config`); paper architectures (`ViT-B-16`, `ViT-L-16`) come from open_clip
itself. Every model is built randomly initialised (no download) with open_clip's custom text
tower (`CustomTextCLIP`: the text encoder is the separate object `model.text`).

Token-level outputs (used by the ITO fusion head), both from open_clip's public
`model.forward_intermediates`, in one encoder pass that also yields the pooled embedding:

- image: the final-layer token sequence, class token first then the patch tokens, with the
  final LayerNorm `ln_post` applied and before pooling/projection: `[B, 1 + P, vision width]`.
  (`visual.output_tokens = True` is not used: it returns the patch tokens only, without the class
  token, and it changes what `encode_image` returns for every other user of the model.)
- text: the final-layer sequence at all positions after `ln_final`: `[B, L, text width]`, the
  end-of-text index `argmax(token ids)` (open_clip's pooling position: EOT 49407 is the largest id
  of its BPE tokenizer) and the padding mask `position > EOT index` (equal to `id == 0`, open_clip's
  pad id, for tokenizer output, and robust to a literal token 0 inside a caption).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from common.schema import ConfigError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
PROJECT_ARCHS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))
_registered = False


def register_model_configs() -> None:
    """Add `model_configs/` to open_clip's registry (idempotent: open_clip appends on every call)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def model_config(arch: str, *, image_size: int | None = None, **model_kwargs: Any) -> dict:
    """The open_clip `model_cfg` dict that `create(arch, ...)` builds (a copy, safe to edit/save).

    `custom_text` is forced on; `image_size` overrides `vision_cfg.image_size`; `model_kwargs`
    (e.g. SigLIP's `init_logit_scale`, `init_logit_bias`) are merged at the top level, as
    open_clip's `create_model(**model_kwargs)` does.
    """
    register_model_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ConfigError(
            f"stage1.model: unknown open_clip architecture {arch!r}; project ones: {', '.join(PROJECT_ARCHS)}; "
            "or any name from open_clip.list_models() (e.g. ViT-B-16, ViT-L-16)"
        )
    cfg = copy.deepcopy(cfg)
    cfg["custom_text"] = True
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = int(image_size)
    cfg.update(copy.deepcopy(model_kwargs))
    return cfg


def create(
    arch: str,
    *,
    image_size: int | None = None,
    precision: str = "fp32",
    grad_checkpointing: bool = False,
    device: str | torch.device = "cpu",
    aug_cfg: dict | None = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, Any, Any, Any]:
    """Build a randomly initialised open_clip model: `(model, preprocess_train, preprocess_val, tokenizer)`.

    `precision` is open_clip's: "fp32" (also right for bf16 *training*, which runs under
    `torch.autocast`, as open_clip's "amp_bf16"), or "bf16"/"fp16" for low-precision weights
    (inference). `aug_cfg` goes to open_clip's train transform; `model_kwargs` to the model class.
    The tokenizer is open_clip's (BPE, vocab 49408 for the CLIP text configs; pad 0, SOT 49406,
    EOT 49407) with the architecture's context length.
    """
    cfg = model_config(arch, image_size=image_size)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        arch,
        pretrained=None,
        precision=precision,
        device=device,
        force_custom_text=True,
        force_image_size=image_size,
        aug_cfg=aug_cfg,
        **model_kwargs,
    )
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(arch, context_length=cfg["text_cfg"].get("context_length"))
    return model, preprocess_train, preprocess_val, tokenizer


@dataclass(frozen=True)
class TowerDims:
    image_width: int
    text_width: int
    embed_dim: int
    context_length: int


def tower_dims(model: nn.Module) -> TowerDims:
    """Widths of the two towers' token sequences and the joint embedding size."""
    visual = model.visual
    text_transformer = model.text.transformer if hasattr(model, "text") else model.transformer
    return TowerDims(
        image_width=int(visual.transformer.width),
        text_width=int(text_transformer.width),
        embed_dim=int(visual.proj.shape[1]),
        context_length=int(model.context_length),
    )


def check_token_support(model: nn.Module) -> None:
    """Raise ValueError unless the model's towers give the token sequences documented above."""
    visual = model.visual
    problems = []
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        problems.append(f"image tower is {type(visual).__name__}, not open_clip's VisionTransformer")
    else:
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            problems.append("image tower must pool the class token (pool_type 'tok', no attentional pool)")
    text = getattr(model, "text", None)
    if text is not None:
        if not isinstance(text, open_clip.transformer.TextTransformer):
            problems.append(f"text tower is {type(text).__name__}, not open_clip's TextTransformer")
        elif text.pool_type != "argmax" or text.cls_emb is not None:
            problems.append("text tower must pool at argmax(token ids) without a class embedding")
    elif getattr(model, "text_pool_type", "argmax") != "argmax":
        problems.append("text tower must pool at argmax(token ids)")
    if problems:
        raise ValueError("token-level outputs unsupported for this model: " + "; ".join(problems))


def encode_image_tokens(model: nn.Module, images: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`(features [B, D], tokens [B, 1 + P, image width])` in one pass of the image tower.

    `features` equals `model.encode_image(images, normalize)`; `tokens` is the final-layer
    sequence (class token first) after `ln_post`, before pooling and projection.
    """
    out = model.forward_intermediates(
        image=images,
        image_indices=1,
        normalize=normalize,
        normalize_intermediates=True,
        image_output_fmt="NLC",
        image_output_extra_tokens=True,
    )
    tokens = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
    return out["image_features"], tokens


@dataclass
class TextTokens:
    features: torch.Tensor  # [B, D] pooled + projected (L2-normalised if asked)
    tokens: torch.Tensor  # [B, L, text width] final layer after ln_final, all positions
    eot_index: torch.Tensor  # [B] long, argmax of the token ids (open_clip's pooling position)
    pad_mask: torch.Tensor  # [B, L] bool, True after the EOT (padding)


def text_eot_and_pad(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EOT index (`argmax` of ids, as open_clip pools) and the padding mask (positions after it)."""
    eot = text.argmax(dim=-1)
    positions = torch.arange(text.shape[-1], device=text.device)
    return eot, positions.unsqueeze(0) > eot.unsqueeze(-1)


def encode_text_tokens(model: nn.Module, text: torch.Tensor, normalize: bool = True) -> TextTokens:
    """Pooled text embedding plus the token sequence, EOT index and pad mask, in one pass."""
    out = model.forward_intermediates(text=text, text_indices=1, normalize=normalize, normalize_intermediates=True)
    eot, pad = text_eot_and_pad(text)
    return TextTokens(out["text_features"], out["text_intermediates"][-1], eot, pad)
