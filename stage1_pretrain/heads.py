"""Training-only heads of the SLIP and FLAIR methods (dropped at export, like ITO's fusion head).

- `SslHead`: SLIP's SimCLR projection MLP on the image tower's pooled, pre-projection feature h
  (open_clip: the class token after `ln_post`, before `visual.proj`; SLIP: timm's ViT output with
  `num_classes=0`, the same point of the tower):

      z = W3 · ReLU(BN2(W2 · ReLU(BN1(W1 · h + c1)) + c2)) + c3       d_I → hidden → hidden → out

  SLIP: hidden 4096, out 256 for its ViT-S/B/L (`--ssl-mlp-dim`, `--ssl-emb-dim`). Its BatchNorms
  are `SyncBatchNorm` (statistics over the global batch); torch's SyncBatchNorm runs on GPUs only,
  so `GlobalBatchNorm1d` gathers the batch with gradients instead (any backend, gloo included),
  which keeps a 2-process run equal to a 1-process run on the same global batch.
- `TextConditionedPool`: FLAIR's text-conditioned attention pooling (ExplainableML/flair
  `PureAttentionPoolingBlock`): a text embedding t (query) attends over an image's local tokens V
  (the patch tokens, projected to the joint width by the tower's own `visual.proj`):

      f(t, V) = MHA(q = LN_q(t), k = LN_k(V), v = LN_v(V))    8 heads, plus a zero key/value slot
                                                               (`add_zero_attn`: a text may attend to nothing)

  No output normalisation; the FLAIR loss normalises.
"""

from __future__ import annotations

import torch
from torch import nn

from .losses import gather_with_grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch (every rank's rows).

    Mean and biased variance over the gathered batch normalise the local rows; the running
    statistics are updated as BatchNorm1d does (unbiased variance, momentum). With one process
    (or in eval mode) it is plain BatchNorm1d.
    """

    def __init__(self, num_features: int, world_size: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.world_size = world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.world_size == 1:
            return super().forward(x)
        every = gather_with_grad(x, self.world_size)
        mean, var = every.mean(dim=0), every.var(dim=0, unbiased=False)
        if self.track_running_stats:
            with torch.no_grad():
                count = every.shape[0]
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * count / max(count - 1, 1))
        out = (x - mean) / torch.sqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


class SslHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, world_size: int = 1):
        super().__init__()
        self.layer1 = nn.Linear(in_dim, hidden)
        self.bn1 = GlobalBatchNorm1d(hidden, world_size)
        self.layer2 = nn.Linear(hidden, hidden)
        self.bn2 = GlobalBatchNorm1d(hidden, world_size)
        self.layer3 = nn.Linear(hidden, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.layer1(h)))
        x = torch.relu(self.bn2(self.layer2(x)))
        return self.layer3(x)


class TextConditionedPool(nn.Module):
    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        if dim % heads:
            raise ValueError(f"pooling width {dim} is not divisible by {heads} heads")
        self.ln_q, self.ln_k, self.ln_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, add_zero_attn=True)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """queries [n, C, D] (texts), tokens [n, P, D] (image i's local tokens) -> [n, C, D]: row i pools image i."""
        return self.attn(self.ln_q(queries), self.ln_k(tokens), self.ln_v(tokens), need_weights=False)[0]
