"""Stage-1 training data: shards/CSV loading, determinism, resume, rank split, bad samples, views."""

import io
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_images import bomb_png, broken_png, truncated_png
from PIL import Image

from common.io import InputError
from stage1_pretrain.data import build_train_loader, index_shard
from stage1_pretrain.subdescriptions import TextViews
from stage1_pretrain.views import MultiView, load_rgb, make_view_transform, to_rgb

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZE, CTX = 16, 16


@pytest.fixture(scope="module")
def tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=CTX)


def _image_bytes(i: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    arr[: 8 + i % 16] = (i * 37 % 256, i * 91 % 256, i * 53 % 256)  # distinct per sample
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _caption(i: int) -> bytes:
    return f"Picture number {i}. It shows stripes and squares.".encode()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _good(i: int) -> list[tuple[str, bytes]]:
    key = f"{i:09d}"
    return [
        (f"{key}.jpg", _image_bytes(i)),
        (f"{key}.txt", _caption(i)),
        (f"{key}.json", b'{"key": "%s"}' % key.encode()),
    ]


def _make_shards(root: Path, n_shards: int, per_shard: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        members = [m for i in range(s * per_shard, (s + 1) * per_shard) for m in _good(i)]
        _write_tar(root / f"{s:05d}.tar", members)
    return f"{root}/{{00000..{n_shards - 1:05d}}}.tar"


def _loader(source, tokenizer, *, V=2, W=2, kind="ito", text_kind="subdescriptions", **kw):
    args = dict(
        tokenizer=tokenizer,
        image_transform=MultiView(make_view_transform(kind, SIZE, MEAN, STD), V),
        text_view_fn=TextViews(text_kind, W),
        batch_size_per_rank=4,
        rank=0,
        world_size=1,
        workers=0,
        seed=0,
        epoch=0,
        samples_per_epoch=None,
        resample=False,
        max_bad_fraction=0.0,
    )
    args.update(kw)
    return build_train_loader(source, **args)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"] and x["index"] == y["index"]
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["texts"], y["texts"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _make_shards(tmp_path_factory.mktemp("shards"), n_shards=3, per_shard=8)


@pytest.mark.parametrize("V, W, kind, text_kind", [(2, 2, "ito", "subdescriptions"), (1, 1, "open_clip", "caption")])
def test_batch_shapes(shards, tokenizer, V, W, kind, text_kind):
    loader = _loader(shards, tokenizer, V=V, W=W, kind=kind, text_kind=text_kind)
    batches = list(loader)
    assert len(loader) == loader.num_batches == len(batches) == 24 // 4
    for b in batches:
        assert b["images"].shape == (4, V, 3, SIZE, SIZE) and b["images"].dtype == torch.float32
        assert b["texts"].shape == (4, W, CTX) and b["texts"].dtype == torch.long
        assert len(b["keys"]) == 4 and b["bad"] == 0 and b["seen"] == 4
    assert sorted(k for b in batches for k in b["keys"]) == [f"{i:09d}" for i in range(24)]
    assert loader.counters.seen == 24 and loader.counters.bad == 0
    if W == 2:  # two different sentences of "Picture number i. It shows ..."
        assert all(not torch.equal(b["texts"][n, 0], b["texts"][n, 1]) for b in batches for n in range(4))
    if V == 2:
        assert not torch.equal(batches[0]["images"][0, 0], batches[0]["images"][0, 1])


def test_determinism_epochs_and_resume(shards, tokenizer):
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    run1 = list(_loader(shards, tokenizer))
    run2 = list(_loader(shards, tokenizer))
    _assert_same(run1, run2)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state  # global RNGs untouched

    epoch1 = list(_loader(shards, tokenizer, epoch=1))
    keys0, keys1 = [k for b in run1 for k in b["keys"]], [k for b in epoch1 for k in b["keys"]]
    assert keys0 != keys1 and sorted(keys0) == sorted(keys1)
    assert [k for b in list(_loader(shards, tokenizer, seed=1)) for k in b["keys"]] != keys0

    resumed = _loader(shards, tokenizer, skip_batches=2)
    assert len(resumed) == len(run1) - 2
    _assert_same(list(resumed), run1[2:])
    assert list(_loader(shards, tokenizer, skip_batches=len(run1))) == []


def test_workers_give_the_same_batches(shards, tokenizer):
    ref = list(_loader(shards, tokenizer, skip_batches=1))
    _assert_same(list(_loader(shards, tokenizer, skip_batches=1, workers=2)), ref)


def test_rank_split(tmp_path, tokenizer):
    src = _make_shards(tmp_path, n_shards=5, per_shard=7)
    for epoch in (0, 1):
        runs = [list(_loader(src, tokenizer, world_size=2, rank=r, batch_size_per_rank=3, epoch=epoch)) for r in (0, 1)]
        keys = [[k for b in run for k in b["keys"]] for run in runs]
        assert len(runs[0]) == len(runs[1]) == 35 // 2 // 3  # same count on every rank, in every epoch
        assert not set(keys[0]) & set(keys[1])
        assert len(set(keys[0])) == len(set(keys[1])) == 15  # 35 - 5 dropped
    # more processes than shards is fine: the split is per sample
    six = [
        {k for b in _loader(src, tokenizer, world_size=6, rank=r, batch_size_per_rank=2) for k in b["keys"]}
        for r in range(6)
    ]
    assert all(len(s) == 4 for s in six) and len(set().union(*six)) == 24


def _csv(tmp_path: Path, n: int, sep: str) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = [f"filepath{sep}caption"]
    for i in range(n):
        p = tmp_path / "img" / f"{i}.png"
        p.write_bytes(_image_bytes(i, "PNG"))
        path = str(p) if i == 0 else f"img/{i}.png"  # absolute and relative paths
        lines.append(f"{path}{sep}photo {i}. a test image")
    out = tmp_path / ("train.tsv" if sep == "\t" else "train.csv")
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.parametrize("sep", [",", "\t"])
def test_csv_source(tmp_path, tokenizer, sep):
    src = str(_csv(tmp_path, 10, sep))
    batches = list(_loader(src, tokenizer, batch_size_per_rank=3))
    assert len(batches) == 3 and batches[0]["images"].shape == (3, 2, 3, SIZE, SIZE)
    assert len({k for b in batches for k in b["keys"]}) == 9
    _assert_same(list(_loader(src, tokenizer, batch_size_per_rank=3, skip_batches=1)), batches[1:])
    ranks = [
        [k for b in _loader(src, tokenizer, batch_size_per_rank=2, world_size=2, rank=r) for k in b["keys"]]
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 4 and not set(ranks[0]) & set(ranks[1])


def test_csv_errors(tmp_path, tokenizer):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\na.png,hello\n")
    with pytest.raises(InputError, match=r"bad\.csv: header lacks column\(s\) filepath, caption"):
        _loader(str(bad), tokenizer)
    src = _csv(tmp_path, 8, ",")
    (tmp_path / "img" / "3.png").unlink()
    loader = _loader(str(src), tokenizer, max_bad_fraction=1.0)
    batches = list(loader)
    assert len(batches) == 2 and all(len(b["keys"]) == 4 for b in batches)
    assert loader.counters.bad >= 1 and "line 5 (cannot read image file" in loader.counters.first_bad
    assert "line5" not in {k for b in batches for k in b["keys"]}


def test_csv_bad_rows_are_skipped_and_counted(tmp_path, tokenizer):
    """Missing/empty image path, unreadable image, empty and non-UTF-8 captions in a CSV: counted skips naming
    CSV:line and the reason; the good rows all train; with max_bad_fraction=0 the first one stops with one line."""
    (tmp_path / "img").mkdir()
    for i in range(7):
        (tmp_path / "img" / f"{i}.png").write_bytes(_image_bytes(i, "PNG"))
    (tmp_path / "img" / "broken.png").write_bytes(truncated_png())
    rows = [b"filepath,caption"] + [b"img/%d.png,photo %d. a test image" % (i, i) for i in range(6)]
    bad = {  # line number -> reason
        8: (b"img/nope.png,a photo whose file is gone", "cannot read image file"),
        9: (b"img/6.png,", "empty caption"),
        10: (b"img/6.png,   ", "empty caption"),
        11: ("img/6.png,café crème".encode("latin-1"), "caption not valid UTF-8"),
        12: (b"img/broken.png,half a png", "not a readable image: OSError"),
        13: (b",a caption without a file", "empty filepath"),
    }
    rows += [line for line, _ in bad.values()]
    src = tmp_path / "train.csv"
    src.write_bytes(b"\n".join(rows) + b"\n")
    loader = _loader(str(src), tokenizer, batch_size_per_rank=4, max_bad_fraction=1.0)
    batches = list(loader)  # 12 rows -> 3 full batches; every bad slot refilled from good rows
    assert len(batches) == 3 and all(b["images"].shape[0] == 4 and len(b["keys"]) == 4 for b in batches)
    keys = {k for b in batches for k in b["keys"]}
    assert keys == {f"line{n}" for n in range(2, 8)}  # every good row kept, no bad one
    descs = {int(d.split(":line ")[1].split(" ")[0]): d for b in batches for d in b["bad_samples"]}
    assert set(descs) == set(bad)
    for line, (_, why) in bad.items():
        assert descs[line].startswith(f"{src}:line {line} (") and why in descs[line] and "\n" not in descs[line]
    assert loader.counters.bad == sum(b["bad"] for b in batches) >= len(bad)
    with pytest.raises(InputError) as info:
        list(_loader(str(src), tokenizer, batch_size_per_rank=4, max_bad_fraction=0.0))
    msg = str(info.value)
    assert "\n" not in msg and re.search(rf"max_bad_fraction=0%: first bad: {re.escape(str(src))}:line \d+ \(", msg), msg


def test_truncated_images_stay_bad_after_lmms_eval_relaxes_pil(monkeypatch):
    """lmms-eval sets PIL's global LOAD_TRUNCATED_IMAGES on import; our decoder stays strict and restores it."""
    from PIL import ImageFile

    from common.images import ImageDecodeError, decode_image

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for data in (truncated_png(), _image_bytes(1)[:-200]):
        with pytest.raises(ImageDecodeError, match="not a readable image: OSError"):
            decode_image(data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_csv_image_paths_stay_inside_the_image_root(tmp_path, tokenizer):
    """Relative paths that climb out and absolute paths outside the root are bad samples; `image_root` admits
    absolute paths inside it (open_clip CSVs often hold absolute paths)."""
    root, outside = tmp_path / "data", tmp_path / "secret"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    for i in range(4):
        (root / "img" / f"{i}.png").write_bytes(_image_bytes(i, "PNG"))
    (outside / "x.png").write_bytes(_image_bytes(9, "PNG"))
    rows = ["filepath,caption"] + [f"img/{i}.png,photo {i}." for i in range(3)] + [
        f"{root / 'img' / '3.png'},absolute inside the root",
        "../secret/x.png,climbs out",
        "img/../../secret/x.png,climbs out after a detour",
        f"{outside / 'x.png'},absolute outside",
    ]
    src = root / "train.csv"
    src.write_text("\n".join(rows) + "\n")
    batches = list(_loader(str(src), tokenizer, batch_size_per_rank=7, max_bad_fraction=1.0))
    keys = {k for b in batches for k in b["keys"]}
    assert keys == {f"line{n}" for n in range(2, 6)}  # the absolute path inside the root is fine
    reasons = {int(d.split(":line ")[1].split(" ")[0]): d for b in batches for d in b["bad_samples"]}  # line -> why
    assert sorted(reasons) == [6, 7, 8]
    assert "leaves the image folder" in reasons[6] and "leaves the image folder" in reasons[7]
    assert f"is outside the image root {root})" in reasons[8]
    # with the image root one level up the absolute paths are admitted, relative ones resolve against it
    batches = list(_loader(str(src), tokenizer, batch_size_per_rank=7, max_bad_fraction=1.0, image_root=str(tmp_path)))
    assert {k for b in batches for k in b["keys"]} == {"line5", "line8"}
    with pytest.raises(InputError, match=r"stage1\.image_root: .*nope is not a folder"):
        list(_loader(str(src), tokenizer, batch_size_per_rank=7, image_root=str(tmp_path / "nope")))


def _mode_png(mode: str) -> bytes:
    buf = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)).save(buf, "PNG")
    elif mode == "P":
        Image.open(io.BytesIO(_image_bytes(3, "PNG"))).convert("P").save(buf, "PNG")
    else:
        Image.open(io.BytesIO(_image_bytes(4, "PNG"))).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def _bad_shard(tmp_path: Path) -> tuple[str, dict[str, str]]:
    huge = io.BytesIO()
    Image.new("1", (9000, 9000)).save(huge, "PNG")  # 81 Mpx, compresses to ~10 kB
    jpeg = _image_bytes(1)
    members = [m for i in range(100, 106) for m in _good(i)]
    odd = {"gray": "L", "rgba": "RGBA", "palette": "P", "grey16": "I;16"}
    for key, mode in odd.items():
        members += [(f"{key}.png", _mode_png(mode)), (f"{key}.txt", b"an odd image mode")]
    bad = {
        "corrupt": "not a readable image",
        "notimage": "not a readable image",
        "notext": "missing caption",
        "emptycap": "empty caption",
        "latin1": "caption not valid UTF-8",
        "huge": "image too large: 9000x9000",
        "truncpng": "not a readable image: OSError",
        "brokenpng": "not a readable image: SyntaxError",  # PIL's SyntaxError, not an OSError
        "bomb": "image too large (Image size (400000000 pixels) exceeds limit",  # PIL's DecompressionBombError
        "noimage": "no image member (.jpg/.jpeg/.png/.webp)",
    }
    members += [("corrupt.jpg", jpeg[: len(jpeg) // 2]), ("corrupt.txt", b"half a jpeg")]
    members += [("notimage.jpg", b"this is not an image at all"), ("notimage.txt", b"text")]
    members += [("notext.jpg", jpeg), ("notext.json", b"{}")]
    members += [("emptycap.jpg", jpeg), ("emptycap.txt", b"  \n")]
    members += [("latin1.jpg", jpeg), ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"))]
    members += [("huge.png", huge.getvalue()), ("huge.txt", b"a huge blank image")]
    members += [("truncpng.png", truncated_png()), ("truncpng.txt", b"half a png")]
    members += [("brokenpng.png", broken_png()), ("brokenpng.txt", b"a png with a bad chunk length")]
    members += [("bomb.png", bomb_png()), ("bomb.txt", b"a 400 Mpx header")]
    members += [("noimage.txt", b"a caption without its image"), ("noimage.json", b"{}")]
    return str(_write_tar(tmp_path / "bad.tar", members)), bad


def test_bad_samples_are_skipped_and_counted(tmp_path, tokenizer):
    src, bad = _bad_shard(tmp_path)  # 6 good + 4 odd modes + 10 bad = 20 samples
    loader = _loader(src, tokenizer, max_bad_fraction=1.0)
    batches = list(loader)
    assert len(batches) == 5 and all(b["images"].shape == (4, 2, 3, SIZE, SIZE) for b in batches)
    keys = {k for b in batches for k in b["keys"]}
    assert {"gray", "rgba", "palette", "grey16"} <= keys and not keys & set(bad)
    reasons = {}
    for b in batches:
        assert b["bad"] == len(b["bad_samples"])
        for desc in b["bad_samples"]:
            key = desc.split(".tar:")[1].split(" ")[0]
            reasons[key] = desc
    assert set(reasons) == set(bad)
    for key, why in bad.items():
        assert why in reasons[key], reasons[key]
    c = loader.counters
    assert c.bad == sum(b["bad"] for b in batches) >= len(bad) and c.seen == 20 + c.bad
    assert all("\n" not in d for b in batches for d in b["bad_samples"])
    assert all(torch.isfinite(b["images"]).all() for b in batches)


def test_max_bad_fraction_raises(tmp_path, tokenizer):
    src, _ = _bad_shard(tmp_path)
    with pytest.raises(
        InputError,
        match=r"^stage1\.train_data: \d+ of \d+ samples \(.*%\) unreadable, more than max_bad_fraction=10%: first bad: .*bad\.tar:\w+ \(",
    ) as info:
        list(_loader(src, tokenizer, max_bad_fraction=0.1))
    assert "\n" not in str(info.value)
    loader = _loader(src, tokenizer, max_bad_fraction=0.0)  # 0: the first bad sample stops the run
    got = []
    with pytest.raises(InputError, match="max_bad_fraction=0%"):
        for b in loader:
            got.append(b)
    assert len(got) < loader.num_batches


def test_truncated_and_broken_tars(tmp_path, tokenizer):
    full = _write_tar(tmp_path / "full.tar", [m for i in range(10) for m in _good(i)])
    data = full.read_bytes()
    ix = index_shard(str(full))
    off, size = ix.image[6]
    cut = _write_tar(tmp_path / "cut.tar", [])
    cut.write_bytes(data[: off + size // 2])  # mid-way through sample 6's image
    ix = index_shard(str(cut))
    assert [ix.key(i) for i in range(6)] == [f"{i:09d}" for i in range(6)] and len(ix) == 7
    assert set(ix.bad) == {6} and ix.bad[6].startswith("truncated")

    boundary = tmp_path / "boundary.tar"
    boundary.write_bytes(data[: off - 512])  # just before sample 6's header: no end-of-archive block
    ix = index_shard(str(boundary))
    assert len(ix) == 7 and ix.key(6) == "<end of shard>" and set(ix.bad) == {6} and ix.bad[6].startswith("truncated")

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01" * 3000)
    src = f"{cut}::{boundary}::{junk}"
    loader = _loader(src, tokenizer, batch_size_per_rank=3, max_bad_fraction=1.0)
    batches = list(loader)  # 7 + 7 + 1 entries -> 5 batches of 3
    assert len(batches) == 5 and all(len(b["keys"]) == 3 for b in batches)
    descs = [d for b in batches for d in b["bad_samples"]]
    assert any("cut.tar:000000006 (truncated" in d for d in descs)
    assert any("boundary.tar:<end of shard> (truncated" in d for d in descs)
    assert any("junk.tar:<end of shard> (truncated or corrupt tar" in d for d in descs)
    assert {k for b in batches for k in b["keys"]} <= {f"{i:09d}" for i in range(6)}
    assert loader.counters.bad == len(descs) >= 3 and loader.counters.seen == 15 + loader.counters.bad


def test_resampled_shards(shards, tokenizer):
    loader = _loader(shards, tokenizer, resample=True, samples_per_epoch=30, batch_size_per_rank=4)
    batches = list(loader)
    assert len(batches) == 30 // 4 == loader.num_batches
    again = list(_loader(shards, tokenizer, resample=True, samples_per_epoch=30, batch_size_per_rank=4))
    _assert_same(batches, again)
    two = [_loader(shards, tokenizer, resample=True, samples_per_epoch=30, world_size=2, rank=r) for r in (0, 1)]
    assert [len(x) for x in two] == [30 // 8, 30 // 8]
    with pytest.raises(InputError, match="samples_per_epoch: required"):
        _loader(shards, tokenizer, resample=True)


def test_samples_per_epoch_caps_an_epoch(shards, tokenizer):
    assert len(_loader(shards, tokenizer, samples_per_epoch=10)) == 2
    with pytest.raises(InputError, match="not one full batch of 64"):
        _loader(shards, tokenizer, batch_size_per_rank=64)
    with pytest.raises(InputError, match="shards not found"):
        _loader(shards.replace("00002", "00003"), tokenizer)


# ------------------------------------------------------------------------------ views


def test_multiview_is_reproducible_and_leaves_global_rng_alone():
    img = load_rgb(_image_bytes(5))
    views = MultiView(make_view_transform("ito", SIZE, MEAN, STD), 3)
    state = torch.get_rng_state()
    a, b, c = views(img, 1), views(img, 1), views(img, 2)
    assert a.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a[0], a[1])
    assert torch.equal(torch.get_rng_state(), state)
    clip = MultiView(make_view_transform("open_clip", SIZE, MEAN, STD), 1)(img, 1)
    assert clip.shape == (1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="unknown augment policy 'nope'"):
        make_view_transform("nope", SIZE, MEAN, STD)


def test_view_transforms_follow_the_spec():
    from torchvision.transforms import Normalize, RandomResizedCrop

    ito = make_view_transform("ito", 224, MEAN, STD, scale_min=0.4).transforms
    crop = next(t for t in ito if isinstance(t, RandomResizedCrop))
    assert crop.size == (224, 224) and crop.scale == (0.4, 1.0) and crop.interpolation.value == "bicubic"
    jitter = next(t for t in ito if type(t).__name__ == "color_jitter")
    assert jitter.p == 0.8 and jitter.transf.brightness == (0.6, 1.4) and jitter.transf.contrast == (0.6, 1.4)
    assert jitter.transf.saturation == (0.6, 1.4) and jitter.transf.hue == (-0.1, 0.1)
    assert next(t for t in ito if type(t).__name__ == "gray_scale").p == 0.2
    assert next(t for t in ito if isinstance(t, Normalize)).mean == MEAN
    clip = make_view_transform("open_clip", 224, MEAN, STD).transforms
    assert next(t for t in clip if isinstance(t, RandomResizedCrop)).scale == (0.9, 1.0)
    assert not any(type(t).__name__ in ("color_jitter", "gray_scale") for t in clip)
    crop = make_view_transform("crop", 224, MEAN, STD).transforms
    assert next(t for t in crop if isinstance(t, RandomResizedCrop)).scale == (0.5, 1.0)
    assert not any(type(t).__name__ in ("color_jitter", "gray_scale") for t in crop)


def test_simclr_policy_is_slips_ssl_augmentation():
    from torchvision.transforms import GaussianBlur, Normalize, RandomApply, RandomHorizontalFlip, RandomResizedCrop

    steps = make_view_transform("simclr", 224, MEAN, STD).transforms
    names = [type(t).__name__ for t in steps]
    assert names == ["RandomResizedCrop", "MaybeConvertMode", "color_jitter", "gray_scale", "RandomApply",
                     "RandomHorizontalFlip", "MaybeToTensor", "Normalize"]  # SLIP's order
    assert steps[0].scale == (0.08, 1.0) and isinstance(steps[0], RandomResizedCrop)
    assert steps[2].p == 0.8 and steps[2].transf.hue == (-0.1, 0.1) and steps[3].p == 0.2
    blur = steps[4]
    assert isinstance(blur, RandomApply) and blur.p == 0.5 and isinstance(blur.transforms[0], GaussianBlur)
    assert blur.transforms[0].sigma == (0.1, 2.0) and blur.transforms[0].kernel_size == (13, 13)
    assert isinstance(steps[5], RandomHorizontalFlip) and steps[5].p == 0.5 and isinstance(steps[7], Normalize)
    small = make_view_transform("simclr", 64, MEAN, STD).transforms[4].transforms[0]  # sigma scaled to 64 px
    assert small.sigma == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224)) and small.kernel_size == (5, 5)
    assert not any(isinstance(t, (RandomApply, RandomHorizontalFlip)) for t in make_view_transform("ito", 64, MEAN, STD).transforms)


def test_multiview_appends_extra_views_after_the_main_ones():
    img = load_rgb(_image_bytes(3))
    main, ssl = make_view_transform("crop", SIZE, MEAN, STD), make_view_transform("simclr", SIZE, MEAN, STD)
    views = MultiView(main, 1, ssl, 2)
    a = views(img, 7)
    assert a.shape == (3, 3, SIZE, SIZE) and torch.equal(a, views(img, 7)) and not torch.equal(a[1], a[2])
    assert torch.equal(a[0], MultiView(main, 1)(img, 7)[0])  # the main views are drawn first, unchanged
    assert not torch.equal(a[1:], MultiView(main, 3)(img, 7)[1:])  # the extra views use their own policy
    with pytest.raises(ValueError, match="extra_transform"):
        MultiView(main, 1, None, 2)


def test_to_rgb_modes():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    g16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert g16.mode.startswith("I;16")
    assert [to_rgb(g16).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    pal = Image.new("P", (2, 2))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putpixel((0, 0), 1)
    assert to_rgb(pal).getpixel((0, 0)) == (200, 100, 50)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((1, 1)) == (77, 77, 77)
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))  # 16-bit range in a 32-bit "I" image
    assert i32.mode == "I" and to_rgb(i32).getpixel((1, 0)) == (255, 255, 255)
    # decoded files: a 16-bit PNG keeps its grey level (PIL's own convert("RGB") gives 255 here)
    assert load_rgb(_mode_png("I;16")).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257
    for mode in ("L", "RGBA", "P", "LA"):
        assert load_rgb(_mode_png(mode)).mode == "RGB"
    for mode in ("CMYK", "1"):
        buf = io.BytesIO()
        Image.new(mode, (8, 8)).save(buf, "TIFF")
        assert load_rgb(buf.getvalue()).size == (8, 8)
