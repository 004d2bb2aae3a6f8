"""Registries that turn stage-2 config strings into vision towers and language models (prismatic-vlms style).

Vision towers (`stage2.vision_tower`): `VISION_TOWERS` maps a source kind to a loader. The only kind is
`hf_clip`, a Hugging Face CLIP directory (CLIPModel or CLIPVisionModel checkpoint, plus the image
processor the tower was trained with), loaded as a `CLIPVisionModel`. A spec is `KIND:PATH` or a bare
PATH whose config.json `model_type` is "clip" or "clip_vision_model".

Language models (`stage2.language_model`): `LANGUAGE_MODELS` maps registered names to resolvers that
return an `LMSource`; any other spec is a path: a `.gguf` file (transformers' GGUF loader, dequantised
to `dtype`) or an HF causal-LM directory with config.json (AutoModelForCausalLM, safetensors only,
no remote code). Registered: `vicuna-7b-v1.5` (`$ITO_MLLM_MODELS/vicuna-7b-v1.5`; nothing is ever
downloaded). Selection is by the exact config string, never by parts of model names. The demo LMs
(`demo-llama`, `demo-llama-tiny`, stage2_llava.demo_lm) are not loaded by name: they are built from a text
corpus first (stage2_llava.stage.build_demo_lm, which the chain calls) and passed here as a directory.

Projectors live in stage2_llava.projectors (`PROJECTORS`, re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.io import InputError, read_json, require_safetensors
from stage2_llava.demo_lm import is_demo_lm
from stage2_llava.projectors import PROJECTORS, build_projector, projector_builder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__all__ = [
    "LANGUAGE_MODELS", "LM_LOADERS", "MODELS_ENV", "PROJECTORS", "VISION_TOWERS", "LanguageModel", "LMSource",
    "VisionTower", "build_projector", "load_language_model", "load_vision_tower", "projector_builder",
    "resolve_language_model", "resolve_vision_tower",
]

MODELS_ENV = "ITO_MLLM_MODELS"
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


def _from_pretrained(cls, path: Path, **kwargs):
    """cls.from_pretrained without transformers' load report; a weight missing from the files is an error.

    A CLIPModel directory has text-tower weights a CLIPVisionModel does not use ("unexpected": fine); a
    missing weight would be silently random-initialised.
    """
    from transformers.utils import logging as hf_logging

    require_safetensors(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, local_files_only=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if bad:
        raise InputError(f"{path}: weights missing or of the wrong shape for {cls.__name__}: {sorted(bad)[:5]}, "
                         "expected a complete checkpoint")
    return model


# ---------------------------------------------------------------- vision towers


@dataclass
class VisionTower:
    model: Any  # transformers CLIPVisionModel
    image_size: int
    patch_size: int
    image_mean: list[float]
    image_std: list[float]
    resample: Any  # PILImageResampling of the tower's own processor
    source: str  # "hf_clip:/abs/path"


def _processor_size(ip, path: Path) -> int:
    box = ip.crop_size if getattr(ip, "do_center_crop", False) and ip.crop_size else ip.size
    box = dict(box)
    if "height" in box and box.get("height") == box.get("width"):
        return int(box["height"])
    if "shortest_edge" in box:
        return int(box["shortest_edge"])
    raise InputError(f"{path}/preprocessor_config.json: image size {box} is not square, expected a square tower input")


def load_hf_clip(path: Path, *, dtype: torch.dtype = torch.float32) -> VisionTower:
    """A CLIP vision tower and its normalisation from an HF CLIP directory."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    if not (path / "preprocessor_config.json").is_file():
        raise InputError(f"{path}: no preprocessor_config.json, expected the CLIP image processor the tower was "
                         "trained with (its mean/std/size)")
    model = _from_pretrained(CLIPVisionModel, path, dtype=dtype, use_safetensors=True)
    ip = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    cfg = model.config
    size = _processor_size(ip, path)
    if size != cfg.image_size:
        raise InputError(f"{path}/preprocessor_config.json: image size {size} differs from the tower's "
                         f"image_size {cfg.image_size}, expected them equal")
    model.eval()
    return VisionTower(
        model=model, image_size=int(cfg.image_size), patch_size=int(cfg.patch_size),
        image_mean=[float(x) for x in ip.image_mean], image_std=[float(x) for x in ip.image_std],
        resample=ip.resample, source=f"hf_clip:{path.resolve()}",
    )


VISION_TOWERS: dict[str, Callable[..., VisionTower]] = {"hf_clip": load_hf_clip}


def resolve_vision_tower(spec: str | os.PathLike) -> tuple[str, Path]:
    """(kind, path) for a tower spec `KIND:PATH` or a CLIP directory PATH."""
    text = str(spec)
    if not text:
        raise InputError("stage2.vision_tower: empty, expected an HF CLIP directory (or hf_clip:DIR)")
    kind, sep, rest = text.partition(":")
    if sep and kind in VISION_TOWERS:
        path = Path(rest)
    else:
        kind, path = "", Path(text)
    config = path / "config.json"
    if not config.is_file():
        raise InputError(f"stage2.vision_tower: {config} not found, expected an HF CLIP directory")
    if not kind:
        model_type = read_json(config).get("model_type")
        if model_type not in CLIP_MODEL_TYPES:
            raise InputError(f"{config}: model_type {model_type!r}, expected one of {CLIP_MODEL_TYPES} "
                             f"(vision tower kinds: {sorted(VISION_TOWERS)})")
        kind = "hf_clip"
    return kind, path


def load_vision_tower(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> VisionTower:
    kind, path = resolve_vision_tower(spec)
    return VISION_TOWERS[kind](path, dtype=dtype)


# ---------------------------------------------------------------- language models


@dataclass(frozen=True)
class LMSource:
    kind: str  # a key of LM_LOADERS
    path: Path  # HF directory or .gguf file
    name: str  # the spec it came from


@dataclass
class LanguageModel:
    model: Any  # a *ForCausalLM with get_decoder() / get_output_embeddings()
    tokenizer: Any
    source: LMSource


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer, LlamaTokenizer

    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if (path / "tokenizer.model").is_file():
        # AutoTokenizer on a bare tokenizer.model gives a generic backend that drops the "▁" prefix
        return LlamaTokenizer.from_pretrained(str(path), local_files_only=True)
    raise InputError(f"{path}: no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model), "
                     "expected the language model's tokenizer next to its weights")


def _load_hf_dir(path: Path, *, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError) as e:
        raise InputError(f"{path}/config.json: not a config transformers knows without remote code ({e})") from None
    try:
        model = _from_pretrained(AutoModelForCausalLM, path, dtype=dtype, use_safetensors=True)
    except OSError as e:
        raise InputError(f"{path}: cannot load safetensors weights ({e}), expected model*.safetensors") from None
    return model, _load_tokenizer(path)


def _load_gguf(path: Path, *, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 local_files_only=True)
    # weights are dequantised on load; a kept quantization_config would make the saved LLaVA claim GGUF
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model, tokenizer


LM_LOADERS: dict[str, Callable[..., tuple[Any, Any]]] = {"hf_dir": _load_hf_dir, "gguf": _load_gguf}


def _local(name: str) -> Callable[[], LMSource]:
    def resolve() -> LMSource:
        root = os.environ.get(MODELS_ENV, "")
        if not root:
            raise InputError(f"language model {name!r}: set {MODELS_ENV} to a directory holding {name}/ "
                             "(a local HF copy; nothing is downloaded)")
        path = Path(root) / name
        if not (path / "config.json").is_file():
            raise InputError(f"language model {name!r}: {path / 'config.json'} not found, expected the HF model "
                             f"directory {name}/ under {MODELS_ENV}={root}")
        return LMSource("hf_dir", path, name)

    return resolve


LANGUAGE_MODELS: dict[str, Callable[[], LMSource]] = {
    "vicuna-7b-v1.5": _local("vicuna-7b-v1.5"),
}


def resolve_language_model(spec: str | os.PathLike) -> LMSource:
    """The LMSource for a registered name, a .gguf file or an HF directory."""
    text = str(spec)
    if text in LANGUAGE_MODELS:
        return LANGUAGE_MODELS[text]()
    if is_demo_lm(text):
        raise InputError(f"stage2.language_model: {text!r} is a demo LM, built from a text corpus before stage 2 "
                         "(stage2_llava.stage.build_demo_lm; the chain does it): pass the directory it returns")
    path = Path(text)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return LMSource("gguf", path, text)
    if path.is_dir() and (path / "config.json").is_file():
        return LMSource("hf_dir", path, text)
    raise InputError(f"stage2.language_model: {text!r} is not a registered name ({', '.join(LANGUAGE_MODELS)}), "
                     "an HF model directory with config.json, or a .gguf file")


def load_language_model(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> LanguageModel:
    source = resolve_language_model(spec)
    model, tokenizer = LM_LOADERS[source.kind](source.path, dtype=dtype)
    if model.get_output_embeddings() is None:
        raise InputError(f"{source.path}: {type(model).__name__} has no output embeddings, expected a causal LM")
    model.eval()
    return LanguageModel(model=model, tokenizer=tokenizer, source=source)
