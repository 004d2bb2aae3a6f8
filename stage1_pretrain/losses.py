"""Stage-1 losses: CLIP (or SigLIP) alignment, multiple alignment over views, the ITO fusion loss.

Conventions (every module here):
- Inputs are L2-normalised embeddings of this process's samples; `logit_scale` is the
  *exponentiated* scale 1/τ (as open_clip passes `model.logit_scale.exp()`).
- Each forward returns a dict. Entries ending in `_loss` are the weighted terms; their sum is the
  training loss. Other entries are detached, unweighted diagnostics for logging.
- Distributed (`world_size > 1`): embeddings of all ranks are gathered *with gradients*
  (`torch.distributed.nn.all_gather`, as open_clip's `gather_features(gather_with_grad=True)`),
  and each rank computes the "local loss": its own rows (anchors) against all columns of the
  global batch, labels offset by `rank * local batch`. A rank's value is its share; the mean over
  ranks equals the single-process loss on the global batch, and since all_gather's backward sums
  the gradients of every rank, DDP's gradient averaging gives exactly the single-process gradient.
  Every rank must hold the same number of samples.
"""

from __future__ import annotations

import math

import open_clip.loss
import torch
import torch.distributed.nn
from torch import nn

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over a batch of N pairs (u_i, s_i) with scale 1/τ:

        L_clip(u, s) = ½ [ CE(u·sᵀ/τ, diag) + CE(s·uᵀ/τ, diag) ]
        CE(Z, diag) = 1/N Σ_i −log( exp(Z_ii) / Σ_j exp(Z_ij) )

    The negatives of sample i are all other samples of the global batch. Thin wrapper of
    open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`; `logit_bias` is accepted
    (same signature as SigLipLoss) and ignored.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.impl = open_clip.loss.ClipLoss(
            local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size
        )

    def forward(self, image_features, text_features, logit_scale, logit_bias=None) -> dict:
        return {"contrastive_loss": self.impl(image_features, text_features, logit_scale)}


class SigLipLoss(nn.Module):
    """Sigmoid pairwise loss of SigLIP, with scale t = 1/τ and bias b (open_clip's `SigLipLoss`):

        L_sig(u, s) = −1/N Σ_i Σ_j log σ( z_ij (t u_i·s_j + b) ),  z_ij = +1 if i = j else −1

    In the distributed case open_clip exchanges text embeddings between neighbouring ranks.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.impl = open_clip.loss.SigLipLoss(rank=rank, world_size=world_size)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None) -> dict:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs the model's logit_bias (build the model with init_logit_bias)")
        return {"contrastive_loss": self.impl(image_features, text_features, logit_scale, logit_bias)}


class MultiAlignmentLoss(nn.Module):
    """Multiple alignment: the pair loss averaged over all V image views × W text views,

        L_MA = 1/(V·W) Σ_v Σ_w L_pair(u^v, s^w)

    `pair_loss` is a class taking (rank, world_size) whose forward returns {"contrastive_loss": …}
    (ClipLoss by default; SigLipLoss for the `siglip` method). Input shapes: image [N, V, D],
    text [N, W, D]. Diagnostics `align_v{v}_w{w}` give each pair's value when V·W > 1.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, pair_loss: type[nn.Module] = ClipLoss):
        super().__init__()
        self.pair = pair_loss(rank=rank, world_size=world_size)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None) -> dict:
        if image_features.ndim != 3 or text_features.ndim != 3:
            raise ValueError(
                f"MultiAlignmentLoss expects image [N, V, D] and text [N, W, D], got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        n_img, n_txt = image_features.shape[1], text_features.shape[1]
        out, total = {}, 0.0
        for v in range(n_img):
            for w in range(n_txt):
                pair = self.pair(image_features[:, v], text_features[:, w], logit_scale, logit_bias)["contrastive_loss"]
                total = total + pair
                if n_img * n_txt > 1:
                    out[f"align_v{v}_w{w}"] = pair.detach()
        out["contrastive_loss"] = total / (n_img * n_txt)
        return out


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate `x` of every rank along dim 0 (rank order), keeping gradients."""
    if world_size == 1:
        return x
    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


class FusionLoss(nn.Module):
    """Contrastive loss with multiple positives over the M = N·K fused vectors (K = V·W per sample):

        L_fuse = 1/M Σ_a −1/|P(a)| Σ_{p∈P(a)} log[ exp(m_a·m_p/τ_f) / Σ_{k≠a} exp(m_a·m_k/τ_f) ]

    P(a): the other K − 1 fused vectors of a's sample; the self-pair a is excluded from both the
    numerator and the denominator; every other fused vector of the global batch is in the
    denominator. Returns {"fusion_loss": λ·L_fuse, "fusion": L_fuse, "fusion_pos_cos": mean
    cosine of positive pairs}. Input: fused [N, K, D] (L2-normalised), `logit_scale` = 1/τ_f.
    """

    def __init__(self, weight: float = 1.0, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.weight, self.rank, self.world_size = float(weight), rank, world_size

    def forward(self, fused: torch.Tensor, logit_scale: torch.Tensor) -> dict:
        if fused.ndim != 3 or fused.shape[1] < 2:
            raise ValueError(f"FusionLoss expects fused [N, K >= 2, D], got {tuple(fused.shape)}")
        n, k, _ = fused.shape
        local = fused.reshape(n * k, -1)
        every = gather_with_grad(local, self.world_size)
        device = local.device
        # Fused vector index a = sample * K + combination, so its sample is a // K (globally:
        # rank r holds rows r*n*K ... (r+1)*n*K - 1, i.e. samples r*n ... (r+1)*n - 1).
        row_ids = torch.arange(n * k, device=device) + self.rank * n * k
        col_ids = torch.arange(every.shape[0], device=device)
        self_mask = row_ids[:, None] == col_ids[None, :]
        pos_mask = ((row_ids[:, None] // k) == (col_ids[None, :] // k)) & ~self_mask

        sims = local @ every.T
        logits = (logit_scale * sims).masked_fill(self_mask, float("-inf"))
        log_prob = logits.log_softmax(dim=-1)
        per_anchor = -(log_prob.masked_fill(~pos_mask, 0.0).sum(dim=-1)) / (k - 1)
        fuse = per_anchor.mean()
        return {
            "fusion_loss": self.weight * fuse,
            "fusion": fuse.detach(),
            "fusion_pos_cos": sims.detach()[pos_mask].mean(),
        }
