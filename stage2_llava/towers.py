"""Vision-tower registry for `stage2.vision_tower`: where a tower comes from, and how LLaVA reads its features.

Sources (`TOWER_SOURCES`, picked by the spec's `KIND:` prefix; a bare path is an `hf` directory):

| spec | source | stage 1 |
|---|---|---|
| empty or `stage1` | this run's stage-1 export (`RUN/stage1/hf_clip`; the default) | trains and exports |
| `hf:DIR` or `DIR` (`hf_clip:DIR`: older spelling) | a local Hugging Face vision model of a registered family | skipped |
| `open_clip:DIR` / `open_clip:ARCH:FILE.safetensors` | an open_clip checkpoint (a `local-dir:` model directory with `open_clip_config.json` + `open_clip_model.safetensors`, or a state dict of architecture ARCH), converted to an HF CLIP directory by stage 1's exporter and checked numerically against open_clip (the chain does this; `stage1_pretrain.external`) | skipped |

Families (`tower_families()`), dispatched by the transformers config class of the vision model (a CLIPModel or
SiglipModel directory contributes its `vision_config`), each with the convention of the MLLMs that use it:

| family | config class | leading tokens | LLaVA strategy | image tokens | layer |
|---|---|---|---|---|---|
| clip | CLIPVisionConfig | CLS | `default` (CLS dropped) | (S/p)^2 | -2 (LLaVA-1.5) |
| siglip | SiglipVisionConfig | none | `full` (nothing to drop) | (S/p)^2 | -2 (prismatic) |
| dinov2 | Dinov2Config | CLS | `default` (CLS dropped) | (S/p)^2 | -2 (prismatic) |
| dinov2_registers | Dinov2WithRegistersConfig | CLS + R registers | `full` | (S/p)^2 + 1 + R | -2 |

transformers' `LlavaModel.get_image_features` drops exactly one leading token ("default") or none ("full"); a
tower with CLS + registers therefore keeps all of them (prismatic drops them through timm; a stock HF LLaVA
cannot), and the tower info says so. `stage2.vision_feature_layer` empty (None) takes the family's layer.

The image processor comes from the tower's own `preprocessor_config.json`: mean/std, resample filter, resize
(shortest edge, or a fixed height x width as SigLIP's squash) and centre crop; the input side S is the crop (or
resize) side and must be a multiple of the patch. CLIP and SigLIP have position embeddings for
`config.image_size` only, so S must equal it; DINOv2 interpolates them (its processors crop 224 from a 518 px
config). LLaVA's pad-to-square is added per phase (assemble.make_processor, data.ImageLoader).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.io import InputError, require_safetensors

FAMILY_FEATURE_LAYER = -2  # LLaVA-1.5 for CLIP; prismatic's second-to-last block for SigLIP and DINOv2


@dataclass(frozen=True)
class TowerSource:
    kind: str
    runs_stage1: bool  # the chain trains and exports stage 1 to get this tower
    help: str


TOWER_SOURCES: dict[str, TowerSource] = {
    "stage1": TowerSource("stage1", True, "this run's stage-1 export (default)"),
    "hf": TowerSource("hf", False, "a local Hugging Face directory of a CLIP, SigLIP or DINOv2 vision model"),
    "open_clip": TowerSource("open_clip", False, "an open_clip checkpoint converted to HF CLIP (DIR or ARCH:FILE.safetensors)"),
}
SOURCE_ALIASES = {"hf_clip": "hf"}


@dataclass(frozen=True)
class TowerSpec:
    kind: str  # a key of TOWER_SOURCES
    path: Path | None
    arch: str | None = None  # open_clip architecture of a bare state-dict file
    text: str = ""

    @property
    def source(self) -> TowerSource:
        return TOWER_SOURCES[self.kind]


def parse_tower_spec(spec: str | os.PathLike | None) -> TowerSpec:
    """The TowerSpec of a `stage2.vision_tower` value (no file is read)."""
    text = str(spec or "").strip()
    if text in ("", "stage1"):
        return TowerSpec("stage1", None, None, "stage1")
    kind, sep, rest = text.partition(":")
    kind = SOURCE_ALIASES.get(kind, kind)
    if not sep or kind not in TOWER_SOURCES:
        return TowerSpec("hf", Path(text), None, text)
    if kind == "stage1" or not rest:
        raise InputError(f"stage2.vision_tower: {text!r}, expected `stage1` (no path), `hf:DIR`, `open_clip:DIR` "
                         "or `open_clip:ARCH:FILE.safetensors`")
    if kind == "open_clip" and ":" in rest:
        arch, _, file = rest.partition(":")
        return TowerSpec(kind, Path(file), arch, text)
    return TowerSpec(kind, Path(rest), None, text)


def is_external(spec: str | os.PathLike | None) -> bool:
    """True when the tower does not come from this run's stage 1 (the chain then skips stage 1)."""
    return not parse_tower_spec(spec).source.runs_stage1


# ---------------------------------------------------------------- families


@dataclass(frozen=True)
class TowerFamily:
    name: str
    model_class: type
    prefix_tokens: Callable[[Any], int]  # leading non-patch tokens in the tower's hidden states
    fixed_size: bool  # position embeddings only for config.image_size (no interpolation)
    feature_layer: int = FAMILY_FEATURE_LAYER
    note: str = ""


def tower_families() -> dict[type, TowerFamily]:
    """Registered vision-tower families, keyed by their transformers config class."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    return {
        CLIPVisionConfig: TowerFamily("clip", CLIPVisionModel, lambda c: 1, True, note="CLS dropped"),
        SiglipVisionConfig: TowerFamily("siglip", SiglipVisionModel, lambda c: 0, True, note="no CLS token"),
        Dinov2Config: TowerFamily("dinov2", Dinov2Model, lambda c: 1, False, note="CLS dropped"),
        Dinov2WithRegistersConfig: TowerFamily(
            "dinov2_registers", Dinov2WithRegistersModel, lambda c: 1 + int(c.num_register_tokens), False,
            note="CLS and registers kept: HF LLaVA drops at most one leading token"),
    }


def feature_selection(prefix_tokens: int) -> tuple[str, int]:
    """(LLaVA vision_feature_select_strategy, leading tokens kept) for a tower with `prefix_tokens` leading tokens."""
    return ("default", 0) if prefix_tokens == 1 else ("full", prefix_tokens)


@dataclass
class VisionTower:
    model: Any  # a transformers vision model of a registered family
    image_size: int  # input side S the processor produces
    patch_size: int
    image_mean: list[float]
    image_std: list[float]
    resample: Any  # PILImageResampling of the tower's own processor
    source: str  # "hf:/abs/path"
    family: str = "clip"
    resize: dict = field(default_factory=dict)  # the tower processor's resize ({"shortest_edge"} or height/width)
    crop: dict | None = None  # its centre crop, None when it does not crop
    prefix_tokens: int = 1
    feature_layer: int = FAMILY_FEATURE_LAYER

    @property
    def select_strategy(self) -> str:
        return feature_selection(self.prefix_tokens)[0]

    @property
    def image_tokens(self) -> int:
        """Features per image LLaVA inserts: patches plus the leading tokens its strategy keeps."""
        return (self.image_size // self.patch_size) ** 2 + feature_selection(self.prefix_tokens)[1]

    def info(self, feature_layer: int) -> dict:
        """What ito_mllm.json and the A/B report record about the tower."""
        return {"source": self.source, "family": self.family, "config_class": type(self.model.config).__name__,
                "params": sum(p.numel() for p in self.model.parameters()), "image_size": self.image_size,
                "patch_size": self.patch_size, "image_tokens": self.image_tokens, "feature_layer": feature_layer,
                "select_strategy": self.select_strategy, "leading_tokens": self.prefix_tokens,
                "leading_tokens_kept": feature_selection(self.prefix_tokens)[1]}


def _auto_config(path: Path):
    from transformers import AutoConfig

    config = path / "config.json"
    if not config.is_file():
        raise InputError(f"stage2.vision_tower: {config} not found, expected a Hugging Face vision model directory")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"{config}: not a config transformers knows without remote code "
                         f"({str(e).splitlines()[0]})") from None


def vision_config_of(path: Path) -> tuple[Any, TowerFamily]:
    """(vision config, family) of an HF directory, by config class; composite configs give their vision_config."""
    config = _auto_config(path)
    families = tower_families()
    for cfg in (config, getattr(config, "vision_config", None)):
        if cfg is not None and type(cfg) in families:
            return cfg, families[type(cfg)]
    names = ", ".join(f"{f.name} ({c.__name__})" for c, f in families.items())
    raise InputError(f"{path / 'config.json'}: model_type {getattr(config, 'model_type', None)!r} "
                     f"({type(config).__name__}) is not a registered vision tower family, expected one of {names}")


def _size(box) -> dict[str, int]:
    return {k: int(v) for k, v in dict(box or {}).items() if v is not None}


def processor_geometry(ip, path: Path) -> tuple[dict, dict | None, int]:
    """(resize, crop or None, input side) of a tower's image processor; the input must be square."""
    resize = _size(ip.size)
    crop = _size(ip.crop_size) if getattr(ip, "do_center_crop", False) and getattr(ip, "crop_size", None) else None
    box = crop or resize
    if box.get("height") and box.get("height") == box.get("width"):
        return resize, crop, box["height"]
    if "shortest_edge" in box and crop is None:
        return resize, crop, box["shortest_edge"]
    raise InputError(f"{path}/preprocessor_config.json: image size {box} is not square, expected a square tower input")


def load_hf_tower(path: Path, *, dtype: torch.dtype = torch.float32) -> VisionTower:
    """A vision tower, its feature convention and its image processor from a local HF directory."""
    from transformers import AutoImageProcessor

    from stage2_llava.registry import from_pretrained_complete

    vcfg, family = vision_config_of(path)
    if not (path / "preprocessor_config.json").is_file():
        raise InputError(f"{path}: no preprocessor_config.json, expected the image processor the tower was "
                         "trained with (its mean/std/size)")
    require_safetensors(path)
    model = from_pretrained_complete(family.model_class, path, dtype=dtype, use_safetensors=True)
    ip = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    resize, crop, side = processor_geometry(ip, path)
    patch = int(vcfg.patch_size)
    if family.fixed_size and side != int(vcfg.image_size):
        raise InputError(f"{path}/preprocessor_config.json: image size {side} differs from the tower's "
                         f"image_size {vcfg.image_size}, expected them equal")
    if side % patch:
        raise InputError(f"{path}/preprocessor_config.json: image size {side} is not a multiple of the patch size "
                         f"{patch}, expected whole patches")
    model.eval()
    return VisionTower(
        model=model, image_size=side, patch_size=patch, image_mean=[float(x) for x in ip.image_mean],
        image_std=[float(x) for x in ip.image_std], resample=ip.resample, source=f"hf:{path.resolve()}",
        family=family.name, resize=resize, crop=crop, prefix_tokens=family.prefix_tokens(vcfg),
        feature_layer=family.feature_layer,
    )


def load_tower(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> VisionTower:
    """The tower of a spec that names a directory (`hf:DIR` or DIR); other sources are resolved by the chain."""
    parsed = parse_tower_spec(spec)
    if parsed.kind == "stage1":
        raise InputError("stage2.vision_tower: the run's stage-1 export is resolved by the chain (ito-mllm run / "
                         "stage2 pretrain --run-dir); directly, pass its directory RUN/stage1/hf_clip")
    if parsed.kind == "open_clip":
        raise InputError(f"stage2.vision_tower: {parsed.text!r} is converted to an HF CLIP directory by the chain "
                         "(ito-mllm run / stage2 pretrain); directly, convert it with "
                         "stage1_pretrain.external.convert_to_hf and pass that directory")
    return load_hf_tower(parsed.path, dtype=dtype)
