"""Assemble, save and reload the stage-2 model: transformers' native `LlavaForConditionalGeneration`.

`build_llava` loads the vision tower and the language model through the registries, builds the LLaVA
skeleton on the meta device and moves the loaded modules into it (no copy, no second random init of a
7B LM): `model.model.vision_tower` is the tower (CLIPVisionModel, SiglipVisionModel, Dinov2Model, ...),
`model.model.language_model` the LM's decoder and `model.lm_head` its output layer; only the projector is
freshly initialised (seeded). The config is LLaVA-1.5's: features of block `vision_feature_layer` (-2), patch
tokens only (the "default" strategy drops CLIP's and DINOv2's CLS; SigLIP has none: "full"; see
stage2_llava.towers), projector bias, GELU. `config.ito_mllm["tower"]` records the tower's source, family,
parameter count, input size and image-token count. "<image>" is registered in the tokenizer
(preprocess.prepare_tokenizer) and the embeddings are resized with the new rows set to the mean of the old
ones, as LLaVA does.

The processor is a `LlavaProcessor` whose `LlavaImageProcessor` pads to a square with the image-mean
colour (LLaVA's expand2square: `tuple(int(x*255) for x in image_mean)`, image centred), resizes and crops as
the tower's own processor does (resample filter, shortest edge or fixed size, centre crop) and normalises with
its mean/std; its tokenizer and the processor carry the vicuna_v1 chat template (lmms-eval's llava_hf applies
the tokenizer's).

`save_llava` writes `save_pretrained` (safetensors) + the processor + `ito_mllm.json` into a temporary
sibling directory and renames it into place. With `mlp2x_gelu` (default) the directory is a plain HF
LLaVA that `LlavaForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained` and
lmms-eval load. `linear` / `mlpNx_gelu` are for experiments: from_pretrained would rebuild the default
projector, so those directories must be loaded with `load_llava`, which reads the projector from
`ito_mllm.json` (also kept in config.json as `ito_mllm`).

`supervised_loss` is the HF causal-LM loss computed only at supervised positions: with a 32k vocabulary
the all-position logits dominate CPU time (stage2_llava.demo_lm gives the measurements).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from common.io import InputError, atomic_write_json, read_json, require_safetensors, staged_dir
from stage2_llava.conversation import DEFAULT_IMAGE_TOKEN, get_template
from stage2_llava.preprocess import IGNORE_INDEX, prepare_tokenizer
from stage2_llava.projectors import DEFAULT_PROJECTOR, build_projector, is_native, projector_builder
from stage2_llava.registry import VisionTower, load_language_model, load_vision_tower

log = logging.getLogger(__name__)

INFO_FILE = "ito_mllm.json"
INFO_VERSION = 1
CHAT_TEMPLATE = "vicuna_v1"
PHASES = ("pretrain", "finetune")


def num_image_tokens(model_or_config) -> int:
    """Image placeholder tokens per image: the tower's recorded count (stage2_llava.towers.VisionTower.image_tokens),
    else LLaVA-1.5's CLIP rule (image_size / patch)^2 (+1 with the "full" strategy) for directories without it."""
    cfg = getattr(model_or_config, "config", model_or_config)
    tower = (getattr(cfg, "ito_mllm", None) or {}).get("tower") or {}
    if "image_tokens" in tower:
        return int(tower["image_tokens"])
    v = cfg.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + 1 if cfg.vision_feature_select_strategy == "full" else n


def make_processor(tower: VisionTower, tokenizer, chat_template: str | None = None):
    """LlavaProcessor: pad-to-square (mean colour) + the tower's own resize/crop/normalisation, tokenizer, chat template.

    The token count follows the tower's feature convention (strategy, leading tokens), so the processor expands
    "<image>" to exactly as many tokens as LlavaModel.get_image_features returns.
    """
    from transformers import LlavaImageProcessor, LlavaProcessor

    side = {"height": tower.image_size, "width": tower.image_size}
    resize = dict(tower.resize) or {"shortest_edge": tower.image_size}
    crop = tower.crop or (side if "shortest_edge" in resize else None)
    image_processor = LlavaImageProcessor(
        do_pad=True, do_resize=True, size=resize, resample=tower.resample, do_center_crop=crop is not None,
        crop_size=crop or side, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=tower.image_mean, image_std=tower.image_std, do_convert_rgb=True,
    )
    if chat_template is None:
        chat_template = get_template(CHAT_TEMPLATE, eos_token=tokenizer.eos_token).chat_template
    tokenizer.chat_template = chat_template
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=tower.patch_size,
        vision_feature_select_strategy=tower.select_strategy, num_additional_image_tokens=tower.prefix_tokens,
        chat_template=chat_template, image_token=DEFAULT_IMAGE_TOKEN,
    )


def _resize_embeddings(model, tokenizer, old_len: int) -> None:
    """Grow the vocabulary to the tokenizer; rows of tokens added since `old_len` = mean of the earlier rows."""
    vocab = model.get_input_embeddings().weight.shape[0]
    new_len = len(tokenizer)
    if new_len > vocab:
        model.resize_token_embeddings(new_len, mean_resizing=False)
    if new_len <= old_len:
        return
    with torch.no_grad():
        for emb in {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            emb[old_len:new_len] = emb[:old_len].mean(dim=0, keepdim=True)


def _check_feature_layer(layer: int, num_layers: int) -> None:
    # hidden_states holds the embeddings plus one entry per block: num_layers + 1 items
    if not -(num_layers + 1) <= layer <= num_layers:
        raise InputError(f"stage2.vision_feature_layer: {layer} is outside the tower's {num_layers + 1} hidden "
                         f"states, expected {-(num_layers + 1)}..{num_layers}")


def _generation_config(lm_model, tokenizer):
    from transformers import GenerationConfig

    source = getattr(lm_model, "generation_config", None)
    gen = GenerationConfig.from_dict(source.to_dict()) if source is not None else GenerationConfig()
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    return gen


def build_llava(
    vision_tower: str | os.PathLike,
    language_model: str | os.PathLike,
    projector: str = DEFAULT_PROJECTOR,
    vision_feature_layer: int | None = None,
    *,
    model_max_length: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """(LlavaForConditionalGeneration, LlavaProcessor) from a tower spec, an LM spec and a projector name.

    vision_feature_layer: None takes the tower family's convention (stage2_llava.towers; -2 for every registered
    family). seed: the projector's initialisation. The model is returned in eval mode with every parameter
    trainable; call set_trainable for a phase.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    projector_builder(projector)  # fail on a bad name before loading anything
    tower = load_vision_tower(vision_tower, dtype=dtype)
    if vision_feature_layer is None:
        vision_feature_layer = tower.feature_layer
    _check_feature_layer(vision_feature_layer, tower.model.config.num_hidden_layers)
    lm = load_language_model(language_model, dtype=dtype)
    tokenizer = lm.tokenizer
    old_len = len(tokenizer)
    image_token_id = prepare_tokenizer(tokenizer)
    tokenizer.model_max_length = model_max_length
    max_pos = getattr(lm.model.config, "max_position_embeddings", None)
    if max_pos is not None and model_max_length > max_pos:
        log.warning("stage2.model_max_length=%d exceeds the LM's max_position_embeddings=%d (%s)",
                    model_max_length, max_pos, lm.source.name)

    config = LlavaConfig(
        vision_config=tower.model.config, text_config=lm.model.config, image_token_index=image_token_id,
        projector_hidden_act="gelu", vision_feature_select_strategy=tower.select_strategy,
        vision_feature_layer=vision_feature_layer, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.model.config, "tie_word_embeddings", False)),
    )
    config.image_seq_length = tower.image_tokens
    config.ito_mllm = {"projector": projector, "vision_tower": tower.source, "language_model": lm.source.name,
                       "language_model_path": str(Path(lm.source.path).resolve()), "language_model_kind": lm.source.kind,
                       "tower": tower.info(vision_feature_layer)}
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    decoder = lm.model.get_decoder()
    for want, got in ((model.model.vision_tower, tower.model), (model.model.language_model, decoder)):
        if type(want) is not type(got):
            raise InputError(f"{lm.source.path}: LLaVA builds a {type(want).__name__} from this config but the "
                             f"loaded model has a {type(got).__name__}, expected a Llama-family causal LM")
    model.model.vision_tower = tower.model
    model.model.language_model = decoder
    model.lm_head = lm.model.get_output_embeddings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.model.multi_modal_projector = build_projector(projector, config).to(dtype)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"assembled LLaVA still has meta tensors: {meta[:5]}")
    _resize_embeddings(model, tokenizer, old_len)
    model.generation_config = _generation_config(lm.model, tokenizer)
    model.eval()
    return model, make_processor(tower, tokenizer)


def save_llava(model, processor, out_dir: str | os.PathLike, *, state_dict: dict | None = None) -> Path:
    """Atomically write model (safetensors) + processor + ito_mllm.json to `out_dir`; returns the path.

    state_dict: the full weights when `model` holds only a shard of them (DeepSpeed ZeRO-3: pass
    accelerator.get_state_dict(model)); None saves model's own.
    """
    info = {"version": INFO_VERSION, **getattr(model.config, "ito_mllm", {"projector": DEFAULT_PROJECTOR}),
            "image_token_id": model.config.image_token_id, "num_image_tokens": num_image_tokens(model),
            "vision_feature_layer": model.config.vision_feature_layer, "chat_template": CHAT_TEMPLATE}
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        processor.save_pretrained(str(tmp))
        atomic_write_json(tmp / INFO_FILE, info)
    return Path(out_dir)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        if not (path / name).is_file():
            raise InputError(f"{path / name}: not found, expected the saved LLaVA weights")
        state.update(load_file(str(path / name)))
    return state


def load_llava(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """(model, processor) from a save_llava directory, rebuilding a non-default projector from ito_mllm.json."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    path = Path(path)
    info_file = path / INFO_FILE
    projector = read_json(info_file).get("projector", DEFAULT_PROJECTOR) if info_file.is_file() else DEFAULT_PROJECTOR
    projector_builder(projector)
    require_safetensors(path)
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    if is_native(projector):
        model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                              use_safetensors=True)
        return model, processor
    # from_pretrained loads everything but our projector (its keys are "unexpected" there); swap it in after
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                              use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    # transformers 5 writes LLaVA with its legacy key layout ("multi_modal_projector.*"); accept both
    state = {}
    for key, value in _read_state(path).items():
        for prefix in ("model.multi_modal_projector.", "multi_modal_projector."):
            if key.startswith(prefix):
                state[key[len(prefix):]] = value
    module = build_projector(projector, model.config).to(dtype)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{path}: projector weights do not match {projector!r} from {INFO_FILE} "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    model.model.multi_modal_projector = module
    model.eval()
    return model, processor


def set_trainable(model, phase: str) -> dict[str, tuple[int, int]]:
    """Freeze for a phase; returns {"vision_tower"|"projector"|"language_model": (trainable, total) params}.

    pretrain: the projector only; finetune: projector + LM (decoder, embeddings, lm_head). The tower is
    always frozen. Tied weights count once.
    """
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}, expected one of {PHASES}")
    groups = {
        "vision_tower": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "language_model": [model.model.language_model, model.lm_head],
    }
    train = {"vision_tower": False, "projector": True, "language_model": phase == "finetune"}
    counts = {}
    for name, modules in groups.items():
        params = {id(p): p for m in modules for p in m.parameters()}.values()
        for p in params:
            p.requires_grad_(train[name])
        total = sum(p.numel() for p in params)
        counts[name] = (total if train[name] else 0, total)
    return counts


def supervised_loss(model, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None, **inputs):
    """HF's causal-LM loss (next-token CE, mean over labels != -100) with logits only where labels are set.

    `inputs` go to the LlavaModel (`model.model`): input_ids, attention_mask, pixel_values, or inputs_embeds /
    mm_encoder_outputs. num_items_in_batch: divide the summed loss by it (gradient accumulation over
    micro-batches, as HF does) instead of by this batch's supervised-token count.
    Returns (loss, number of supervised tokens in this batch).
    """
    hidden = model.model(**inputs).last_hidden_state
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    n = int(keep.sum())
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
    return loss / denom, n
