"""Feature cache: cached-feature training losses equal the pixel path; the key follows tower and preprocessing."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from bad_images import bomb_png, broken_png
from test_stage2_data import NUM_IMAGE_TOKENS, make_dataset, tiny_llava, write_llava_data

from common.io import InputError
from stage2_llava.data import Collator
from stage2_llava.feature_cache import FeatureCache, select_features
from stage2_llava.llava_json import load_llava_json
from stage2_llava.train import TrainForward, supervised_tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2cache")
    model, proc = tiny_llava(root)
    pre, fin, folder = write_llava_data(root, n_images=6)
    return model, proc, pre, fin, folder, root


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    fwd = TrainForward(model)
    n = float(supervised_tokens(batch["labels"]))
    loss = fwd(batch["input_ids"], batch["attention_mask"], batch["labels"], n,
               pixel_values=batch["pixel_values"], image_features=batch["image_features"])
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if "projector" in k}
    return loss.detach(), grads


@pytest.mark.parametrize("which", ["pretrain", "finetune"])
def test_cached_features_give_the_pixel_path_losses(tiny, tmp_path, which):
    torch.set_num_threads(1)
    model, proc, pre, fin, folder, _ = tiny
    path, template = (pre, "plain") if which == "pretrain" else (fin, "vicuna_v1")
    records, _ = load_llava_json(path, folder)
    cache = FeatureCache(tmp_path / "fc", model, proc.image_processor)
    stats = cache.build(records, str(folder), batch_size=4, shard_size=4, progress=False)
    assert stats == {"cached": 0, "computed": 6, "bad": 0}
    assert len(list(cache.shards.glob("*.safetensors"))) == 2
    table = cache.table(records, str(folder))
    feats = table("img1.png")
    assert feats.shape == (NUM_IMAGE_TOKENS, 32)  # patch tokens only (class token dropped), tower width
    direct = make_dataset(model, proc, path, folder, template)
    cached = make_dataset(model, proc, path, folder, template, features=table)
    collate = Collator(proc.tokenizer.pad_token_id)
    idx = list(range(min(5, len(direct))))
    b_pix, b_feat = collate([direct[i] for i in idx]), collate([cached[i] for i in idx])
    assert b_feat["pixel_values"] is None and b_feat["image_features"].shape[0] == b_pix["pixel_values"].shape[0]
    with torch.no_grad():
        ref = select_features(model, b_pix["pixel_values"])
    assert torch.allclose(ref, b_feat["image_features"], atol=1e-6)
    loss_pix, g_pix = _loss_and_grads(model, b_pix)
    loss_feat, g_feat = _loss_and_grads(model, b_feat)
    assert abs(float(loss_pix) - float(loss_feat)) <= 1e-5, (loss_pix, loss_feat)
    for k in g_pix:
        assert torch.allclose(g_pix[k], g_feat[k], atol=1e-6), k
    # a second build reuses everything
    assert cache.build(records, str(folder), progress=False) == {"cached": 6, "computed": 0, "bad": 0}


def test_key_changes_with_tower_weights_preprocessing_and_layer(tiny, tmp_path):
    model, proc, *_ = tiny
    base = FeatureCache(tmp_path, model, proc.image_processor)
    assert FeatureCache(tmp_path, copy.deepcopy(model), copy.deepcopy(proc.image_processor)).key == base.key
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.model.vision_tower.parameters()).view(-1)[0] += 1e-3
    assert FeatureCache(tmp_path, other, proc.image_processor).key != base.key
    lm_changed = copy.deepcopy(model)  # the LM and projector do not matter to the tower features
    with torch.no_grad():
        lm_changed.model.multi_modal_projector.linear_1.weight.add_(1.0)
    assert FeatureCache(tmp_path, lm_changed, proc.image_processor).key == base.key
    ip = copy.deepcopy(proc.image_processor)
    ip.image_mean = [0.5, 0.5, 0.5]
    assert FeatureCache(tmp_path, model, ip).key != base.key
    layer = copy.deepcopy(model)
    layer.config.vision_feature_layer = -1
    assert FeatureCache(tmp_path, layer, proc.image_processor).key != base.key
    assert FeatureCache(tmp_path, model, proc.image_processor, precision="bf16").key != base.key
    meta = json.loads((base.dir / "meta.json").read_text())
    assert meta["vision_feature_layer"] == -2 and len(meta["tower_sha256"]) == 64


def test_partial_build_resumes_and_shares_identical_images(tiny, tmp_path):
    model, proc, pre, _, folder, root = tiny
    records, _ = load_llava_json(pre, folder)
    cache = FeatureCache(tmp_path, model, proc.image_processor)
    assert cache.build(records[:2], str(folder), shard_size=1, progress=False)["computed"] == 2
    (cache.shards / ".torn.safetensors.abc.tmp").write_bytes(b"partial")  # a write killed mid-way is ignored
    again = FeatureCache(tmp_path, model, proc.image_processor)
    assert again.build(records, str(folder), shard_size=4, progress=False) == {"cached": 2, "computed": 4, "bad": 0}
    # the same picture in another folder is found by content
    copy_dir = root / "copy"
    copy_dir.mkdir(exist_ok=True)
    (copy_dir / "x.png").write_bytes((folder / "img3.png").read_bytes())
    rec = [type(records[0])(id="c", image="x.png", conversations=records[0].conversations)]
    assert again.build(rec, str(copy_dir), progress=False)["computed"] == 0
    assert torch.equal(again.table(rec, str(copy_dir))("x.png"), again.table(records, str(folder))("img3.png"))


def test_bad_images_fail_the_build_in_one_line_or_are_skipped_and_counted(tiny, tmp_path):
    """The cache's image loading meets a broken PNG (PIL SyntaxError) and a decompression-bomb header: one-line
    error naming the record and file, or (skip_bad) counted, left out of the table and skipped by the dataset."""
    model, proc, pre, _, folder, _ = tiny
    imgs = tmp_path / "imgs"
    shutil.copytree(folder, imgs)
    (imgs / "img1.png").write_bytes(broken_png())
    (imgs / "img4.png").write_bytes(bomb_png())
    records, _ = load_llava_json(pre, imgs)
    with pytest.raises(InputError) as info:
        FeatureCache(tmp_path / "strict", model, proc.image_processor).build(records, str(imgs), progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert re.match(r"stage-2 feature cache: record p1: image 'img1\.png': not a readable image: SyntaxError: broken PNG file", msg), msg
    cache = FeatureCache(tmp_path / "lenient", model, proc.image_processor)
    assert cache.build(records, str(imgs), skip_bad=True, progress=False) == {"cached": 0, "computed": 4, "bad": 2}
    table = cache.table(records, str(imgs))
    assert "img1.png" not in table and "img4.png" not in table and "img0.png" in table
    ds = make_dataset(model, proc, pre, imgs, "plain", features=table, skip_bad=True)
    it = ds[1]
    assert it["index"] == 2 and it["n_bad"] == 1 and it["image_features"].shape == (NUM_IMAGE_TOKENS, 32)
    strict = make_dataset(model, proc, pre, imgs, "plain", features=table)
    with pytest.raises(InputError, match=r"^stage-2 data: record p4 \(index 4\): image 'img4\.png': no cached features"):
        strict[4]
