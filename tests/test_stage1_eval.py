"""Stage-1 evaluation: metric functions on hand-made embeddings, loading/validation of the eval JSONL,
and evaluate() end to end on a tiny random open_clip.CLIP and on an 'oracle' dual encoder."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from bad_images import bomb_png
from PIL import Image

from common.io import InputError
from stage1_pretrain.embeddings import build_zero_shot_classifier, encode, zero_shot_top1
from stage1_pretrain.evalset import load_eval_records
from stage1_pretrain.evaluate import evaluate
from stage1_pretrain.metrics import linear_probe, modality_gap, retrieval_recall, stratified_split, zero_shot_accuracy
from stage1_pretrain.pictures import umap_plot

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
E = torch.eye(4)


# ---------------------------------------------------------------- fixtures


def _write_set(root, per_class=4, size=32, extra_lines=()):
    """12 solid-colour images with noise (3 classes), one caption each; returns the JSONL path."""
    rng = np.random.default_rng(0)
    lines = []
    for name, rgb in COLOURS.items():
        for i in range(per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            rel = f"img/{name}_{i}.png"
            (root / "img").mkdir(exist_ok=True)
            Image.fromarray(arr).save(root / rel)
            lines.append(json.dumps({"image": rel, "caption": f"a photo of a {name} square number {i}", "label": name}))
    lines.extend(extra_lines)
    path = root / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _tiny_clip():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return model, preprocess, tokenizer


class _Oracle(torch.nn.Module):
    """Embeds an image as its mean colour and a text as counts of colour words: zero-shot is solvable."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, x):
        return x.mean(dim=(2, 3)) + self.dummy

    def encode_text(self, counts):
        return counts.float() + 1e-3 + self.dummy


def _oracle_tokenizer(texts):
    return torch.tensor([[t.split().count(w) for w in COLOURS] for t in texts])


# ---------------------------------------------------------------- pure metrics


def test_retrieval_identical_embeddings_is_perfect():
    emb = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    r = retrieval_recall(emb, emb.clone())
    for direction in ("image_to_text", "text_to_image"):
        assert r[direction] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}


def test_retrieval_two_of_four_swapped():
    img = E.clone()
    txt = torch.stack([E[0], E[1], F.normalize(2 * E[3] + E[2], dim=0), F.normalize(2 * E[2] + E[3], dim=0)])
    r = retrieval_recall(img, txt, ks=(1, 2, 10))
    for direction in ("image_to_text", "text_to_image"):
        assert r[direction]["R@1"] == pytest.approx(0.5)
        assert r[direction]["R@2"] == pytest.approx(1.0)
        assert r[direction]["R@10"] == pytest.approx(1.0)  # k clamped to the 4 candidates


def test_retrieval_several_captions_per_image():
    img = E[:2, :2]
    txt = torch.stack([img[0], F.normalize(img[1] + 0.1 * img[0], dim=0), img[1], img[1]])
    r = retrieval_recall(img, txt, ks=(1,), text_to_image=[0, 0, 1, 1])
    assert r["text_to_image"]["R@1"] == pytest.approx(0.75)  # caption 1 looks like image 1
    assert r["image_to_text"]["R@1"] == pytest.approx(1.0)  # a hit if any own caption is top-1
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(img, txt)


def test_zero_shot_accuracy_hand_made():
    classifier = torch.eye(3)  # [D, C]
    images = torch.stack([torch.eye(3)[i] for i in (0, 1, 2, 0)])
    assert zero_shot_accuracy(images, torch.tensor([0, 1, 1, 0]), classifier) == pytest.approx(0.75)


def test_modality_gap_opposite_and_identical():
    gap = modality_gap(E[0].repeat(10, 1), -E[0].repeat(10, 1))
    assert gap["centroid_distance"] == pytest.approx(2.0)
    assert gap["linear_separability"] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(400, 8, generator=g), dim=-1) for _ in range(2))
    same = modality_gap(a, b)
    assert same["centroid_distance"] < 0.15
    assert abs(same["linear_separability"] - 0.5) < 0.08
    shifted = modality_gap(F.normalize(a + 0.5 * E[0, :].repeat(1, 2), dim=-1), b)
    assert shifted["centroid_distance"] > 0.3 and shifted["linear_separability"] > 0.75


def test_stratified_split_and_linear_probe():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2])  # class 2 has one sample
    tr, te = stratified_split(labels, 0.5, seed=0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(8)) and not set(tr) & set(te)
    assert 7 in tr and sorted(labels[tr].tolist()) == [0, 0, 1, 1, 2]
    assert np.array_equal(tr, stratified_split(labels, 0.5, seed=0)[0])
    g = torch.Generator().manual_seed(0)
    feats = torch.tensor(labels, dtype=torch.float).unsqueeze(1) * 5 + 0.1 * torch.randn(8, 3, generator=g)
    y = torch.tensor(labels)
    assert linear_probe(feats[tr], y[tr], feats[te], y[te]) == pytest.approx(1.0)
    assert linear_probe(feats[:4], y[:4], feats[4:], y[4:]) == pytest.approx(0.0)  # one training class
    assert linear_probe(feats[:4], y[:4], feats[:0], y[:0]) is None


# ---------------------------------------------------------------- loading


def test_load_defaults_and_side_files(tmp_path):
    path = _write_set(tmp_path)
    es = load_eval_records(path)
    assert len(es.images) == 12 and es.skipped == 0 and es.classnames == ["blue", "green", "red"]
    assert len(es.templates) == len(open_clip.SIMPLE_IMAGENET_TEMPLATES) and all("{}" in t for t in es.templates)
    (tmp_path / "classnames.json").write_text(json.dumps(["red", "green", "blue", "violet"]))
    (tmp_path / "templates.json").write_text(json.dumps(["a {} square", "{c} thing"]))
    es = load_eval_records(path)
    assert es.classnames == ["red", "green", "blue", "violet"] and es.templates == ["a {} square", "{c} thing"]
    assert es.label_ids()[:4].tolist() == [0, 0, 0, 0]
    (tmp_path / "templates.json").write_text(json.dumps(["no placeholder"]))
    with pytest.raises(InputError, match="templates.json: item 0"):
        load_eval_records(path)


def test_several_captions_share_an_image(tmp_path):
    path = _write_set(
        tmp_path, extra_lines=[json.dumps({"image": "img/red_0.png", "caption": "again", "label": "red"})]
    )
    es = load_eval_records(path)
    assert len(es.images) == 12 and len(es.records) == 13 and es.text_to_image[-1] == 0
    assert es.images[0].name == "red_0.png" and es.captions[-1] == "again"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"image": "img/missing.png", "caption": "x", "label": "red"}', "field 'image': file .*missing.png not found"),
        ('{"image": "../img/red_0.png", "caption": "x", "label": "red"}', "field 'image': '../img/red_0.png' leaves the image folder, expected a path inside"),
        ('{"image": "/etc/hostname", "caption": "x", "label": "red"}', "field 'image': '/etc/hostname' is an absolute path"),
        ('{"image": "img/red_0.png", "caption": ', "not valid JSON"),
        ('{"image": "img/red_0.png", "label": "red"}', "field 'caption': expected a non-empty string"),
        ('{"image": "notes.txt", "caption": "x", "label": "red"}', "not a readable image"),
        ('{"image": "bomb.png", "caption": "x", "label": "red"}', r"bomb\.png is not a readable image \(Image size"),
        ('{"image": "img/red_1.png", "caption": "x"}', "field 'label': missing while other records have one"),
        ('{"image": "img/red_1.png", "caption": "x", "label": "blue"}', "differs from 'red' for the same image"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, bad, message):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    path = _write_set(tmp_path, extra_lines=[bad])
    with pytest.raises(InputError, match=message) as e:
        load_eval_records(path)
    assert str(e.value).startswith(f"{path}:13: ") and "\n" not in str(e.value)


def test_skip_bad_counts(tmp_path):
    bad = ['{"image": "img/missing.png", "caption": "x", "label": "red"}', "{broken", ""]
    path = _write_set(tmp_path, extra_lines=bad)
    es = load_eval_records(path, skip_bad=True)
    assert es.skipped == 2 and len(es.records) == 12 and ":13:" in es.problems[0] and ":14:" in es.problems[1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{broken\n")
    with pytest.raises(InputError, match="no usable records"):
        load_eval_records(empty, skip_bad=True)


# ---------------------------------------------------------------- with a model


def test_classifier_follows_clip_protocol(tmp_path):
    model, _, tokenizer = _tiny_clip()
    templates = ["a {} square", "a photo of a {c}"]
    w = build_zero_shot_classifier(model, tokenizer, ["red", "blue"], templates)
    assert w.shape == (32, 2)
    with torch.no_grad():
        emb = F.normalize(model.encode_text(tokenizer(["a red square", "a photo of a red"])), dim=-1).mean(0)
    torch.testing.assert_close(w[:, 0], F.normalize(emb, dim=0), atol=1e-5, rtol=1e-5)


def test_oracle_encoder_scores_perfect_zero_shot(tmp_path):
    path = _write_set(tmp_path)
    preprocess = open_clip.image_transform(32, is_train=False)
    model = _Oracle().train()
    acc = zero_shot_top1(model, preprocess, _oracle_tokenizer, path)
    assert acc == pytest.approx(1.0) and model.training  # train mode restored
    m = evaluate(model, preprocess, _oracle_tokenizer, path, tmp_path / "out", umap=False)
    assert m["zero_shot_top1"] == pytest.approx(1.0) and m["linear_probe_top1"] == pytest.approx(1.0)
    assert m["zero_shot_chance"] == pytest.approx(1 / 3) and not (tmp_path / "out" / "umap.png").exists()


def test_evaluate_end_to_end_tiny_clip(tmp_path):
    torch.set_num_threads(1)
    path = _write_set(tmp_path, extra_lines=["{broken"])
    model, preprocess, tokenizer = _tiny_clip()
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"eval.jsonl:13: not valid JSON"):
        evaluate(model, preprocess, tokenizer, path, out, umap=False)
    m = evaluate(model, preprocess, tokenizer, path, out, batch_size=5, skip_bad=True)
    assert m == json.loads((out / "metrics.json").read_text())
    assert m["n"] == 12 and m["n_texts"] == 12 and m["skipped"] == 1 and m["num_classes"] == 3
    assert m["retrieval"]["chance_R@1"] == pytest.approx(1 / 12)
    values = [
        m["zero_shot_top1"],
        m["zero_shot_chance"],
        m["linear_probe_top1"],
        m["modality_gap"]["linear_separability"],
    ]
    values += [v for d in ("image_to_text", "text_to_image") for v in m["retrieval"][d].values()]
    assert len(values) == 10 and all(0.0 <= v <= 1.0 for v in values)
    assert 0.0 <= m["modality_gap"]["centroid_distance"] <= 2.0
    assert m["zero_shot_top1"] == pytest.approx(
        zero_shot_top1(model, preprocess, tokenizer, path, batch_size=7, skip_bad=True)
    )
    md = (out / "metrics.md").read_text()
    assert "| zero-shot top-1 (3 classes) |" in md and "image→text R@5" in md
    png = (out / "umap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(out / "umap.png").size == (600, 600)
    img, txt = encode(model, preprocess, tokenizer, load_eval_records(path, skip_bad=True), batch_size=5)
    assert img.shape == txt.shape == (12, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(12))
    title = f"eval.jsonl: gap {m['modality_gap']['centroid_distance']:.3f}"
    umap_plot(img, txt, tmp_path / "again.png", seed=0, title=title)
    assert (tmp_path / "again.png").read_bytes() == png  # deterministic given the seed


def test_eval_images_decode_as_training_images_do(tmp_path):
    """Transparency over white and 16-bit rescaling, as stage-1 training's load_rgb (not PIL's convert("RGB"))."""
    from stage1_pretrain.evalset import load_image
    from stage1_pretrain.views import load_rgb

    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    grey16 = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    for name, im in (("rgba.png", rgba), ("grey16.png", grey16)):
        im.save(tmp_path / name)
        got = load_image(tmp_path / name, "x")
        assert got.tobytes() == load_rgb((tmp_path / name).read_bytes()).tobytes()
    assert load_image(tmp_path / "rgba.png", "x").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "grey16.png", "x").getpixel((0, 0)) == (156, 156, 156)
