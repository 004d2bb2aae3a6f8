"""Export the stage-1 encoders (never the fusion head or loss parameters) in two formats.

1. `export_open_clip`: a self-contained open_clip model directory,
   `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) + `open_clip_model.safetensors`,
   which `open_clip.create_model_and_transforms("local-dir:" + DIR)` loads without any
   registration (custom architectures included), and `open_clip.get_tokenizer("local-dir:" + DIR)`
   too. The weights use open_clip's standard CLIP layout (text tower at the top level, no
   `custom_text`), which is also what `create_model_and_transforms(arch, pretrained=FILE)` loads
   for a built-in architecture; a custom-text model converts it on load.
2. `export_hf_clip`: a Hugging Face `CLIPModel` directory (safetensors, `config.json`) plus a
   `CLIPImageProcessor` equal to open_clip's validation transform (shortest-side bicubic resize,
   center crop, the model's mean/std). Text pooling: `eos_token_id = 2` selects transformers'
   `argmax(input_ids)` path, which is open_clip's EOT pooling. No tokenizer is written (stage 2
   needs only the vision tower); use open_clip's tokenizer for text. Before the directory is renamed
   into place it is reloaded and checked against open_clip (`verify_hf_clip`: every vision and text
   hidden state and both embeddings on seeded random inputs, to 1e-4 relative; the max differences
   go to `export_check.json`).

Both directories are written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import nn

from common.io import atomic_write_json, save_safetensors, staged_dir

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # first in open_clip's preferred checkpoint names
EXPORT_CHECK = "export_check.json"  # the numerical check of the HF export against open_clip
CHECK_REL_TOL = 1e-4
_CUSTOM_TEXT_KEYS = ("text_projection", "positional_embedding", "token_embedding", "transformer", "ln_final")




def _float32_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def to_standard_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Custom-text keys (`text.*`) -> open_clip's standard CLIP keys (inverse of open_clip's converter)."""
    out = {}
    for key, value in state.items():
        if key.startswith("text."):
            inner = key[len("text."):]
            if not inner.startswith(_CUSTOM_TEXT_KEYS):
                raise ValueError(f"text tower parameter {key!r} has no place in open_clip's standard CLIP layout")
            key = inner
        out[key] = value
    return out


def export_open_clip(
    model: nn.Module,
    arch_config: dict,
    out_dir: str | os.PathLike,
    preprocess_cfg: dict | None = None,
) -> Path:
    """Write an open_clip `local-dir:` model directory; returns its path.

    `arch_config` is the model's open_clip `model_cfg` (`models.model_config(arch, ...)`, or
    `Stage1Build.model_cfg`); `preprocess_cfg` defaults to the model's own
    (`model.visual.preprocess_cfg`: size, mean, std, interpolation, resize mode).
    """
    model_cfg = copy.deepcopy(arch_config)
    model_cfg.pop("custom_text", None)
    if getattr(model, "logit_bias", None) is not None:
        model_cfg.setdefault("init_logit_bias", float(model.logit_bias.detach().reshape(-1)[0]))
    if preprocess_cfg is None:
        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    state = to_standard_layout(_float32_state(model))
    with staged_dir(out_dir) as tmp:
        save_safetensors(state, tmp / OPEN_CLIP_WEIGHTS, metadata={"format": "pt"})
        atomic_write_json(
            tmp / OPEN_CLIP_CONFIG, {"model_cfg": _jsonable(model_cfg), "preprocess_cfg": _jsonable(dict(preprocess_cfg))}
        )
    return Path(out_dir)


def _custom_layout_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from open_clip.model import convert_to_custom_text_state_dict

    return convert_to_custom_text_state_dict(_float32_state(model))


def _text_tower(model: nn.Module) -> Any:
    """(transformer, pool type, causal mask, text_projection) for either open_clip class."""
    text = getattr(model, "text", None)
    if text is not None:
        if not isinstance(text, TextTransformer) or text.cls_emb is not None or text.use_pad_mask:
            raise ValueError("HF export needs open_clip's causal TextTransformer (no class embedding, no pad mask)")
        return text.transformer, text.pool_type, text.attn_mask, text.text_projection
    return model.transformer, model.text_pool_type, model.attn_mask, model.text_projection


def _check_exportable(model: nn.Module) -> None:
    visual = model.visual
    transformer, pool_type, attn_mask, text_projection = _text_tower(model)
    problems = []
    if not isinstance(visual, VisionTransformer):
        problems.append(f"image tower {type(visual).__name__} is not open_clip's VisionTransformer")
    elif (
        visual.attn_pool is not None
        or visual.pool_type != "tok"
        or visual.final_ln_after_pool
        or isinstance(visual.ln_pre, nn.Identity)
        or visual.conv1.bias is not None
    ):
        problems.append("image tower must be a plain CLIP ViT (class-token pool, ln_pre, bias-free patch conv)")
    blocks = list(visual.transformer.resblocks) + list(transformer.resblocks)
    if not all(isinstance(b, ResidualAttentionBlock) and isinstance(b.ls_1, nn.Identity) for b in blocks):
        problems.append("blocks must be open_clip's default ResidualAttentionBlock without layer scale")
    if pool_type != "argmax" or attn_mask is None:
        problems.append("text tower must be causal with argmax (EOT) pooling")
    if not isinstance(text_projection, nn.Parameter):
        problems.append("text projection must be a bias-free matrix")
    if problems:
        raise ValueError("cannot export to transformers CLIPModel: " + "; ".join(problems))


def _activation(block: ResidualAttentionBlock) -> str:
    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ValueError(f"no transformers activation matches open_clip's {act!r}")


def _tower_config(transformer: nn.Module) -> dict:
    block = transformer.resblocks[0]
    return {
        "hidden_size": int(transformer.width),
        "intermediate_size": int(block.mlp.c_fc.out_features),
        "num_hidden_layers": len(transformer.resblocks),
        "num_attention_heads": int(block.attn.num_heads),
        "hidden_act": _activation(block),
        "layer_norm_eps": float(block.ln_1.eps),
    }


def hf_clip_config(model: nn.Module) -> Any:
    """A transformers `CLIPConfig` with the open_clip model's dimensions."""
    from transformers import CLIPConfig

    _check_exportable(model)
    visual = model.visual
    text_transformer = _text_tower(model)[0]
    embed_dim = int(visual.proj.shape[1])
    image_size = visual.image_size
    patch_size = visual.patch_size
    if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
        raise ValueError(f"HF CLIP needs square images and patches, got {image_size} / {patch_size}")
    vision_cfg = {**_tower_config(visual.transformer), "image_size": int(image_size[0]),
                  "patch_size": int(patch_size[0]), "projection_dim": embed_dim}
    text_cfg = {
        **_tower_config(text_transformer),
        "vocab_size": int(model.vocab_size),
        "max_position_embeddings": int(model.context_length),
        "projection_dim": embed_dim,
        "pad_token_id": 0,
        "bos_token_id": 49406,
        "eos_token_id": 2,  # transformers' legacy value: pool at argmax(input_ids), as open_clip
    }
    return CLIPConfig(
        text_config=text_cfg,
        vision_config=vision_cfg,
        projection_dim=embed_dim,
        logit_scale_init_value=float(model.logit_scale.detach().reshape(-1)[0]),
    )


def _map_blocks(state: dict, src: str, dst: str, layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        s, d = f"{src}.{i}.", f"{dst}.{i}."
        for name, value in (("weight", state[s + "attn.in_proj_weight"]), ("bias", state[s + "attn.in_proj_bias"])):
            q, k, v = value.chunk(3, dim=0)
            out[d + f"self_attn.q_proj.{name}"] = q
            out[d + f"self_attn.k_proj.{name}"] = k
            out[d + f"self_attn.v_proj.{name}"] = v
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            out[d + b + ".weight"] = state[s + a + ".weight"]
            out[d + b + ".bias"] = state[s + a + ".bias"]
    return out


def hf_clip_state_dict(model: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """open_clip weights under transformers' CLIPModel names (the fusion head is not part of `model`)."""
    st = _custom_layout_state(model)
    out = {
        "logit_scale": st["logit_scale"].reshape(()),
        "vision_model.embeddings.class_embedding": st["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": st["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": st["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": st["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": st["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": st["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": st["visual.ln_post.bias"],
        "visual_projection.weight": st["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": st["text.token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": st["text.positional_embedding"],
        "text_model.final_layer_norm.weight": st["text.ln_final.weight"],
        "text_model.final_layer_norm.bias": st["text.ln_final.bias"],
        "text_projection.weight": st["text.text_projection"].T,
    }
    out.update(_map_blocks(st, "visual.transformer.resblocks", "vision_model.encoder.layers",
                           config.vision_config.num_hidden_layers))
    out.update(_map_blocks(st, "text.transformer.resblocks", "text_model.encoder.layers",
                           config.text_config.num_hidden_layers))
    return {k: v.contiguous() for k, v in out.items()}


def hf_image_processor(image_size: int, mean, std, interpolation: str = "bicubic", resize_mode: str = "shortest"):
    """`CLIPImageProcessor` matching open_clip's validation transform."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"no HF resample for open_clip interpolation {interpolation!r}")
    resample = PILImageResampling.BICUBIC if interpolation == "bicubic" else PILImageResampling.BILINEAR
    if resize_mode == "shortest":
        size, crop = {"shortest_edge": image_size}, True
    elif resize_mode == "squash":
        size, crop = {"height": image_size, "width": image_size}, False
    else:
        raise ValueError(f"open_clip resize_mode {resize_mode!r} has no CLIPImageProcessor equivalent")
    return CLIPImageProcessor(
        do_resize=True,
        size=size,
        resample=resample,
        do_center_crop=crop,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(x) for x in mean],
        image_std=[float(x) for x in std],
        do_convert_rgb=True,
    )


def _residuals(blocks, run) -> list[torch.Tensor]:
    """Residual stream of a tower: the input of block 0 (HF hidden_states[0]) and every block's output."""
    states = []
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: states.append(args[0].detach()))]
    hooks += [b.register_forward_hook(lambda m, args, out: states.append(out.detach())) for b in blocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return states


def verify_hf_clip(model: nn.Module, hf_dir: str | os.PathLike, *, rel_tol: float = 1e-4, seed: int = 0) -> dict:
    """Check an exported HF CLIP directory against the open_clip model it came from; {quantity: max |diff|}.

    Compared on seeded random images and token ids: every vision and text hidden state (open_clip's residual
    stream vs transformers' `hidden_states`) and both projected embeddings. Raises ValueError naming the first
    quantity whose max |diff| exceeds rel_tol x max(1, max |open_clip value|).
    """
    from transformers import CLIPModel

    hf = CLIPModel.from_pretrained(str(hf_dir), local_files_only=True, use_safetensors=True).eval()
    cfg = hf.config
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=gen)
    length = cfg.text_config.max_position_embeddings
    texts = torch.randint(1, cfg.text_config.vocab_size - 1, (2, length), generator=gen)
    texts[:, length // 2] = cfg.text_config.vocab_size - 1  # an end-of-text token (the largest id) to pool at
    transformer = _text_tower(model)[0]
    was_training = model.training
    model.eval()
    try:
        pairs = {"vision hidden states": (_residuals(model.visual.transformer.resblocks, lambda: model.encode_image(images)),
                                          hf.vision_model(pixel_values=images, output_hidden_states=True).hidden_states),
                 "text hidden states": (_residuals(transformer.resblocks, lambda: model.encode_text(texts)),
                                        hf.text_model(input_ids=texts, output_hidden_states=True).hidden_states)}
        with torch.no_grad():
            pairs["image embedding"] = ([model.encode_image(images)], [hf.get_image_features(pixel_values=images).pooler_output])
            pairs["text embedding"] = ([model.encode_text(texts)], [hf.get_text_features(input_ids=texts).pooler_output])
    finally:
        model.train(was_training)
    diffs = {}
    for name, (ref, got) in pairs.items():
        if len(ref) != len(got):
            raise ValueError(f"HF export: {name}: {len(got)} tensors, open_clip has {len(ref)}")
        for i, (a, b) in enumerate(zip(ref, got, strict=True)):
            d = float((a - b.detach()).abs().max())
            tol = rel_tol * max(1.0, float(a.abs().max()))
            if not d <= tol:
                raise ValueError(f"HF export differs from open_clip: {name} [{i}] max |diff| {d:.3g} > {tol:.3g}")
            diffs[name] = max(diffs.get(name, 0.0), d)
    return diffs


def export_hf_clip(
    model: nn.Module,
    out_dir: str | os.PathLike,
    image_size: int | None = None,
    mean=None,
    std=None,
    verify: bool = True,
) -> Path:
    """Write a transformers `CLIPModel` + `CLIPImageProcessor` directory; returns its path.

    `image_size`, `mean`, `std` default to the model's open_clip preprocess config (they must
    describe what the model was trained on; `image_size` must equal the ViT's input size).
    `verify`: reload the written directory and check it against `model` (verify_hf_clip) before it
    replaces `out_dir` (max differences in export_check.json); a mismatch raises ValueError and leaves
    the previous directory.
    """
    from transformers import CLIPModel

    pp = open_clip.get_model_preprocess_cfg(model)
    config = hf_clip_config(model)
    size = int(image_size if image_size is not None else config.vision_config.image_size)
    if size != config.vision_config.image_size:
        raise ValueError(f"image_size {size} differs from the ViT input size {config.vision_config.image_size}")
    hf_model = CLIPModel(config)
    hf_model.load_state_dict(hf_clip_state_dict(model, config), strict=True)  # every HF key filled
    processor = hf_image_processor(
        size,
        mean if mean is not None else pp["mean"],
        std if std is not None else pp["std"],
        interpolation=pp.get("interpolation", "bicubic"),
        resize_mode=pp.get("resize_mode", "shortest"),
    )
    with staged_dir(out_dir) as tmp:
        hf_model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if verify:
            atomic_write_json(tmp / EXPORT_CHECK, {"max_abs_diff": verify_hf_clip(model, tmp, rel_tol=CHECK_REL_TOL),
                                                   "rel_tol": CHECK_REL_TOL})
    return Path(out_dir)
