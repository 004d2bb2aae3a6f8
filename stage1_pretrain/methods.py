"""Stage-1 method registry: a method is a set of defaults (views, fusion weight, losses).

`METHODS[name]` is a `MethodSpec` (image views are not the method's: every method trains on the
`stage1.augment` policy, see `augment`); `register_method(name, spec)` adds one (the `siglip` entry
below is the example of a one-entry addition). `resolve(cfg)` fills the config's `None` knobs
(`image_views`, `text_views`, `fusion_lambda`, `fusion_width`, `ssl_scale`, `ssl_augment`) from the
method's defaults and checks the combination. The fusion head (and its loss) exists iff the resolved
λ > 0, which needs at least two fused vectors per sample (V·W ≥ 2).

A method's image-text objective (`alignment`) is "pairwise" (the pair loss averaged over the V×W
view pairs, `losses.MultiAlignmentLoss`) or "flair" (FLAIR's text-conditioned pooling and its two
sigmoid losses, `losses.FlairLoss`; one image view, the W text views are its K sub-captions). Any
method may add SLIP's SSL branch: with `ssl_scale` > 0 the loader appends two extra image views
drawn with the `ssl_augment` policy, and a SimCLR loss through an MLP head joins the total.

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

from common.schema import ConfigError

from .losses import ClipLoss, SigLipLoss

TEXT_VIEW_KINDS = ("caption", "subdescriptions")
ALIGNMENTS = ("pairwise", "flair")
SSL_VIEWS = 2  # SimCLR's two augmented views per image
SSL_MLP_MAX, SSL_MLP_PER_WIDTH = 4096, 16  # default SSL hidden width: min(4096, 16 x image tower width)


@dataclass(frozen=True)
class MethodSpec:
    image_views: int
    text_views: int
    fusion_lambda: float
    text_view_kind: str = "caption"
    pair_loss: type[nn.Module] = ClipLoss  # built as pair_loss(rank=, world_size=)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra open_clip model kwargs
    description: str = ""
    alignment: str = "pairwise"  # or "flair"
    ssl_scale: float = 0.0  # > 0: SLIP's SSL branch on SSL_VIEWS extra image views
    ssl_augment: str = "simclr"  # augmentation policy of those views

    def __post_init__(self):
        if self.text_view_kind not in TEXT_VIEW_KINDS:
            raise ValueError(f"text_view_kind must be one of {TEXT_VIEW_KINDS}, got {self.text_view_kind!r}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if self.image_views < 1 or self.text_views < 1 or self.fusion_lambda < 0 or self.ssl_scale < 0:
            raise ValueError("image_views and text_views must be >= 1, fusion_lambda and ssl_scale >= 0")
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
register_method(
    "slip",
    MethodSpec(1, 1, 0.0, ssl_scale=1.0, ssl_augment="simclr",
               description="SLIP: CLIP + SimCLR loss (ssl_scale 1, temperature 0.1) on 2 simclr views through an MLP head"),
)
register_method(
    "flair",
    MethodSpec(
        1,
        8,
        0.0,
        text_view_kind="subdescriptions",
        alignment="flair",
        model_kwargs={"init_logit_bias": -10.0},  # FLAIR's ViT-B-16-FLAIR config; logit scale keeps CLIP's 1/0.07
        description="FLAIR: text-conditioned attention pooling over K=8 sub-captions, (L_tcs + L_mps) / 2",
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
    alignment: str = "pairwise"
    ssl_scale: float = 0.0
    ssl_augment: str = "simclr"
    ssl_temperature: float = 0.1
    ssl_mlp_dim: int | None = None  # None: ssl_hidden_width(image tower width)
    ssl_emb_dim: int = 256
    flair_negatives: str = "sampled"
    flair_pool_heads: int = 8

    @property
    def use_fusion(self) -> bool:
        return self.fusion_lambda > 0

    @property
    def use_ssl(self) -> bool:
        return self.ssl_scale > 0

    @property
    def ssl_views(self) -> int:
        """Extra image views the loader appends after the V alignment views."""
        return SSL_VIEWS if self.use_ssl else 0

    def ssl_hidden_width(self, image_width: int) -> int:
        return self.ssl_mlp_dim or min(SSL_MLP_MAX, SSL_MLP_PER_WIDTH * int(image_width))


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
    if spec.alignment == "flair" and v != 1:
        raise ConfigError(f"{prefix}.image_views: method {cfg.method!r} (FLAIR alignment) uses 1 image view, got {v}")
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
        alignment=spec.alignment,
        ssl_scale=spec.ssl_scale if cfg.ssl_scale is None else float(cfg.ssl_scale),
        ssl_augment=cfg.ssl_augment or spec.ssl_augment,
        ssl_temperature=float(cfg.ssl_temperature),
        ssl_mlp_dim=None if cfg.ssl_mlp_dim is None else int(cfg.ssl_mlp_dim),
        ssl_emb_dim=int(cfg.ssl_emb_dim),
        flair_negatives=str(cfg.flair_negatives),
        flair_pool_heads=int(cfg.flair_pool_heads),
    )
