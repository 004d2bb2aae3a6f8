"""Stage-1 method registry: a method is a set of defaults (views, fusion weight, losses).

`METHODS[name]` is a `MethodSpec` (image views are not the method's: every method trains on the
`stage1.augment` policy, see `augment`); `register_method(name, spec)` adds one (the `siglip` entry
below is the example of a one-entry addition). `resolve(cfg)` fills the config's `None` knobs
(`image_views`, `text_views`, `fusion_lambda`, `fusion_width`) from the method's defaults and
checks the combination. The fusion head (and its loss) exists iff the resolved λ > 0, which needs
at least two fused vectors per sample (V·W ≥ 2).

Text views: with W > 1 the text views are sub-descriptions of the caption even if the method
default is "caption" (W identical captions would be the same view W times).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from pipeline.schema import ConfigError

from .losses import ClipLoss, SigLipLoss

TEXT_VIEW_KINDS = ("caption", "subdescriptions")


@dataclass(frozen=True)
class MethodSpec:
    image_views: int
    text_views: int
    fusion_lambda: float
    text_view_kind: str = "caption"
    pair_loss: type[nn.Module] = ClipLoss  # built as pair_loss(rank=, world_size=)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra open_clip model kwargs
    description: str = ""

    def __post_init__(self):
        if self.text_view_kind not in TEXT_VIEW_KINDS:
            raise ValueError(f"text_view_kind must be one of {TEXT_VIEW_KINDS}, got {self.text_view_kind!r}")
        if self.image_views < 1 or self.text_views < 1 or self.fusion_lambda < 0:
            raise ValueError("image_views and text_views must be >= 1 and fusion_lambda >= 0")
        object.__setattr__(self, "model_kwargs", MappingProxyType(dict(self.model_kwargs)))


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, spec: MethodSpec) -> None:
    """Add (or replace) a method; the name becomes valid for `stage1.method`."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method({name!r}): expected a MethodSpec, got {type(spec).__name__}")
    METHODS[name] = spec


register_method("clip", MethodSpec(1, 1, 0.0, description="CLIP baseline"))
register_method("ito", MethodSpec(2, 1, 2.0, description="ITO: 2 image views + training-time fusion"))
register_method("ma", MethodSpec(2, 1, 0.0, description="multiple alignment only: ITO with fusion_lambda=0"))
register_method(
    "ito_sub2",
    MethodSpec(2, 2, 2.0, text_view_kind="subdescriptions", description="ITO with 2 sub-description text views"),
)
register_method(
    "siglip",
    MethodSpec(
        1,
        1,
        0.0,
        pair_loss=SigLipLoss,
        model_kwargs={"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0},
        description="SigLIP sigmoid loss (open_clip's SigLipLoss)",
    ),
)


@dataclass(frozen=True)
class ResolvedMethod:
    name: str
    image_views: int
    text_views: int
    fusion_lambda: float
    text_view_kind: str
    pair_loss: type[nn.Module]
    model_kwargs: Mapping[str, Any]
    fusion_depth: int
    fusion_width: int | None  # None: the text tower width (known once the model exists)
    fusion_heads: int

    @property
    def use_fusion(self) -> bool:
        return self.fusion_lambda > 0


def resolve(cfg: Any, prefix: str = "stage1") -> ResolvedMethod:
    """Method defaults overlaid by the config's explicit values (`cfg` is a Stage1Config)."""
    spec = METHODS.get(cfg.method)
    if spec is None:
        raise ConfigError(f"{prefix}.method: unknown method {cfg.method!r}; known: {', '.join(sorted(METHODS))}")
    v = spec.image_views if cfg.image_views is None else int(cfg.image_views)
    w = spec.text_views if cfg.text_views is None else int(cfg.text_views)
    lam = spec.fusion_lambda if cfg.fusion_lambda is None else float(cfg.fusion_lambda)
    if lam > 0 and v * w < 2:
        raise ConfigError(
            f"{prefix}.fusion_lambda: fusion (lambda={lam}) needs at least 2 views per sample "
            f"(image_views*text_views >= 2), got image_views={v}, text_views={w}"
        )
    kind = "subdescriptions" if w > 1 else spec.text_view_kind
    return ResolvedMethod(
        name=cfg.method,
        image_views=v,
        text_views=w,
        fusion_lambda=lam,
        text_view_kind=kind,
        pair_loss=spec.pair_loss,
        model_kwargs=spec.model_kwargs,
        fusion_depth=int(cfg.fusion_depth),
        fusion_width=None if cfg.fusion_width is None else int(cfg.fusion_width),
        fusion_heads=int(cfg.fusion_heads),
    )
