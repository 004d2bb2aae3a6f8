"""The stage-1 task object: the open_clip model plus the training-only parts (heads, losses).

`Stage1Task.forward(images [N, V + S, 3, H, W], texts [N, W, L])` encodes every view in one call per
tower (views folded into the batch), then computes

    L = L_align + λ · L_fuse + ssl_scale · L_ssl

L_align is the method's image-text objective: multiple alignment over the V×W view pairs with its
pair loss (`pairwise`), or FLAIR's ½(L_tcs + L_mps) over the W sub-captions with its
text-conditioned pooling head (`flair`); L_fuse is ITO's fusion loss over all N·V·W fused vectors
(when λ > 0); L_ssl is SLIP's SimCLR loss on the S = 2 extra SSL views through its MLP head (when
ssl_scale > 0; the SSL views are the last S image views). `inference_model()` is the bare
open_clip model, which is all that is exported: the fusion head, FLAIR's pooling head and SLIP's
SSL head (and the fusion temperature) stay in the training checkpoints only. In a distributed run
build the task with its `rank`/`world_size`; the losses gather embeddings across ranks with
gradients (see `losses`). Call `clamp_logit_scales()` after each optimizer step, as open_clip's
training loop clamps its logit scale (1/τ ≤ 100).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.schema import ConfigError

from . import models
from .fusion import FusionHead
from .heads import SslHead, TextConditionedPool
from .losses import (
    LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    FlairLoss,
    FusionLoss,
    MultiAlignmentLoss,
    SimClrLoss,
    sample_ids,
)
from .methods import ResolvedMethod, resolve


@dataclass
class _Encoded:
    image: torch.Tensor  # [N, V + S, D] L2-normalised
    image_tokens: torch.Tensor | None  # [N, V + S, 1 + P, image width]
    text: torch.Tensor  # [N, W, D] projected, not normalised
    text_tokens: models.TextTokens | None  # fusion only


class Stage1Task(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        method: ResolvedMethod,
        *,
        rank: int = 0,
        world_size: int = 1,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.model = model
        self.method = method
        self.fusion: FusionHead | None = None
        self.fusion_logit_scale: nn.Parameter | None = None
        self.fusion_loss: FusionLoss | None = None
        self.flair_pool: TextConditionedPool | None = None
        self.ssl_head: SslHead | None = None
        self.ssl_loss: SimClrLoss | None = None
        if method.use_fusion or method.use_ssl or method.alignment == "flair":
            models.check_token_support(model)
        dims = models.tower_dims(model)
        if method.alignment == "flair":
            if dims.embed_dim % method.flair_pool_heads:
                raise ConfigError(f"stage1.flair_pool_heads: the joint embedding width {dims.embed_dim} is not "
                                  f"divisible by flair_pool_heads={method.flair_pool_heads}")
            self.alignment = FlairLoss(method.flair_negatives, rank=rank, world_size=world_size)
            self.flair_pool = TextConditionedPool(dims.embed_dim, method.flair_pool_heads)
        else:
            self.alignment = MultiAlignmentLoss(rank=rank, world_size=world_size, pair_loss=method.pair_loss)
        if method.use_fusion:
            self._build_fusion(dims, rank, world_size)
        if method.use_ssl:
            hidden = method.ssl_hidden_width(dims.image_width)
            self.ssl_head = SslHead(dims.image_width, hidden, method.ssl_emb_dim, world_size=world_size)
            self.ssl_loss = SimClrLoss(method.ssl_scale, method.ssl_temperature, rank=rank, world_size=world_size)
        self.set_grad_checkpointing(grad_checkpointing)

    def _build_fusion(self, dims: models.TowerDims, rank: int, world_size: int) -> None:
        method = self.method
        width = method.fusion_width or dims.text_width
        if width % method.fusion_heads:
            raise ConfigError(
                f"stage1.fusion_heads: fusion width {width} (stage1.fusion_width, default the text tower "
                f"width) is not divisible by fusion_heads={method.fusion_heads}"
            )
        self.fusion = FusionHead(
            image_width=dims.image_width,
            text_width=dims.text_width,
            width=width,
            depth=method.fusion_depth,
            heads=method.fusion_heads,
            embed_dim=dims.embed_dim,
        )
        self.fusion_logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.fusion_loss = FusionLoss(weight=method.fusion_lambda, rank=rank, world_size=world_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
        if self.fusion is not None:
            self.fusion.set_grad_checkpointing(enable)

    def inference_model(self) -> nn.Module:
        """The bare open_clip model (no fusion, pooling or SSL head, no loss parameters)."""
        return self.model

    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """Keep log(1/τ) in [0, ln 100] for both temperatures (open_clip's post-step clamp)."""
        self.model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        if self.fusion_logit_scale is not None:
            self.fusion_logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups with open_clip_train's rule: no decay for gains, biases, 1-D params, logit scales."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if exclude else decay).append(p)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]

    def _check_inputs(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        v, s, w = self.method.image_views, self.method.ssl_views, self.method.text_views
        if images.ndim != 5 or images.shape[1] != v + s or images.shape[2] != 3:
            extra = f" + {s} SSL views" if s else ""
            raise ValueError(f"images must be [N, V={v}{extra}, 3, H, W], got {tuple(images.shape)}")
        if texts.ndim != 3 or texts.shape[1] != w or texts.shape[0] != images.shape[0]:
            raise ValueError(f"texts must be [N={images.shape[0]}, W={w}, L] token ids, got {tuple(texts.shape)}")

    def _encode(self, images: torch.Tensor, texts: torch.Tensor) -> _Encoded:
        """Both towers, every view folded into the batch; tokens only where a head needs them."""
        n, views, w = images.shape[0], images.shape[1], texts.shape[1]
        flat_images, flat_texts = images.flatten(0, 1), texts.flatten(0, 1)
        tokens = None
        if self.fusion is not None or self.ssl_head is not None or self.flair_pool is not None:
            image, tokens = models.encode_image_tokens(self.model, flat_images)
            tokens = tokens.reshape(n, views, *tokens.shape[1:])
        else:
            image = self.model.encode_image(flat_images, normalize=True)
        text_tokens = None
        if self.fusion is not None:
            text_tokens = models.encode_text_tokens(self.model, flat_texts, normalize=False)
            text = text_tokens.features
        else:
            text = self.model.encode_text(flat_texts, normalize=False)
        return _Encoded(image.reshape(n, views, -1), tokens, text.reshape(n, w, -1), text_tokens)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses for one (local) batch.

        Returns `loss` (the total to backpropagate) = sum of the `*_loss` entries
        (`contrastive_loss` = L_MA for pairwise alignment, `tcs_loss` + `mps_loss` for FLAIR,
        `fusion_loss` = λ·L_fuse, `ssl_loss` = ssl_scale·L_ssl), detached diagnostics
        (`align_v{v}_w{w}`, `fusion`, `fusion_pos_cos`, `tcs`, `mps`, `ssl`, `ssl_acc`), and the
        scales 1/τ: `logit_scale` and, with fusion, `fusion_logit_scale` (detached).
        """
        self._check_inputs(images, texts)
        n, v = images.shape[0], self.method.image_views
        enc = self._encode(images, texts)
        logit_scale = self.model.logit_scale.exp()
        logit_bias = getattr(self.model, "logit_bias", None)
        if self.flair_pool is not None:
            local = enc.image_tokens[:, 0, 1:] @ self.model.visual.proj  # patch tokens in the joint space (FLAIR)
            out = self.alignment(enc.image[:, 0], local, enc.text, logit_scale, logit_bias, self.flair_pool,
                                 ids=sample_ids(texts))
        else:
            out = self.alignment(enc.image[:, :v], F.normalize(enc.text, dim=-1), logit_scale, logit_bias)
        if self.fusion is not None:
            out.update(self._fusion_terms(enc, n, v, texts.shape[1]))
        if self.ssl_head is not None:
            pooled = enc.image_tokens[:, v:, 0]  # class token after ln_post, before visual.proj (SLIP's h)
            a, b = (F.normalize(self.ssl_head(pooled[:, i]), dim=-1) for i in range(self.method.ssl_views))
            out.update(self.ssl_loss(a, b))
        out["loss"] = sum(value for key, value in out.items() if key.endswith("_loss"))
        out["logit_scale"] = logit_scale.detach()
        return out

    def _fusion_terms(self, enc: _Encoded, n: int, v: int, w: int) -> dict[str, torch.Tensor]:
        text = enc.text_tokens
        fused = self.fusion(
            enc.image_tokens[:, :v],
            text.tokens.reshape(n, w, *text.tokens.shape[1:]),
            text.eot_index.reshape(n, w),
            text.pad_mask.reshape(n, w, -1),
        )
        fusion_scale = self.fusion_logit_scale.exp()
        out = self.fusion_loss(fused.reshape(n, v * w, -1), fusion_scale)
        out["fusion_logit_scale"] = fusion_scale.detach()
        return out


@dataclass
class Stage1Build:
    task: Stage1Task
    method: ResolvedMethod
    model_cfg: dict  # open_clip model_cfg of `task.model` (for export.export_open_clip)
    preprocess_train: Any  # open_clip's train transform (the `clip` method's image view)
    preprocess_val: Any
    tokenizer: Any


def build_task(
    cfg: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
) -> Stage1Build:
    """Model + task for a Stage1Config (`cfg.model`, `cfg.method` and its knobs, `cfg.grad_checkpointing`).

    The model is created in fp32; bf16 training is meant to run under `torch.autocast`.
    """
    method = resolve(cfg)
    model, preprocess_train, preprocess_val, tokenizer = models.create(
        cfg.model, image_size=image_size, device=device, **method.model_kwargs
    )
    model_cfg = models.model_config(cfg.model, image_size=image_size, **method.model_kwargs)
    task = Stage1Task(
        model, method, rank=rank, world_size=world_size, grad_checkpointing=bool(cfg.grad_checkpointing)
    ).to(device)
    return Stage1Build(task, method, model_cfg, preprocess_train, preprocess_val, tokenizer)

