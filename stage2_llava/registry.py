"""Registries that turn stage-2 config strings into vision towers and language models (prismatic-vlms style).

Vision towers (`stage2.vision_tower`) live in stage2_llava.towers (`TOWER_SOURCES`, re-exported here as
`VISION_TOWERS`, and the families CLIP, SigLIP, DINOv2 dispatched by config class); `load_vision_tower` loads
a local HF directory spec.

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

from common.io import InputError, require_safetensors
from stage2_llava.demo_lm import is_demo_lm
from stage2_llava.projectors import PROJECTORS, build_projector, projector_builder
from stage2_llava.towers import TOWER_SOURCES, VisionTower, load_hf_tower, load_tower, parse_tower_spec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__all__ = [
    "LANGUAGE_MODELS", "LM_LOADERS", "MODELS_ENV", "PROJECTORS", "VISION_TOWERS", "LanguageModel", "LMSource",
    "VisionTower", "build_projector", "from_pretrained_complete", "load_hf_clip", "load_hf_tower", "load_language_model",
    "load_vision_tower",
    "projector_builder", "resolve_language_model", "resolve_vision_tower",
]

MODELS_ENV = "ITO_MLLM_MODELS"
VISION_TOWERS = TOWER_SOURCES
load_hf_clip = load_hf_tower  # its earlier name: any registered family now, CLIP included


def from_pretrained_complete(cls, path: Path, **kwargs):
    """cls.from_pretrained without transformers' load report; a weight missing from the files is an error.

    A CLIPModel/SiglipModel directory has text-tower weights a vision model does not use ("unexpected": fine);
    a missing weight would be silently random-initialised.
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


# ---------------------------------------------------------------- vision towers (stage2_llava.towers)


def resolve_vision_tower(spec: str | os.PathLike) -> tuple[str, Path | None]:
    """(source kind, path) of a tower spec; see stage2_llava.towers.parse_tower_spec."""
    parsed = parse_tower_spec(spec)
    return parsed.kind, parsed.path


def load_vision_tower(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> VisionTower:
    return load_tower(spec, dtype=dtype)


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
        model = from_pretrained_complete(AutoModelForCausalLM, path, dtype=dtype, use_safetensors=True)
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
