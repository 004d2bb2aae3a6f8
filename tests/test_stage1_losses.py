"""Stage-1 losses against plain-Python references (math on lists), and 2-process gloo equivalence."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from stage1_pretrain.losses import ClipLoss, FusionLoss, MultiAlignmentLoss, SigLipLoss

TOL = 1e-6

# 3 samples, 2 image views, 2 text views; unit vectors with easy coordinates.
U = [  # U[i][v]
    [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]],
    [[0.0, 1.0, 0.0], [0.0, 0.6, 0.8]],
    [[0.0, 0.0, 1.0], [0.8, 0.0, 0.6]],
]
S = [  # S[i][w]
    [[0.8, 0.6, 0.0], [1.0, 0.0, 0.0]],
    [[0.0, 0.8, 0.6], [0.0, 0.0, 1.0]],
    [[0.6, 0.0, 0.8], [0.0, 1.0, 0.0]],
]
SCALE = 2.0


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def ce_diag(z):
    return sum(math.log(sum(math.exp(x) for x in row)) - row[i] for i, row in enumerate(z)) / len(z)


def clip_ref(u, s, scale):
    z = [[scale * dot(a, b) for b in s] for a in u]
    zt = [list(col) for col in zip(*z, strict=True)]
    return (ce_diag(z) + ce_diag(zt)) / 2


def siglip_ref(u, s, scale, bias):
    total = 0.0
    for i, a in enumerate(u):
        for j, b in enumerate(s):
            sign = 1.0 if i == j else -1.0
            total -= math.log(1 / (1 + math.exp(-sign * (scale * dot(a, b) + bias))))
    return total / len(u)


def fusion_ref(m, sample_of, scale):
    total = 0.0
    for a in range(len(m)):
        den = sum(math.exp(scale * dot(m[a], m[k])) for k in range(len(m)) if k != a)
        pos = [p for p in range(len(m)) if p != a and sample_of[p] == sample_of[a]]
        total -= sum(math.log(math.exp(scale * dot(m[a], m[p])) / den) for p in pos) / len(pos)
    return total / len(m)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_clip_loss_closed_form():
    # Two orthonormal pairs at scale 1: each row is softmax([1, 0]) -> L = log(1 + 1/e).
    e = torch.eye(2, dtype=torch.float64)
    out = ClipLoss()(e, e, torch.tensor(1.0, dtype=torch.float64))
    assert set(out) == {"contrastive_loss"}
    assert abs(out["contrastive_loss"].item() - 0.31326168751822286) < TOL
    assert abs(math.log(1 + 1 / math.e) - 0.31326168751822286) < 1e-15


def test_clip_loss_matches_reference():
    u, s = [U[i][0] for i in range(3)], [S[i][0] for i in range(3)]
    got = ClipLoss()(t(u), t(s), t(SCALE))["contrastive_loss"].item()
    assert abs(got - clip_ref(u, s, SCALE)) < TOL
    assert got > 0.5  # sanity: not a trivially aligned example


def test_multi_alignment_is_mean_over_view_pairs():
    out = MultiAlignmentLoss()(t(U), t(S), t(SCALE))
    pairs = {
        (v, w): clip_ref([U[i][v] for i in range(3)], [S[i][w] for i in range(3)], SCALE)
        for v in range(2)
        for w in range(2)
    }
    assert abs(out["contrastive_loss"].item() - sum(pairs.values()) / 4) < TOL
    for (v, w), ref in pairs.items():
        assert abs(out[f"align_v{v}_w{w}"].item() - ref) < TOL
    assert len({round(x, 6) for x in pairs.values()}) == 4  # the pairs really differ
    assert [k for k in out if k.endswith("_loss")] == ["contrastive_loss"]


def test_multi_alignment_single_view_has_no_diagnostics():
    out = MultiAlignmentLoss()(t(U)[:, :1], t(S)[:, :1], t(SCALE))
    assert set(out) == {"contrastive_loss"}


def test_siglip_loss_matches_reference():
    u, s = [U[i][0] for i in range(3)], [S[i][1] for i in range(3)]
    got = SigLipLoss()(t(u), t(s), t(3.0), t(-1.5))["contrastive_loss"].item()
    assert abs(got - siglip_ref(u, s, 3.0, -1.5)) < TOL
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(t(u), t(s), t(3.0))


def test_fusion_loss_closed_form():
    # Samples {e1, e1}, {e2, e2} at scale 1: anchor row = [self excluded, e (positive), 1, 1].
    m = t([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    out = FusionLoss(weight=1.0)(m, t(1.0))
    assert abs(out["fusion"].item() - math.log(1 + 2 / math.e)) < TOL
    assert abs(out["fusion_pos_cos"].item() - 1.0) < TOL


def test_fusion_loss_matches_reference_and_weight():
    # 3 samples x K=2 fused vectors (M = 6).
    flat = [U[0][0], U[0][1], U[1][0], S[1][0], S[2][0], U[2][1]]
    m = t(flat).reshape(3, 2, 3)
    ref = fusion_ref(flat, [0, 0, 1, 1, 2, 2], SCALE)
    out = FusionLoss(weight=2.0)(m, t(SCALE))
    assert abs(out["fusion"].item() - ref) < TOL
    assert abs(out["fusion_loss"].item() - 2.0 * ref) < TOL
    pos = [dot(flat[0], flat[1]), dot(flat[2], flat[3]), dot(flat[4], flat[5])]
    assert abs(out["fusion_pos_cos"].item() - sum(pos) / 3) < TOL


def test_fusion_loss_three_positives_per_anchor():
    # K = 3: |P(a)| = 2, still the plain reference.
    flat = [U[0][0], U[0][1], S[0][0], U[1][0], U[1][1], S[1][1]]
    ref = fusion_ref(flat, [0, 0, 0, 1, 1, 1], 1.5)
    got = FusionLoss()(t(flat).reshape(2, 3, 3), t(1.5))["fusion"].item()
    assert abs(got - ref) < TOL


def test_loss_entries_sum_to_total():
    ma = MultiAlignmentLoss()(t(U), t(S), t(SCALE))
    fu = FusionLoss(weight=2.0)(t(U), t(SCALE))
    out = {**ma, **fu}
    total = sum(v for k, v in out.items() if k.endswith("_loss"))
    assert sorted(k for k in out if k.endswith("_loss")) == ["contrastive_loss", "fusion_loss"]
    assert abs(total.item() - (ma["contrastive_loss"].item() + 2.0 * fu["fusion"].item())) < TOL


def test_fusion_loss_rejects_single_view():
    with pytest.raises(ValueError, match="K >= 2"):
        FusionLoss()(t(U)[:, :1], t(SCALE))


# ---------------------------------------------------------------- 2 processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_distributed(name, build, inputs, rank, world_size):
    """Loss value (mean over ranks) and gradients (DDP average) equal the 1-process ones."""
    import torch.distributed as dist

    n = inputs[0].shape[0] // world_size
    ref_leaves = [x.clone().requires_grad_(True) for x in inputs]
    ref = build(0, 1)(*ref_leaves)
    ref_loss = sum(v for k, v in ref.items() if k.endswith("_loss"))
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)

    leaves = [x[rank * n:(rank + 1) * n].clone().requires_grad_(True) if x.ndim else x.clone().requires_grad_(True)
              for x in inputs]
    out = build(rank, world_size)(*leaves)
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world_size
    assert abs(mean_loss.item() - ref_loss.item()) < TOL, (name, mean_loss.item(), ref_loss.item())
    for leaf, ref_grad in zip(leaves, ref_grads, strict=True):
        grad = leaf.grad.clone()
        assert grad.abs().sum() > 0, name
        if leaf.ndim:  # embeddings: all_gather's backward already summed every rank's part
            expected = ref_grad[rank * n:(rank + 1) * n]
        else:  # scalars (temperature, bias): summed here, as DDP's all-reduce does
            dist.all_reduce(grad)
            expected = ref_grad
        # DDP divides by world_size: the effective gradient is grad / world_size.
        assert torch.allclose(grad / world_size, expected, atol=TOL, rtol=0), name


def _dist_worker(rank, world_size, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        gen = torch.Generator().manual_seed(0)

        def unit(*shape):
            return torch.nn.functional.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)

        img, txt, fused = unit(6, 2, 5), unit(6, 2, 5), unit(6, 3, 5)
        scale, bias = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
        cases = {
            "clip": (lambda r, w: lambda a, b, s: ClipLoss(r, w)(a, b, s), (img[:, 0], txt[:, 0], scale)),
            "multi_alignment": (lambda r, w: lambda a, b, s: MultiAlignmentLoss(r, w)(a, b, s), (img, txt, scale)),
            "siglip": (lambda r, w: lambda a, b, s, c: SigLipLoss(r, w)(a, b, s, c), (img[:, 0], txt[:, 1], scale, bias)),
            "fusion": (lambda r, w: lambda f, s: FusionLoss(2.0, r, w)(f, s), (fused, scale)),
        }
        for name, (build, inputs) in cases.items():
            _check_distributed(name, build, inputs, rank, world_size)
    finally:
        dist.destroy_process_group()


def test_two_process_losses_equal_single_process():
    mp.spawn(_dist_worker, args=(2, _free_port()), nprocs=2, join=True)
