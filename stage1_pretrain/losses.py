"""Stage-1 losses: CLIP (or SigLIP) alignment, multiple alignment over views, the ITO fusion loss,
SLIP's SimCLR loss and FLAIR's two sigmoid losses.

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
  Every rank must hold the same number of samples. A loss that is a sum over anchors (not a mean)
  returns world_size × its rows' sum, for the same reason.
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


class SimClrLoss(nn.Module):
    """SLIP's SimCLR (NT-Xent) loss between two augmented views a, b of N images, temperature τ:

        L_ssl = 1/(2N) Σ_i [ ℓ(a_i; b, a) + ℓ(b_i; a, b) ]
        ℓ(a_i; b, a) = −log[ exp(a_i·b_i/τ) / ( Σ_j exp(a_i·b_j/τ) + Σ_{j≠i} exp(a_i·a_j/τ) ) ]

    (facebookresearch/SLIP `losses.SIMCLRLoss`: τ = 0.1; `SLIPLoss` adds ssl_scale · L_ssl to the
    CLIP loss, ssl_scale 1.) a, b: [N, E], L2-normalised SSL-head outputs of view 1 and view 2.
    Returns {"ssl_loss": scale·L_ssl, "ssl": L_ssl, "ssl_acc": fraction of anchors whose largest
    logit is their positive}.
    """

    def __init__(self, scale: float = 1.0, temperature: float = 0.1, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.scale, self.temperature = float(scale), float(temperature)
        self.rank, self.world_size = rank, world_size

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict:
        if a.ndim != 2 or a.shape != b.shape:
            raise ValueError(f"SimClrLoss expects two [N, E] views, got {tuple(a.shape)} and {tuple(b.shape)}")
        n = a.shape[0]
        every_a, every_b = gather_with_grad(a, self.world_size), gather_with_grad(b, self.world_size)
        labels = torch.arange(n, device=a.device) + self.rank * n
        self_mask = labels[:, None] == torch.arange(every_a.shape[0], device=a.device)[None, :]
        total, correct = 0.0, 0.0
        for anchor, other, same in ((a, every_b, every_a), (b, every_a, every_b)):
            logits = torch.cat([anchor @ other.T, (anchor @ same.T).masked_fill(self_mask, float("-inf"))], dim=1)
            logits = logits / self.temperature
            total = total + nn.functional.cross_entropy(logits, labels)
            correct = correct + (logits.detach().argmax(dim=1) == labels).float().mean()
        ssl = total / 2
        return {"ssl_loss": self.scale * ssl, "ssl": ssl.detach(), "ssl_acc": correct / 2}


HASH_PRIME = 2_147_483_647  # 2**31 - 1
HASH_BASE = 1_000_003


def sample_ids(tokens: torch.Tensor) -> torch.Tensor:
    """A content id per sample [n] (long, in [0, 2^31 - 1)) from its token ids [n, ...] (a polynomial hash).

    FLAIR's sampled negatives are chosen by these ids, not by batch position, so the choice follows
    a sample wherever the loader puts it (1 or N processes: same global batch, other order).
    """
    flat = tokens.reshape(tokens.shape[0], -1).long() % HASH_PRIME
    coeff = torch.tensor([pow(HASH_BASE, i, HASH_PRIME) for i in range(flat.shape[1])], device=tokens.device)
    return ((flat * coeff) % HASH_PRIME).sum(dim=1) % HASH_PRIME  # factors < 2^31: products fit in int64


def negative_slot(id_i: torch.Tensor, id_j: torch.Tensor, k: int) -> torch.Tensor:
    """Which of image j's K sub-captions is image i's negative (FLAIR draws it uniformly; here a hash)."""
    return ((id_i * HASH_BASE + id_j) % HASH_PRIME) % k


def flair_candidates(rows: torch.Tensor, ids: torch.Tensor, k: int, negatives: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Text indices (into the N·K global sub-captions, sample-major) scored against each image row, and their labels.

    rows [n]: global image indices; ids [N]: every image's content id. "sampled": the row's own K
    sub-captions (positives) then, for every other image j in order, its sub-caption
    negative_slot(id_row, id_j, K): C = N + K - 1. "all": all N·K sub-captions, C = N·K.
    Returns (index [n, C] long, positive [n, C] bool).
    """
    n_img, device = ids.shape[0], ids.device
    if negatives == "all":
        index = torch.arange(n_img * k, device=device).expand(rows.shape[0], -1)
        return index, (index // k) == rows[:, None]
    if negatives != "sampled":
        raise ValueError(f"negatives must be 'sampled' or 'all', got {negatives!r}")
    images = torch.arange(n_img, device=device)
    others = images[None, :] * k + negative_slot(ids[rows][:, None], ids[None, :], k)  # [n, N]
    others = others[images[None, :] != rows[:, None]].view(rows.shape[0], n_img - 1)
    own = rows[:, None] * k + torch.arange(k, device=device)
    positive = torch.cat([torch.ones_like(own, dtype=torch.bool), torch.zeros_like(others, dtype=torch.bool)], 1)
    return torch.cat([own, others], dim=1), positive


def _gather_ids(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(world_size)]
    torch.distributed.all_gather(parts, ids.contiguous())
    return torch.cat(parts)


class FlairLoss(nn.Module):
    """FLAIR's loss (ExplainableML/flair `FlairLoss` with `--add-mps-loss`, as all its training scripts):

        L_flair = ½ (L_tcs + L_mps)
        L_tcs = 1/C Σ_i Σ_{c∈C(i)} −log σ( z_ic (t·cos(f(s_c, V_i), s_c) + b) )      text-conditioned sigmoid
        L_mps = 1/(N·K) Σ_i Σ_j Σ_k −log σ( z_ijk (t·g_i·ŝ_jk + b) )                multi-positive sigmoid

    N images, K sub-captions each; s_jk: text embedding of image j's sub-caption k (ŝ: L2-normalised),
    g_i: L2-normalised global image embedding, V_i: image i's local tokens, f: the text-conditioned
    pooling (`heads.TextConditionedPool`), t = 1/τ and b: the model's logit scale and bias; z = +1
    for an image's own sub-captions, −1 otherwise. C(i) (`flair_candidates`): "sampled" = i's K
    sub-captions + one of every other image (FLAIR's code, C = N + K − 1; FLAIR draws that one at
    random, here it is `negative_slot` of the two images' content ids), "all" = every sub-caption of
    the batch (C = N·K). The normalisers 1/C and 1/(N·K) are FLAIR's (`.sum() / text_features.shape[1]`,
    `.sum() / g_text_features.shape[0]`). Both sums run over the global batch: each rank scores its
    own images against the gathered texts (FLAIR's own multi-GPU code instead adds whole per-rank
    negative sets, which does not equal its 1-GPU loss).

    Returns {"tcs_loss": ½L_tcs, "mps_loss": ½L_mps, "tcs": L_tcs, "mps": L_mps}.
    """

    def __init__(self, negatives: str = "sampled", rank: int = 0, world_size: int = 1):
        super().__init__()
        if negatives not in ("sampled", "all"):
            raise ValueError(f"negatives must be 'sampled' or 'all', got {negatives!r}")
        self.negatives, self.rank, self.world_size = negatives, rank, world_size

    def forward(self, image_features, image_tokens, text_features, logit_scale, logit_bias, pool, ids=None) -> dict:
        """image_features [n, D] (normalised), image_tokens [n, P, D], text_features [n, K, D] (not
        normalised: they are the pooling queries), pool(queries [n, C, D], tokens [n, P, D]) -> [n, C, D],
        ids [n] long content ids (None: global batch positions)."""
        if logit_bias is None:
            raise ValueError("FlairLoss needs the model's logit_bias (build the model with init_logit_bias)")
        n, k, _ = text_features.shape
        every = gather_with_grad(text_features.reshape(n * k, -1), self.world_size)
        unit = nn.functional.normalize(every, dim=-1)
        rows = torch.arange(n, device=every.device) + self.rank * n
        ids = torch.arange(n * self.world_size, device=every.device) if ids is None else _gather_ids(ids, self.world_size)

        mps_logits = logit_scale * image_features @ unit.T + logit_bias
        own = (torch.arange(unit.shape[0], device=every.device) // k)[None, :] == rows[:, None]
        mps_z = own.to(mps_logits.dtype) * 2 - 1
        mps = -nn.functional.logsigmoid(mps_z * mps_logits).sum() / (n * k)  # x world_size / (N·K)

        index, positive = flair_candidates(rows, ids, k, self.negatives)
        pooled = nn.functional.normalize(pool(every[index], image_tokens), dim=-1)
        tcs_logits = logit_scale * (pooled * unit[index]).sum(dim=-1) + logit_bias
        tcs_z = positive.to(tcs_logits.dtype) * 2 - 1
        tcs = -nn.functional.logsigmoid(tcs_z * tcs_logits).sum() * self.world_size / index.shape[1]
        return {"tcs_loss": tcs / 2, "mps_loss": mps / 2, "tcs": tcs.detach(), "mps": mps.detach()}
