"""Stage1Task on the tiny open_clip model: forward/backward per method, view folding, fusion, SLIP/FLAIR heads, resolve."""

from __future__ import annotations

import dataclasses
import math

import open_clip
import pytest
import torch

from common.schema import ConfigError
from stage1_pretrain import methods, models
from stage1_pretrain.config import Stage1Config
from stage1_pretrain.fusion import FusionHead
from stage1_pretrain.losses import FlairLoss, FusionLoss, SimClrLoss, sample_ids
from stage1_pretrain.task import Stage1Task, build_task

IMAGE = 32
CAPTIONS = ["a red square on grass", "two blue circles", "a yellow triangle", "a green star at night"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def batch(build, n=4):
    v, w = build.method.image_views + build.method.ssl_views, build.method.text_views
    images = torch.randn(n, v, 3, IMAGE, IMAGE)
    words = [f"{CAPTIONS[i % len(CAPTIONS)]} view {j}" for i in range(n) for j in range(w)]
    texts = build.tokenizer(words).reshape(n, w, -1)
    return images, texts


def make(method="clip", **overrides):
    return build_task(Stage1Config(method=method, model="ito-tiny", **overrides), image_size=IMAGE)


@pytest.mark.parametrize(
    "method,loss_keys,diag_keys",
    [
        ("clip", {"contrastive_loss"}, set()),
        ("ito", {"contrastive_loss", "fusion_loss"}, {"align_v0_w0", "align_v1_w0", "fusion", "fusion_pos_cos"}),
        ("ito_sub2", {"contrastive_loss", "fusion_loss"}, {"align_v1_w1", "fusion"}),
        ("siglip", {"contrastive_loss"}, set()),
        ("slip", {"contrastive_loss", "ssl_loss"}, {"ssl", "ssl_acc"}),
        ("flair", {"tcs_loss", "mps_loss"}, {"tcs", "mps"}),
    ],
)
def test_forward_backward(method, loss_keys, diag_keys):
    build = make(method)
    task = build.task
    out = task(*batch(build))
    assert {k for k in out if k.endswith("_loss")} == loss_keys
    assert diag_keys <= set(out)
    assert torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], sum(out[k] for k in loss_keys))
    assert ("fusion_logit_scale" in out) == (task.fusion is not None)
    out["loss"].backward()
    for name in ("visual.conv1.weight", "text.token_embedding.weight", "logit_scale"):
        assert task.model.get_parameter(name).grad.abs().sum() > 0, name
    if task.fusion is not None:
        assert out["fusion_loss"].item() == pytest.approx(2.0 * out["fusion"].item())
        assert task.fusion.blocks[0].linear1.weight.grad.abs().sum() > 0
        assert task.fusion_logit_scale.grad.abs() > 0
    if method == "siglip":
        assert task.model.logit_bias.grad.abs() > 0
        assert out["logit_scale"].item() == pytest.approx(10.0)
    if method == "slip":
        assert out["ssl_loss"].item() == pytest.approx(out["ssl"].item())  # ssl_scale 1
        assert task.ssl_head.layer1.weight.grad.abs().sum() > 0 and task.ssl_head.bn2.weight.grad.abs().sum() > 0
    if method == "flair":
        assert out["tcs_loss"].item() == pytest.approx(out["tcs"].item() / 2)
        assert task.flair_pool.attn.in_proj_weight.grad.abs().sum() > 0 and task.model.logit_bias.grad.abs() > 0
        assert out["logit_scale"].item() == pytest.approx(1 / 0.07) and task.model.logit_bias.item() == -10.0


def test_clip_task_equals_open_clip_loss():
    build = make("clip")
    images, texts = batch(build)
    out = build.task(images, texts)
    img, txt, scale = build.task.model(images[:, 0], texts[:, 0])
    ref = open_clip.ClipLoss()(img, txt, scale)
    assert out["contrastive_loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)


def test_ito_views_are_folded_in_the_right_order():
    build = make("ito_sub2")
    task = build.task.eval()
    images, texts = batch(build)
    out = task(images, texts)
    model = task.model
    per_pair, fused = [], {}
    for v in range(2):
        for w in range(2):
            u = model.encode_image(images[:, v], normalize=True)
            s = model.encode_text(texts[:, w], normalize=True)
            loss = open_clip.ClipLoss()(u, s, model.logit_scale.exp())
            per_pair.append(loss.item())
            assert out[f"align_v{v}_w{w}"].item() == pytest.approx(loss.item(), abs=1e-5)
            _, img_tok = models.encode_image_tokens(model, images[:, v])
            tt = models.encode_text_tokens(model, texts[:, w])
            fused[v, w] = task.fusion(img_tok[:, None], tt.tokens[:, None], tt.eot_index[:, None], tt.pad_mask[:, None])
    assert out["contrastive_loss"].item() == pytest.approx(sum(per_pair) / 4, abs=1e-5)
    stacked = torch.cat([fused[v, w] for v in range(2) for w in range(2)], dim=2).reshape(4, 4, -1)
    ref = FusionLoss(weight=2.0)(stacked, task.fusion_logit_scale.exp())
    assert out["fusion"].item() == pytest.approx(ref["fusion"].item(), abs=1e-5)


def test_fusion_head_masks_padding_and_reads_eot():
    head = FusionHead(image_width=8, text_width=6, width=16, depth=2, heads=4, embed_dim=5).eval()
    img, txt = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 7, 6)
    eot = torch.tensor([[3], [5]])
    pad = torch.arange(7)[None, None] > eot[..., None]
    base = head(img, txt, eot, pad)
    assert base.shape == (2, 1, 1, 5)
    assert torch.allclose(base.norm(dim=-1), torch.ones(2, 1, 1))
    changed_pad = txt.clone()
    changed_pad[0, 0, 4:] += 10.0  # sample 0: positions after its EOT (3)
    assert torch.allclose(head(img, changed_pad, eot, pad), base, atol=1e-6)
    changed_real = txt.clone()
    changed_real[0, 0, 1] += 1.0
    assert not torch.allclose(head(img, changed_real, eot, pad)[0], base[0], atol=1e-4)
    assert torch.allclose(head(img, changed_real, eot, pad)[1], base[1], atol=1e-6)


@pytest.mark.parametrize("method,head", [("ito", "fusion"), ("slip", "ssl_head"), ("flair", "flair_pool")])
def test_inference_model_has_no_head_parameters(method, head):
    build = make(method)
    task = build.task
    inference = task.inference_model()
    names = set(inference.state_dict())
    assert not any(part in n for n in names for part in ("fusion", "ssl", "layer1", "bn1", "pool", "ln_q"))
    fresh, *_ = models.create("ito-tiny", image_size=IMAGE, **build.method.model_kwargs)
    assert names == set(fresh.state_dict())
    head_params = sum(p.numel() for p in getattr(task, head).parameters()) + (method == "ito")  # + fusion 1/tau
    assert sum(p.numel() for p in task.parameters()) == sum(p.numel() for p in inference.parameters()) + head_params
    extra_state = set(task.state_dict()) - {f"model.{k}" for k in names}
    assert extra_state and all(k.startswith((head, "fusion_logit_scale")) for k in extra_state)


def test_slip_routes_views_and_uses_the_pre_projection_class_token():
    torch.manual_seed(3)
    build = make("slip")
    task, model = build.task, build.task.model
    images, texts = batch(build)
    assert images.shape[1] == 3  # 1 CLIP view + 2 SSL views
    out = task(images, texts)
    h = [models.encode_image_tokens(model, images[:, i])[1][:, 0] for i in (1, 2)]
    z = [torch.nn.functional.normalize(task.ssl_head(x), dim=-1) for x in h]
    assert out["ssl"].item() == pytest.approx(SimClrLoss(1.0, 0.1)(*z)["ssl"].item(), abs=1e-5)
    # h is the pooled feature before visual.proj: projecting it gives the CLIP image embedding
    emb = model.encode_image(images[:, 1], normalize=True)
    assert torch.allclose(torch.nn.functional.normalize(h[0] @ model.visual.proj, dim=-1), emb, atol=1e-5)
    ssl_changed = task(torch.cat([images[:, :2], images[:, 2:].flip(0)], 1), texts)  # re-pair the SSL views
    assert ssl_changed["contrastive_loss"].item() == pytest.approx(out["contrastive_loss"].item(), abs=1e-6)
    assert ssl_changed["ssl"].item() != pytest.approx(out["ssl"].item(), abs=1e-4)
    clip_changed = task(torch.cat([images[:, :1] * 0.5, images[:, 1:]], 1), texts)
    assert clip_changed["ssl"].item() == pytest.approx(out["ssl"].item(), abs=1e-6)
    assert clip_changed["contrastive_loss"].item() != pytest.approx(out["contrastive_loss"].item(), abs=1e-4)


def test_flair_task_matches_its_parts_and_ignores_batch_order():
    torch.manual_seed(4)
    build = make("flair", text_views=3)
    task, model = build.task, build.task.model
    images = torch.randn(5, 1, 3, IMAGE, IMAGE)
    words = ["red", "blue", "dog", "sky", "tree", "car", "night", "grass", "two", "old", "sea", "hat", "cup", "run", "sun"]
    texts = build.tokenizer([f"{words[i]} {words[(3 * i + 7) % 15]}" for i in range(15)]).reshape(5, 3, -1)
    with torch.no_grad():
        model.logit_bias.fill_(0.0)  # at -10 the negatives' terms are ~1e-5: which ones are chosen would not show
    out = task(images, texts)
    g = model.encode_image(images[:, 0], normalize=True)
    local = models.encode_image_tokens(model, images[:, 0])[1][:, 1:] @ model.visual.proj  # patch tokens only
    s = model.encode_text(texts.flatten(0, 1)).reshape(5, 3, -1)
    ref = FlairLoss("sampled")(g, local, s, model.logit_scale.exp(), model.logit_bias, task.flair_pool,
                               ids=sample_ids(texts))
    assert out["tcs"].item() == pytest.approx(ref["tcs"].item(), abs=1e-4)
    assert out["mps"].item() == pytest.approx(ref["mps"].item(), abs=1e-4)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert task(images[perm], texts[perm])["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-4)
    # chosen by position instead, the sampled negatives (and the loss) would change with the order
    by_position = FlairLoss("sampled")(g[perm], local[perm], s[perm], model.logit_scale.exp(), model.logit_bias,
                                       task.flair_pool)
    assert by_position["tcs"].item() != pytest.approx(ref["tcs"].item(), abs=1e-4)
    every = make("flair", text_views=3, flair_negatives="all")
    every.task.load_state_dict(task.state_dict())
    assert every.task(images, texts)["tcs"].item() != pytest.approx(out["tcs"].item(), abs=1e-4)


def test_ssl_and_flair_knobs():
    slip = make("slip").task
    assert (slip.ssl_head.layer1.out_features, slip.ssl_head.layer3.out_features) == (1024, 256)  # 16 x width 64
    assert slip.ssl_loss.temperature == 0.1 and slip.ssl_loss.scale == 1.0
    small = make("slip", ssl_mlp_dim=32, ssl_emb_dim=16, ssl_scale=0.5, ssl_temperature=0.2).task
    assert (small.ssl_head.layer2.in_features, small.ssl_head.layer3.out_features) == (32, 16)
    assert (small.ssl_loss.scale, small.ssl_loss.temperature) == (0.5, 0.2)
    assert make("slip", ssl_scale=0.0).task.ssl_head is None
    assert methods.resolve(Stage1Config(method="ito", model="ViT-B-16")).ssl_hidden_width(768) == 4096
    assert methods.resolve(Stage1Config(method="slip")).ssl_hidden_width(384) == 4096  # SLIP's ViT-S head
    combo = make("ito", ssl_scale=1.0)  # any method can add the SSL branch: 2 ITO views + 2 SSL views
    out = combo.task(*batch(combo))
    assert {k for k in out if k.endswith("_loss")} == {"contrastive_loss", "fusion_loss", "ssl_loss"}
    assert make("flair", flair_pool_heads=4).task.flair_pool.attn.num_heads == 4
    with pytest.raises(ConfigError, match="stage1.flair_pool_heads: the joint embedding width 64"):
        make("flair", flair_pool_heads=3)
    with pytest.raises(ConfigError, match="stage1.image_views: method 'flair'"):
        make("flair", image_views=2)


def test_fusion_knobs_change_the_head():
    default = make("ito").task.fusion
    assert len(default.blocks) == 2 and default.width == 64  # depth 2, text tower width
    head = make("ito", fusion_depth=3, fusion_width=32, fusion_heads=4).task.fusion
    assert len(head.blocks) == 3 and head.width == 32 and head.blocks[0].self_attn.num_heads == 4
    assert head.image_proj.weight.shape == (32, 64) and head.proj.weight.shape == (64, 32)
    with pytest.raises(ConfigError, match="stage1.fusion_heads: fusion width 30 .* not divisible"):
        make("ito", fusion_width=30, fusion_heads=4)


def test_grad_checkpointing_passes_through_and_keeps_values():
    torch.manual_seed(1)
    plain = make("ito")
    ckpt = make("ito", grad_checkpointing=True)
    ckpt.task.load_state_dict(plain.task.state_dict())
    assert ckpt.task.model.visual.transformer.grad_checkpointing and ckpt.task.fusion.grad_checkpointing
    assert not plain.task.model.visual.transformer.grad_checkpointing
    images, texts = batch(plain)
    a, b = plain.task(images, texts), ckpt.task(images, texts)
    a["loss"].backward()
    b["loss"].backward()
    assert a["loss"].item() == pytest.approx(b["loss"].item(), abs=1e-6)
    for name in ("model.visual.conv1.weight", "fusion.blocks.1.linear2.weight"):
        ga, gb = plain.task.get_parameter(name).grad, ckpt.task.get_parameter(name).grad
        assert torch.allclose(ga, gb, atol=1e-6), name


def test_clamp_logit_scales():
    task = make("ito").task
    with torch.no_grad():
        task.model.logit_scale.fill_(7.0)
        task.fusion_logit_scale.fill_(-1.0)
    task.clamp_logit_scales()
    assert task.model.logit_scale.item() == pytest.approx(math.log(100))
    assert task.fusion_logit_scale.item() == 0.0


def test_parameter_groups_cover_everything_once():
    task = make("ito").task
    groups = task.parameter_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(task.parameters()))
    no_decay = {id(p) for p in groups[0]["params"]}
    assert id(task.fusion_logit_scale) in no_decay and id(task.model.logit_scale) in no_decay
    assert id(task.fusion.blocks[0].linear1.weight) not in no_decay


def test_bad_input_shapes():
    build = make("ito")
    images, texts = batch(build)
    with pytest.raises(ValueError, match="V=2"):
        build.task(images[:, :1], texts)
    with pytest.raises(ValueError, match="W=1"):
        build.task(images, texts.repeat(1, 2, 1))


def test_resolve_defaults_and_overrides():
    r = methods.resolve(Stage1Config(method="ito"))
    assert (r.image_views, r.text_views, r.fusion_lambda, r.use_fusion) == (2, 1, 2.0, True)
    assert (r.text_view_kind, r.fusion_depth, r.fusion_width) == ("caption", 2, None)
    r = methods.resolve(Stage1Config(method="ito", image_views=3, text_views=2, fusion_lambda=0.0, fusion_depth=4))
    assert (r.image_views, r.text_views, r.fusion_lambda, r.use_fusion) == (3, 2, 0.0, False)
    assert r.text_view_kind == "subdescriptions" and r.fusion_depth == 4
    r = methods.resolve(Stage1Config(method="ito_sub2"))
    assert (r.image_views, r.text_views, r.text_view_kind) == (2, 2, "subdescriptions")
    r = methods.resolve(Stage1Config(method="clip"))
    assert (r.image_views, r.text_views, r.use_fusion) == (1, 1, False)
    r = methods.resolve(Stage1Config(method="siglip"))
    assert r.pair_loss.__name__ == "SigLipLoss" and r.model_kwargs["init_logit_bias"] == -10.0
    r = methods.resolve(Stage1Config(method="slip"))
    assert (r.image_views, r.text_views, r.ssl_views, r.ssl_scale, r.ssl_augment) == (1, 1, 2, 1.0, "simclr")
    assert (r.alignment, r.use_fusion, r.ssl_temperature, r.ssl_emb_dim) == ("pairwise", False, 0.1, 256)
    assert methods.resolve(Stage1Config(method="slip", ssl_augment="ito")).ssl_augment == "ito"
    r = methods.resolve(Stage1Config(method="flair"))
    assert (r.alignment, r.image_views, r.text_views, r.text_view_kind, r.ssl_views) == (
        "flair", 1, 8, "subdescriptions", 0)
    assert dict(r.model_kwargs) == {"init_logit_bias": -10.0} and r.flair_negatives == "sampled"
    assert methods.resolve(Stage1Config(method="clip")).ssl_views == 0
    with pytest.raises(ConfigError, match="stage1.method: unknown method 'nope'"):
        methods.resolve(Stage1Config(method="nope"))
    with pytest.raises(ConfigError, match="stage1.fusion_lambda"):
        methods.resolve(Stage1Config(method="clip", fusion_lambda=1.0))


def test_register_method_seam():
    spec = dataclasses.replace(methods.METHODS["ito"], image_views=3, fusion_lambda=4.0, description="test")
    methods.register_method("ito_v3_test", spec)
    try:
        build = make("ito_v3_test")
        assert build.method.image_views == 3 and build.task.fusion_loss.weight == 4.0
        out = build.task(*batch(build, n=2))
        assert "align_v2_w0" in out and torch.isfinite(out["loss"])
    finally:
        del methods.METHODS["ito_v3_test"]
    with pytest.raises(TypeError):
        methods.register_method("bad", {"image_views": 1})


def test_direct_task_construction_from_model():
    model, *_ = models.create("ito-tiny", image_size=IMAGE)
    method = methods.resolve(Stage1Config(method="ito", fusion_lambda=6.0))
    task = Stage1Task(model, method)
    assert task.inference_model() is model and task.fusion_loss.weight == 6.0
