"""The stage-1 task object: the open_clip model plus the training-only parts (fusion head, losses).

`Stage1Task.forward(images [N, V, 3, H, W], texts [N, W, L])` encodes every view in one call per
tower (views folded into the batch), then computes

    L = L_MA + λ · L_fuse

(multiple alignment over the V×W view pairs with the method's pair loss, and the fusion loss over
all N·V·W fused vectors when λ > 0). `inference_model()` is the bare open_clip model, which is
all that is exported. In a distributed run build the task with its `rank`/`world_size`; the losses
gather embeddings across ranks with gradients (see `losses`). Call `clamp_logit_scales()` after
each optimizer step, as open_clip's training loop clamps its logit scale (1/τ ≤ 100).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.schema import ConfigError

from . import models
from .fusion import FusionHead
from .losses import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, FusionLoss, MultiAlignmentLoss
from .methods import ResolvedMethod, resolve


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
        self.alignment = MultiAlignmentLoss(rank=rank, world_size=world_size, pair_loss=method.pair_loss)
        self.fusion: FusionHead | None = None
        self.fusion_logit_scale: nn.Parameter | None = None
        self.fusion_loss: FusionLoss | None = None
        if method.use_fusion:
            models.check_token_support(model)
            dims = models.tower_dims(model)
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
        self.set_grad_checkpointing(grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
        if self.fusion is not None:
            self.fusion.set_grad_checkpointing(enable)

    def inference_model(self) -> nn.Module:
        """The bare open_clip model (no fusion head, no loss parameters)."""
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
        v, w = self.method.image_views, self.method.text_views
        if images.ndim != 5 or images.shape[1] != v or images.shape[2] != 3:
            raise ValueError(f"images must be [N, V={v}, 3, H, W], got {tuple(images.shape)}")
        if texts.ndim != 3 or texts.shape[1] != w or texts.shape[0] != images.shape[0]:
            raise ValueError(f"texts must be [N={images.shape[0]}, W={w}, L] token ids, got {tuple(texts.shape)}")

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses for one (local) batch.

        Returns `loss` (the total to backpropagate) = sum of the `*_loss` entries
        (`contrastive_loss` = L_MA, `fusion_loss` = λ·L_fuse when fusion is on), detached
        diagnostics (`align_v{v}_w{w}`, `fusion`, `fusion_pos_cos`), and the scales 1/τ:
        `logit_scale` and, with fusion, `fusion_logit_scale` (detached).
        """
        self._check_inputs(images, texts)
        n, v = images.shape[:2]
        w = texts.shape[1]
        flat_images, flat_texts = images.flatten(0, 1), texts.flatten(0, 1)
        if self.fusion is None:
            img_feat = self.model.encode_image(flat_images, normalize=True)
            txt_feat = self.model.encode_text(flat_texts, normalize=True)
        else:
            img_feat, img_tokens = models.encode_image_tokens(self.model, flat_images)
            text_out = models.encode_text_tokens(self.model, flat_texts)
            txt_feat = text_out.features

        logit_scale = self.model.logit_scale.exp()
        out = self.alignment(
            img_feat.reshape(n, v, -1), txt_feat.reshape(n, w, -1), logit_scale, getattr(self.model, "logit_bias", None)
        )
        if self.fusion is not None:
            fused = self.fusion(
                img_tokens.reshape(n, v, *img_tokens.shape[1:]),
                text_out.tokens.reshape(n, w, *text_out.tokens.shape[1:]),
                text_out.eot_index.reshape(n, w),
                text_out.pad_mask.reshape(n, w, -1),
            )
            fusion_scale = self.fusion_logit_scale.exp()
            out.update(self.fusion_loss(fused.reshape(n, v * w, -1), fusion_scale))
            out["fusion_logit_scale"] = fusion_scale.detach()
        out["loss"] = sum(value for key, value in out.items() if key.endswith("_loss"))
        out["logit_scale"] = logit_scale.detach()
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

