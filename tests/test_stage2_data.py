"""Stage-2 data: pad-to-square images, dataset masking through expansion + padding, bad records, LLaVA's sampler.

`tiny_llava` / `write_llava_data` are shared with tests/test_stage2_cache.py and test_stage2_train.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from bad_images import bomb_png, broken_png, encode, mode_images, noise, truncated_jpeg, truncated_png
from PIL import Image

from common.io import InputError
from pipeline.config import load_config
from stage2_llava.data import (
    Collator,
    ImageLoader,
    LlavaDataset,
    StepBatchSampler,
    epoch_order,
    expand2square,
)
from stage2_llava.llava_json import load_llava_json
from stage2_llava.preprocess import IGNORE_INDEX, prepare_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

IMAGE_SIZE, PATCH = 32, 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


# ------------------------------------------------------------------------------ shared helpers

def tokenizer_dir(root: Path) -> Path:
    spec = importlib.util.find_spec("mistral_common")
    d = root / "llama_tok"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}))
    return d


def tiny_llava(root: Path, seed: int = 0):
    """(LlavaForConditionalGeneration, processor-like namespace) with a 32 px CLIP tower and a 2-layer Llama."""
    from types import SimpleNamespace

    tok = transformers.LlamaTokenizer.from_pretrained(str(tokenizer_dir(root)))
    image_id = prepare_tokenizer(tok)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    tc = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_id, vision_feature_layer=-2,
                                   image_seq_length=NUM_IMAGE_TOKENS)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg)
    ip = transformers.LlavaImageProcessor(do_pad=True, size={"shortest_edge": IMAGE_SIZE},
                                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, SimpleNamespace(tokenizer=tok, image_processor=ip)


COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 20)]


def write_llava_data(root: Path, n_images: int = 4) -> tuple[Path, Path, Path]:
    """Images of different aspect ratios + a plain (pretrain) and a vicuna (finetune, some text-only) JSON."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    pre, fin = [], []
    names = ["red", "green", "blue", "yellow"]
    for i in range(n_images):
        w, h = [(40, 24), (24, 48), (32, 32), (50, 30)][i % 4]
        im = Image.new("RGB", (w, h), COLORS[i % 4])
        im.putpixel((0, 0), (i * 20, 0, 0))  # every file distinct (the cache shares identical ones)
        im.save(folder / f"img{i}.png")
        color = names[i % 4]
        pre.append({"id": f"p{i}", "image": f"img{i}.png",
                    "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                      {"from": "gpt", "value": f"A {color} picture."}]})
        fin.append({"id": f"f{i}", "image": f"img{i}.png",
                    "conversations": [{"from": "human", "value": "What color is it?\n<image>"},
                                      {"from": "gpt", "value": color},
                                      {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]})
        if i % 2 == 0:
            fin.append({"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {color}."},
                                                         {"from": "gpt", "value": f"{color} {color}"}]})
    (root / "pretrain.json").write_text(json.dumps(pre))
    (root / "finetune.json").write_text(json.dumps(fin))
    return root / "pretrain.json", root / "finetune.json", folder


def make_dataset(model, proc, json_path, folder, template, **kw):
    records, _ = load_llava_json(json_path, folder)
    return LlavaDataset(records, proc.tokenizer, ImageLoader(proc.image_processor, folder), template=template,
                        image_token_id=model.config.image_token_id, num_image_tokens=NUM_IMAGE_TOKENS,
                        model_max_length=kw.pop("model_max_length", 128), **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2data")
    model, proc = tiny_llava(root)
    pre, fin, folder = write_llava_data(root)
    return model, proc, pre, fin, folder


# ------------------------------------------------------------------------------------- images

def test_expand2square_matches_llava_image_processor_padding(tiny):
    model, proc, _, _, folder = tiny
    img = Image.open(folder / "img0.png").convert("RGB")  # 40 x 24
    sq = expand2square(img, (10, 20, 30))
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == (10, 20, 30) and sq.getpixel((20, 20)) == COLORS[0]
    assert sq.getpixel((20, 7)) == (10, 20, 30) and sq.getpixel((20, 8)) == COLORS[0]  # (40-24)//2 = 8 rows on top
    loader = ImageLoader(proc.image_processor, folder)
    pv = loader("img0.png")
    assert pv.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    # the processor with do_pad=True pads the same way: our explicit padding is then a no-op
    ref = proc.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(pv, ref, atol=1e-5)
    # and without the processor's padding, the mean-colour pad is what makes the difference
    nopad = proc.image_processor(images=img, do_pad=False, return_tensors="pt")["pixel_values"][0]
    assert not torch.allclose(pv, nopad, atol=1e-2)
    # image_aspect_ratio "square" (LLaVA-1.5's pretrain): resize + centre crop, no padding at all
    square = ImageLoader(proc.image_processor, folder, pad=False)("img0.png")
    assert torch.equal(square, nopad)
    assert load_config("tiny").stage2.pretrain.image_aspect_ratio == "square"
    assert load_config("tiny").stage2.finetune.image_aspect_ratio == "pad"


# ------------------------------------------------------------------------------ dataset/collator

def test_items_and_batches_keep_masks_through_expansion_and_padding(tiny):
    model, proc, _, fin, folder = tiny
    ds = make_dataset(model, proc, fin, folder, "vicuna_v1")
    image_id, pad = model.config.image_token_id, proc.tokenizer.pad_token_id
    items = [ds[i] for i in range(3)]  # image, text-only, image
    assert [it["pixel_values"] is not None for it in items] == [True, False, True]
    for it in items:
        ids, labels = it["input_ids"], it["labels"]
        is_img = ids == image_id
        assert int(is_img.sum()) == (NUM_IMAGE_TOKENS if it["pixel_values"] is not None else 0)
        assert (labels[is_img] == IGNORE_INDEX).all()
        sup = labels != IGNORE_INDEX
        assert sup.any() and (labels[sup] == ids[sup]).all()
        assert proc.tokenizer.decode(ids[sup]).replace(" ", "") in ("green</s>Yes.</s>", "redred</s>",
                                                                     "red</s>Yes.</s>")
    batch = Collator(pad)(items)
    n = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, n)
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["image_features"] is None
    assert batch["image_index"].tolist() == [0, 2]
    for b, it in enumerate(items):
        k = len(it["input_ids"])
        assert torch.equal(batch["input_ids"][b, :k], it["input_ids"]) and (batch["input_ids"][b, k:] == pad).all()
        assert torch.equal(batch["labels"][b, :k], it["labels"]) and (batch["labels"][b, k:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].sum() == k
    assert torch.equal(batch["pixel_values"][1], items[2]["pixel_values"])
    # the batch is what LlavaForConditionalGeneration takes: image tokens and pixel values agree
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    pixel_values=batch["pixel_values"])
    assert torch.isfinite(out.loss)


def test_plain_template_and_truncation(tiny):
    model, proc, pre, _, folder = tiny
    ds = make_dataset(model, proc, pre, folder, "plain", model_max_length=NUM_IMAGE_TOKENS + 4)
    it = ds[1]
    ids, labels = it["input_ids"], it["labels"]
    assert len(ids) == NUM_IMAGE_TOKENS + 4  # BOS + 16 image tokens + 3 caption tokens, caption cut
    assert ids[0] == proc.tokenizer.bos_token_id and (labels[: 1 + NUM_IMAGE_TOKENS] == IGNORE_INDEX).all()
    assert (labels[1 + NUM_IMAGE_TOKENS:] == ids[1 + NUM_IMAGE_TOKENS:]).all()
    short = make_dataset(model, proc, pre, folder, "plain", model_max_length=NUM_IMAGE_TOKENS - 2)
    with pytest.raises(InputError, match=r"record p0 \(index 0\).*cuts into the 16 image tokens"):
        short[0]


def test_bad_records_raise_or_are_skipped_and_counted(tiny, tmp_path):
    model, proc, _, _, folder = tiny
    bad_folder = tmp_path / "imgs"
    shutil.copytree(folder, bad_folder)
    (bad_folder / "img1.png").write_bytes(b"not an image")
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    data = [{"id": "ok0", "image": "img0.png", "conversations": conv},
            {"id": "broken", "image": "img1.png", "conversations": conv},
            # " ASSISTANT: " inside a message: LLaVA's tokenization mismatch
            {"id": "mism", "image": "img2.png", "conversations": [{"from": "human", "value": "<image>\nSay: ASSISTANT: x"},
                                                                  {"from": "gpt", "value": "ASSISTANT: x"}]},
            {"id": "ok3", "image": "img3.png", "conversations": conv}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    strict = make_dataset(model, proc, path, bad_folder, "vicuna_v1")
    with pytest.raises(InputError, match=r"record broken \(index 1\)"):
        strict[1]
    with pytest.raises(InputError, match=r"record mism \(index 2\): tokenization mismatch"):
        strict[2]
    lenient = make_dataset(model, proc, path, bad_folder, "vicuna_v1", skip_bad=True)
    it = lenient[1]  # broken -> mismatch -> ok3
    assert it["index"] == 3 and it["n_bad"] == 1 and it["n_mismatch"] == 1
    batch = Collator(proc.tokenizer.pad_token_id)([lenient[0], it])
    assert batch["n_bad"] == 1 and batch["n_mismatch"] == 1 and batch["index"].tolist() == [0, 3]


# ------------------------------------------------------------------- bad image files at training time

# file name -> (bytes builder, or None for a file deleted after validation; what the one-line message says)
EXPECTED = r"; expected a decodable image of at most \d+ pixels$"
BAD_IMAGES = {
    "trunc.jpg": (truncated_jpeg, r"image 'trunc\.jpg': not a readable image: OSError: .+" + EXPECTED),
    "trunc.png": (truncated_png, r"image 'trunc\.png': not a readable image: OSError: .+" + EXPECTED),
    "broken.png": (broken_png, r"image 'broken\.png': not a readable image: SyntaxError: broken PNG file.*" + EXPECTED),
    "text.jpg": (lambda: b"not an image", r"image 'text\.jpg': not a readable image: UnidentifiedImageError: .+" + EXPECTED),
    "bomb.png": (bomb_png, r"image 'bomb\.png': image too large \(Image size \(400000000 pixels\) exceeds .+\)" + EXPECTED),
    "gone.png": (None, r"image file 'gone\.png' not found in .+imgs, expected an existing file"),
}


def _bad_image_json(tmp_path: Path, name: str, make) -> tuple[Path, Path]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "ok0.png").write_bytes(encode(noise(0, 40)))
    (folder / "ok2.png").write_bytes(encode(noise(2, 40)))
    (folder / name).write_bytes(make() if make else encode(noise(1, 40)))
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Noise."}]
    data = [{"id": rid, "image": image, "conversations": conv}
            for rid, image in (("ok0", "ok0.png"), ("bad", name), ("ok2", "ok2.png"))]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    return path, folder


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_file_raises_one_line_or_is_skipped_and_counted(tiny, tmp_path, caplog, name):
    """A record whose image passes JSON validation (the file exists) but cannot be used when the sample is loaded:
    corrupt JPEG/PNG (PIL's OSError, SyntaxError, UnidentifiedImageError), a decompression-bomb header (PIL's
    DecompressionBombError), a file deleted after validation."""
    model, proc, _, _, _ = tiny
    make, pattern = BAD_IMAGES[name]
    path, folder = _bad_image_json(tmp_path, name, make)
    strict = make_dataset(model, proc, path, folder, "plain")
    lenient = make_dataset(model, proc, path, folder, "plain", skip_bad=True)
    if make is None:
        (folder / name).unlink()
    with pytest.raises(InputError) as info:
        strict[1]
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("stage-2 data: record bad (index 1): "), msg
    assert re.search(pattern, msg), msg
    assert strict[0]["index"] == 0 and strict[2]["index"] == 2  # the good neighbours still load
    with caplog.at_level(logging.WARNING, logger="stage2_llava.data"):
        it = lenient[1]
    assert it["index"] == 2 and it["n_bad"] == 1 and it["n_mismatch"] == 0
    assert it["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert [r.getMessage() for r in caplog.records] == [f"skipped {msg}"]
    batch = Collator(proc.tokenizer.pad_token_id)([lenient[0], it])
    assert batch["n_bad"] == 1 and batch["index"].tolist() == [0, 2] and batch["pixel_values"].shape[0] == 2


def test_image_modes_load_as_their_rgb_content(tiny, tmp_path):
    """Grey, RGBA, palette and 16-bit grey files give the pixels of the 8-bit RGB image they show (PIL's own
    convert("RGB") turns a 16-bit grey of 40000 into white)."""
    _, proc, _, _, _ = tiny
    loader = ImageLoader(proc.image_processor, tmp_path)
    for i, (mode, (data, rgb)) in enumerate(mode_images().items()):
        (tmp_path / f"m{i}.png").write_bytes(data)
        (tmp_path / f"ref{i}.png").write_bytes(encode(rgb))
        assert Image.open(tmp_path / f"m{i}.png").mode == mode
        got, want = loader(f"m{i}.png"), loader(f"ref{i}.png")
        assert got.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert torch.allclose(got, want, atol=1e-6), mode


def test_bad_record_stops_the_phase_before_anything_is_written(tmp_path):
    """Nothing already written is lost: a malformed record mid-file (skip_bad_records=false) stops `run_phase`
    with one line naming the file and the record before the output directory, or anything beside it, is touched."""
    from pipeline.config import load_config
    from stage2_llava.train import run_phase

    pre, _, folder = write_llava_data(tmp_path / "data")
    records = json.loads(pre.read_text())
    records.insert(2, {"id": "bad", "image": "img0.png", "conversations": [{"from": "human", "value": "no token"},
                                                                           {"from": "gpt", "value": "x"}]})
    bad_json = tmp_path / "data" / "bad.json"
    bad_json.write_text(json.dumps(records))
    runs = tmp_path / "runs"
    out = runs / "pretrain"
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "config.json").write_text('{"previous": "run"}')
    (out / "train_summary.json").write_text('{"steps": 3}')

    def snapshot():
        return {str(p.relative_to(runs)): (p.read_bytes() if p.is_file() else None) for p in sorted(runs.rglob("*"))}

    before = snapshot()
    cfg = load_config("tiny", ["stage2.skip_bad_records=false"]).stage2
    with pytest.raises(InputError) as info:
        run_phase("pretrain", cfg, data_json=str(bad_json), image_folder=str(folder), out_dir=out)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{bad_json}: record bad (index 2): the first human turn has 0 '<image>'")
    assert snapshot() == before


# -------------------------------------------------------------------------------------- sampler

def _lengths(n_img=37, n_txt=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = (torch.randint(5, 400, (n_img,), generator=g)).tolist()
    txt = (-torch.randint(5, 400, (n_txt,), generator=g)).tolist()
    lengths = img + txt
    perm = torch.randperm(len(lengths), generator=g).tolist()
    return [lengths[i] for i in perm]


def test_modality_grouped_order_groups_sorts_and_is_deterministic():
    lengths = _lengths()
    per_device, chunks = 2, 4  # global batch 8
    order = epoch_order(lengths, per_device, chunks, seed=3, epoch=0, group_by_modality=True)
    assert len(order) == 64 and Counter(order[:58]) == Counter(range(58))  # padded with the epoch's start
    assert order[58:] == order[:6]
    megabatches = [order[i:i + 8] for i in range(0, 56, 8)]
    # all megabatches but the last (LLaVA's mixed leftover) hold one modality
    full = megabatches[:-1]
    assert all(len({lengths[i] > 0 for i in mb}) == 1 for mb in full)
    assert sum(all(lengths[i] > 0 for i in mb) for mb in full) == 37 // 8
    # inside a megabatch, the per-device chunks come from the length-sorted list (longest first per chunk)
    for mb in full:
        for c in range(chunks):
            chunk = mb[c * per_device:(c + 1) * per_device]
            assert abs(lengths[chunk[0]]) >= abs(lengths[chunk[1]])
    assert order == epoch_order(lengths, per_device, chunks, seed=3, epoch=0, group_by_modality=True)
    assert order != epoch_order(lengths, per_device, chunks, seed=3, epoch=1, group_by_modality=True)
    assert order != epoch_order(lengths, per_device, chunks, seed=4, epoch=0, group_by_modality=True)
    plain = epoch_order(lengths, per_device, chunks, seed=3, epoch=0, group_by_modality=False)
    assert Counter(plain[:58]) == Counter(range(58)) and plain != order


def test_step_sampler_splits_global_batches_and_resumes():
    lengths = _lengths()
    kw = dict(per_device=2, seed=0, epoch=2, group_by_modality=True)
    order = epoch_order(lengths, 2, 4, seed=0, epoch=2, group_by_modality=True)
    # 2 ranks x 2 accumulation steps, and 1 rank x 4: the same samples in every global batch
    two = [list(StepBatchSampler(lengths, accum=2, world=2, rank=r, **kw)) for r in range(2)]
    one = list(StepBatchSampler(lengths, accum=4, world=1, rank=0, **kw))
    steps = len(order) // 8
    assert len(one) == 4 * steps and len(two[0]) == 2 * steps
    for s in range(steps):
        g = order[8 * s:8 * (s + 1)]
        assert sorted(i for mb in one[4 * s:4 * s + 4] for i in mb) == sorted(g)
        assert sorted(i for r in range(2) for mb in two[r][2 * s:2 * s + 2] for i in mb) == sorted(g)
        assert two[1][2 * s + 1] == g[6:8]  # micro-batch a of rank r is chunk a*world + r
    resumed = list(StepBatchSampler(lengths, accum=2, world=2, rank=1, start_step=3, **kw))
    assert resumed == two[1][6:] and len(resumed) == 2 * (steps - 3)
