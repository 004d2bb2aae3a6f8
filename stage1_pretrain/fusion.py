"""ITO's training-time fusion module F (dropped at export).

For an image token sequence X ∈ R^{T×d_I} (class + patch tokens) and a text token sequence
Y ∈ R^{L×d_T} (all positions) of one (image view v, text view w) combination:

    Z⁰ = [ X A_I + e_img ; Y A_T + e_txt ]          A_I, A_T: linear maps to the fusion width d_F,
                                                     e_img, e_txt: learned modality embeddings
    Zᵈ = Block_d(Z^{d−1}),  d = 1..depth            pre-LN bidirectional Transformer blocks, keys
                                                     at text padding positions masked
    m  = normalize( LN(Z^depth)[T + eot] B )         output at the text EOT position, B: d_F → D

Text padding = positions after the EOT (`models.text_eot_and_pad`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class FusionHead(nn.Module):
    def __init__(self, image_width: int, text_width: int, width: int, depth: int, heads: int, embed_dim: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} is not divisible by fusion heads {heads}")
        self.width, self.depth, self.heads = width, depth, heads
        self.image_proj = nn.Linear(image_width, width)
        self.text_proj = nn.Linear(text_width, width)
        self.type_embedding = nn.Parameter(torch.zeros(2, width))
        nn.init.normal_(self.type_embedding, std=0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=width,
                nhead=heads,
                dim_feedforward=4 * width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        eot_index: torch.Tensor,
        text_pad_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Fuse every (image view, text view) combination of each sample.

        image_tokens [N, V, T, d_I], text_tokens [N, W, L, d_T], eot_index [N, W] (long),
        text_pad_mask [N, W, L] (bool, True = padding) -> fused [N, V, W, D], L2-normalised.
        """
        n, v, t, _ = image_tokens.shape
        w, seq = text_tokens.shape[1], text_tokens.shape[2]
        # Project before pairing the views, so the V·W copies are made at the fusion width.
        img = self.image_proj(image_tokens) + self.type_embedding[0]
        txt = self.text_proj(text_tokens) + self.type_embedding[1]
        img = img[:, :, None].expand(n, v, w, t, self.width)
        txt = txt[:, None].expand(n, v, w, seq, self.width)
        x = torch.cat([img, txt], dim=3).reshape(n * v * w, t + seq, self.width)

        pad = torch.cat(
            [text_pad_mask.new_zeros(n, w, t), text_pad_mask.bool()], dim=2
        )[:, None].expand(n, v, w, t + seq).reshape(n * v * w, t + seq)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, None, pad, use_reentrant=False)
            else:
                x = block(x, src_key_padding_mask=pad)

        position = (t + eot_index)[:, None].expand(n, v, w).reshape(-1)
        out = self.ln_final(x[torch.arange(x.shape[0], device=x.device), position])
        return F.normalize(self.proj(out), dim=-1).reshape(n, v, w, -1)
