"""Stage-1 losses and heads against plain-Python references (math on lists), and 2-process gloo equivalence."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from stage1_pretrain.heads import GlobalBatchNorm1d, SslHead, TextConditionedPool
from stage1_pretrain.losses import (
    HASH_BASE,
    HASH_PRIME,
    ClipLoss,
    FlairLoss,
    FusionLoss,
    MultiAlignmentLoss,
    SigLipLoss,
    SimClrLoss,
    flair_candidates,
    sample_ids,
)

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


def simclr_ref(a, b, tau):
    """SLIP's NT-Xent by hand: each anchor against the other view (all) and its own view (others)."""
    n, total = len(a), 0.0
    for anchor, other, same in ((a, b, a), (b, a, b)):
        for i in range(n):
            den = sum(math.exp(dot(anchor[i], other[j]) / tau) for j in range(n))
            den += sum(math.exp(dot(anchor[i], same[j]) / tau) for j in range(n) if j != i)
            total -= math.log(math.exp(dot(anchor[i], other[i]) / tau) / den)
    return total / (2 * n)


def test_simclr_loss_matches_reference():
    a, b = [U[i][0] for i in range(3)], [U[i][1] for i in range(3)]
    out = SimClrLoss(scale=2.0, temperature=0.5)(t(a), t(b))
    ref = simclr_ref(a, b, 0.5)
    assert abs(out["ssl"].item() - ref) < TOL and abs(out["ssl_loss"].item() - 2 * ref) < TOL
    assert [k for k in out if k.endswith("_loss")] == ["ssl_loss"]
    # anchors whose largest logit (other view, or own view minus itself) is their positive, by hand
    hits = 0
    for anchor, other, same in ((a, b, a), (b, a, b)):
        for i in range(3):
            scores = [dot(anchor[i], other[j]) for j in range(3)] + [dot(anchor[i], same[j]) for j in range(3) if j != i]
            hits += max(range(len(scores)), key=scores.__getitem__) == i
    assert abs(out["ssl_acc"].item() - hits / 6) < TOL
    assert abs(SimClrLoss(temperature=0.1)(t(a), t(b))["ssl"].item() - simclr_ref(a, b, 0.1)) < TOL


def softmax_pool_ref(q, tokens):
    """A parameter-free pooling for the FLAIR reference: softmax(q·v) weighted mean of the tokens."""
    w = [math.exp(dot(q, v)) for v in tokens]
    return [sum(wi * v[d] for wi, v in zip(w, tokens, strict=True)) / sum(w) for d in range(len(q))]


def softmax_pool(queries, tokens):
    return torch.softmax(queries @ tokens.transpose(1, 2), dim=-1) @ tokens


def unit(v):
    norm = math.sqrt(dot(v, v))
    return [x / norm for x in v]


def log1pexp(x):
    return math.log(1 + math.exp(x))


def flair_ref(g, local, s, scale, bias, ids, negatives):
    """FLAIR's two sigmoid losses by hand. g[i]: unit image embedding, local[i]: image i's tokens,
    s[i][k]: raw text embedding of image i's sub-caption k, ids: content ids choosing the negatives."""
    n, k = len(s), len(s[0])
    mps = sum(log1pexp(-(1 if j == i else -1) * (scale * dot(g[i], unit(s[j][c])) + bias))
              for i in range(n) for j in range(n) for c in range(k)) / (n * k)
    tcs, count = 0.0, None
    for i in range(n):
        pairs = [(j, c) for j in range(n) for c in range(k)] if negatives == "all" else (
            [(i, c) for c in range(k)]
            + [(j, ((ids[i] * HASH_BASE + ids[j]) % HASH_PRIME) % k) for j in range(n) if j != i])
        count = len(pairs)
        for j, c in pairs:
            logit = scale * dot(unit(softmax_pool_ref(s[j][c], local[i])), unit(s[j][c])) + bias
            tcs += log1pexp(-(1 if j == i else -1) * logit)
    return tcs / count, mps


# 3 images, K = 3 raw sub-caption embeddings each (not unit length: they are the pooling queries),
# 2 local tokens per image.
FLAIR_S = [
    [[1.0, 0.5, 0.0], [0.2, 1.5, 0.1], [0.0, 0.3, 2.0]],
    [[0.5, 0.0, 1.0], [1.2, -0.4, 0.3], [0.1, 0.9, -0.6]],
    [[-0.3, 0.8, 0.8], [0.7, 0.7, 0.1], [2.0, 0.1, -0.5]],
]
FLAIR_LOCAL = [
    [[0.9, 0.1, 0.0], [0.0, 0.4, 1.1]],
    [[0.3, -0.2, 0.8], [1.0, 0.2, 0.2]],
    [[-0.5, 0.6, 0.4], [0.8, 0.9, -0.1]],
]
FLAIR_IDS = [17, 1_234_567, 99]


@pytest.mark.parametrize("negatives", ["sampled", "all"])
def test_flair_loss_matches_reference(negatives):
    g = [unit(U[i][0]) for i in range(3)]
    out = FlairLoss(negatives)(t(g), t(FLAIR_LOCAL), t(FLAIR_S), t(2.5), t(-1.5), softmax_pool,
                               ids=torch.tensor(FLAIR_IDS))
    tcs, mps = flair_ref(g, FLAIR_LOCAL, FLAIR_S, 2.5, -1.5, FLAIR_IDS, negatives)
    assert abs(out["tcs"].item() - tcs) < TOL and abs(out["mps"].item() - mps) < TOL
    assert abs(out["tcs_loss"].item() - tcs / 2) < TOL and abs(out["mps_loss"].item() - mps / 2) < TOL
    assert sorted(k for k in out if k.endswith("_loss")) == ["mps_loss", "tcs_loss"]
    with pytest.raises(ValueError, match="logit_bias"):
        FlairLoss(negatives)(t(g), t(FLAIR_LOCAL), t(FLAIR_S), t(2.5), None, softmax_pool)


def test_flair_sampled_negatives_follow_the_ids():
    ids = torch.tensor(FLAIR_IDS)
    index, positive = flair_candidates(torch.arange(3), ids, 3, "sampled")
    for i in range(3):  # own K first, then one sub-caption of every other image, in image order
        others = [j * 3 + ((FLAIR_IDS[i] * HASH_BASE + FLAIR_IDS[j]) % HASH_PRIME) % 3 for j in range(3) if j != i]
        assert index[i].tolist() == [i * 3, i * 3 + 1, i * 3 + 2, *others]
        assert positive[i].tolist() == [True] * 3 + [False] * 2
    assert len(set((index[:, 3:] % 3).flatten().tolist())) > 1  # the ids really vary the chosen sub-caption
    index, positive = flair_candidates(torch.tensor([1]), ids, 3, "all")
    assert index.tolist() == [list(range(9))] and positive[0].tolist() == [c // 3 == 1 for c in range(9)]
    # without ids the batch positions choose (the rows of a 1-process batch)
    g = t([unit(U[i][0]) for i in range(3)])
    by_position = FlairLoss()(g, t(FLAIR_LOCAL), t(FLAIR_S), t(2.5), t(-1.5), softmax_pool)
    tcs, _ = flair_ref(g.tolist(), FLAIR_LOCAL, FLAIR_S, 2.5, -1.5, [0, 1, 2], "sampled")
    assert abs(by_position["tcs"].item() - tcs) < TOL


def test_sample_ids_are_a_content_hash():
    tokens = torch.tensor([[[5, 9, 0], [7, 0, 0]], [[5, 9, 0], [7, 0, 0]], [[5, 9, 0], [8, 0, 0]]])
    ids = sample_ids(tokens).tolist()
    by_hand = [sum(x * pow(HASH_BASE, i, HASH_PRIME) for i, x in enumerate(row.flatten().tolist())) % HASH_PRIME
               for row in tokens]
    assert ids == by_hand and ids[0] == ids[1] != ids[2]
    big = torch.full((2, 8, 77), 49407)
    assert (sample_ids(big) >= 0).all() and (sample_ids(big) < HASH_PRIME).all()  # no int64 overflow
    assert sample_ids(tokens[[2, 0, 1]]).tolist() == [ids[2], ids[0], ids[1]]  # follows the sample


def test_text_conditioned_pool_matches_reference():
    """LN on q, k, v; 2-head attention with a zero key/value slot appended after the projections."""
    torch.manual_seed(0)
    pool = TextConditionedPool(4, heads=2).double()
    for ln in (pool.ln_q, pool.ln_k, pool.ln_v):
        torch.nn.init.normal_(ln.weight)
        torch.nn.init.normal_(ln.bias)
    q, tok = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)
    got = pool(q, tok)[0].tolist()

    def ln(x, mod):
        mean = sum(x) / len(x)
        var = sum((v - mean) ** 2 for v in x) / len(x)
        return [(v - mean) / math.sqrt(var + mod.eps) * w + b
                for v, w, b in zip(x, mod.weight.tolist(), mod.bias.tolist(), strict=True)]

    def linear(x, w, b):
        return [dot(row, x) + bi for row, bi in zip(w, b, strict=True)]

    w_in, b_in = pool.attn.in_proj_weight.tolist(), pool.attn.in_proj_bias.tolist()
    keys = [linear(ln(v, pool.ln_k), w_in[4:8], b_in[4:8]) for v in tok[0].tolist()] + [[0.0] * 4]
    values = [linear(ln(v, pool.ln_v), w_in[8:], b_in[8:]) for v in tok[0].tolist()] + [[0.0] * 4]
    for c, query in enumerate(q[0].tolist()):
        qp = linear(ln(query, pool.ln_q), w_in[:4], b_in[:4])
        heads = []
        for h in (slice(0, 2), slice(2, 4)):
            e = [math.exp(dot(qp[h], key[h]) / math.sqrt(2)) for key in keys]
            heads += [sum(ei * val[h][d] for ei, val in zip(e, values, strict=True)) / sum(e) for d in range(2)]
        ref = linear(heads, pool.attn.out_proj.weight.tolist(), pool.attn.out_proj.bias.tolist())
        assert max(abs(x - y) for x, y in zip(got[c], ref, strict=True)) < TOL


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    ours, ref = GlobalBatchNorm1d(5).double(), torch.nn.BatchNorm1d(5).double()
    assert torch.allclose(ours(x), ref(x), atol=TOL)
    assert torch.allclose(ours.running_var, ref.running_var, atol=TOL)
    # by hand: column 0 normalised with the biased variance of the batch
    col = x[:, 0].tolist()
    mean = sum(col) / 6
    var = sum((v - mean) ** 2 for v in col) / 6
    assert abs(ours(x)[0, 0].item() - (col[0] - mean) / math.sqrt(var + 1e-5)) < TOL
    head = SslHead(5, 8, 3)
    assert [type(m).__name__ for m in head.children()] == [
        "Linear", "GlobalBatchNorm1d", "Linear", "GlobalBatchNorm1d", "Linear"]
    assert head(x.float()).shape == (6, 3)


# ---------------------------------------------------------------- 2 processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_distributed(name, build, inputs, rank, world_size, params=()):
    """Loss value (mean over ranks) and gradients (DDP average) equal the 1-process ones.

    Gradients: of the inputs (embeddings sliced by rank; scalars shared) and of `params` (a head's
    weights, replicated on every rank as DDP replicates them).
    """
    import torch.distributed as dist

    params = list(params)
    n = inputs[0].shape[0] // world_size
    ref_leaves = [x.clone().requires_grad_(True) for x in inputs]
    ref = build(0, 1)(*ref_leaves)
    ref_loss = sum(v for k, v in ref.items() if k.endswith("_loss"))
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves + params)

    leaves = [x[rank * n:(rank + 1) * n].clone().requires_grad_(True) if x.ndim else x.clone().requires_grad_(True)
              for x in inputs]
    for p in params:
        p.grad = None
    out = build(rank, world_size)(*leaves)
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world_size
    assert abs(mean_loss.item() - ref_loss.item()) < TOL, (name, mean_loss.item(), ref_loss.item())
    for i, (tensor, ref_grad) in enumerate(zip(leaves + params, ref_grads, strict=True)):
        grad = tensor.grad.clone()
        assert grad.abs().sum() > 0, name
        if i < len(leaves) and tensor.ndim:  # embeddings: all_gather's backward already summed every rank's part
            expected = ref_grad[rank * n:(rank + 1) * n]
        else:  # scalars (temperature, bias) and head weights: summed here, as DDP's all-reduce does
            dist.all_reduce(grad)
            expected = ref_grad
        # DDP divides by world_size: the effective gradient is grad / world_size.
        assert torch.allclose(grad / world_size, expected, atol=TOL, rtol=0), name


def _set_world(module, world_size):
    for m in module.modules():
        if isinstance(m, GlobalBatchNorm1d):
            m.world_size = world_size
    return module


def _ssl_head_case(gen):
    """SLIP's branch: pre-head features of 2 views -> MLP with global-batch BN -> SimCLR."""
    torch.manual_seed(0)
    head = SslHead(5, 16, 4).double()

    def build(r, w):
        _set_world(head, w)
        return lambda h1, h2: SimClrLoss(0.5, 0.2, r, w)(torch.nn.functional.normalize(head(h1), dim=-1),
                                                          torch.nn.functional.normalize(head(h2), dim=-1))

    h = torch.randn(6, 2, 5, generator=gen, dtype=torch.float64)
    return build, (h[:, 0], h[:, 1]), list(head.parameters())


def _flair_case(gen, negatives, unit):
    """FLAIR's loss with a real pooling head; content ids chosen so that slots differ."""
    torch.manual_seed(1)
    pool = TextConditionedPool(4, heads=2).double()
    ids = torch.tensor([3, 141, 59, 26, 535, 8979])

    def build(r, w):
        n = 6 // w
        return lambda g, tok, s, sc, b: FlairLoss(negatives, r, w)(g, tok, s, sc, b, pool, ids=ids[r * n:(r + 1) * n])

    g, tok = unit(6, 4), torch.randn(6, 5, 4, generator=gen, dtype=torch.float64)
    s = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    return build, (g, tok, s, torch.tensor(3.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)), \
        list(pool.parameters())


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
            "clip": (lambda r, w: lambda a, b, s: ClipLoss(r, w)(a, b, s), (img[:, 0], txt[:, 0], scale), ()),
            "multi_alignment": (lambda r, w: lambda a, b, s: MultiAlignmentLoss(r, w)(a, b, s), (img, txt, scale), ()),
            "siglip": (lambda r, w: lambda a, b, s, c: SigLipLoss(r, w)(a, b, s, c), (img[:, 0], txt[:, 1], scale, bias),
                       ()),
            "fusion": (lambda r, w: lambda f, s: FusionLoss(2.0, r, w)(f, s), (fused, scale), ()),
            "simclr": (lambda r, w: lambda a, b: SimClrLoss(2.0, 0.3, r, w)(a, b), (img[:, 0], img[:, 1]), ()),
            "ssl_head": _ssl_head_case(gen),
            "flair_sampled": _flair_case(gen, "sampled", unit),
            "flair_all": _flair_case(gen, "all", unit),
        }
        for name, (build, inputs, params) in cases.items():
            _check_distributed(name, build, inputs, rank, world_size, params)
    finally:
        dist.destroy_process_group()


def test_two_process_losses_equal_single_process():
    mp.spawn(_dist_worker, args=(2, _free_port()), nprocs=2, join=True)
