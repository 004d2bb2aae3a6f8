"""`generate`: write the whole demo world (stage-1 shards and eval split, stage-2 LLaVA JSON,
stage-3 parquet benchmarks) and its manifest.

Every sample draws from its own generator seeded by (seed, stream, index), so the output
depends only on (size, seed, image_size) and splits never share a random stream.
Evaluation images are additionally checked against the training images' hashes.
The manifest is removed first and written last: a killed run never leaves a manifest
that claims files which are missing or stale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from common.io import InputError
from demo_world import benchmarks, instruct, writers
from demo_world.language import brief_caption
from demo_world.scenes import COLORS, SHAPES, jpeg_bytes, render, sample_scene

GENERATOR_VERSION = "3.0.0"
SIZES = {
    "tiny": {"stage1_train": 256, "stage1_shards": 2, "stage1_eval": 64, "stage2_images": 64, "stage2_finetune": 96,
             "pope_images": 8, "vqav2": 32, "gqa": 32, "mmstar": 32, "mmbench_questions": 8,
             "probe_train_per_class": 2, "probe_test_per_class": 1},
    "demo": {"stage1_train": 8192, "stage1_shards": 16, "stage1_eval": 500, "stage2_images": 3000,
             "stage2_finetune": 4000, "pope_images": 50, "vqav2": 300, "gqa": 300, "mmstar": 300,
             "mmbench_questions": 100, "probe_train_per_class": 20, "probe_test_per_class": 10},
}
STREAMS = {"stage1_train": 1, "stage1_eval": 2, "stage2_images": 3, "stage2_finetune": 4, "pope": 5, "vqav2": 6,
           "gqa": 7, "mmstar": 8, "mmbench": 9, "labels": 10,
           "probe_train": 11, "probe_test": 12}
TEMPLATES = ["a photo of a {}.", "a rendering of a {}.", "a {} on a background.", "a drawing of a {}.",
             "a picture of a small or large {}.", "there is a {} in the image."]
MAX_ATTEMPTS = 50
# Stage-1 pairs are object-centric, as photo alt-text data is: most images show one object. A batch then holds
# several images of one colour whose captions differ only in the shape, the pressure that makes a contrastive
# tower learn shapes (with 30% single-object scenes it learned colours only: zero-shot shape accuracy at chance).
STAGE1_COUNT_P = (0.6, 0.3, 0.1)
QUESTIONS_INDEX = 2**31 - 1


def _rng(seed: int, stream: str, index: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stream], index, attempt])


class _World:
    """Per-call state: output root, render settings, files written, training-image hashes."""

    def __init__(self, root: Path, seed: int, image_size: int) -> None:
        self.root, self.seed, self.image_size = root, seed, image_size
        self.files: list[Path] = []
        self.folders: dict[str, list[str]] = {}
        self.train_hashes: set[bytes] = set()

    def sample(self, stream: str, index: int, train: bool, **scene_kw) -> tuple[dict, bytes, np.random.Generator]:
        for attempt in range(MAX_ATTEMPTS):
            rng = _rng(self.seed, stream, index, attempt)
            scene = sample_scene(rng, **scene_kw)
            jpeg = jpeg_bytes(render(scene, self.image_size, rng))
            digest = hashlib.sha256(jpeg).digest()
            if train:
                self.train_hashes.add(digest)
                return scene, jpeg, rng
            if digest not in self.train_hashes:  # eval images stay disjoint from training images
                return scene, jpeg, rng
        raise RuntimeError(f"{stream}[{index}]: no image distinct from the training set in {MAX_ATTEMPTS} draws")

    def write(self, rel: str, writer, *args) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path, *args)
        self.files.append(path)
        return path

    def write_image(self, folder: str, name: str, jpeg: bytes) -> None:
        (self.root / folder).mkdir(parents=True, exist_ok=True)
        writers.write_file_nosync(self.root / folder / name, jpeg)
        self.folders.setdefault(folder, []).append(name)


def _stage1_train(w: _World, n: int, n_shards: int) -> list[str]:
    per_shard = -(-n // n_shards)
    names = []
    for s in range(n_shards):
        samples = []
        for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
            scene, jpeg, rng = w.sample("stage1_train", i, train=True, count_p=STAGE1_COUNT_P)
            key, text = f"{i:09d}", brief_caption(scene, rng)
            meta = {"key": key, "caption": text, "width": w.image_size, "height": w.image_size,
                    "original_width": w.image_size, "original_height": w.image_size, "status": "success",
                    "error_message": None, "url": f"world://stage1/{key}", "sha256": hashlib.sha256(jpeg).hexdigest(),
                    "scene": scene}
            samples.append({"__key__": key, "jpg": jpeg, "txt": text.encode(), "json": writers.json_bytes(meta, None)})
        names.append(f"{s:05d}.tar")
        w.write(f"stage1/shards/{names[-1]}", writers.write_shard, samples)
    return names


def _labelled(w: _World, stream: str, folder: str, n: int) -> tuple[list[dict], list[dict]]:
    """`n` single-object images whose (colour, shape) cycles over the 80 classes; (records, scenes)."""
    classes = sorted(f"{c} {s}" for c in COLORS for s in SHAPES)
    order = _rng(w.seed, "labels", STREAMS[stream]).permutation(len(classes))  # balanced, seed-dependent coverage
    records, scenes = [], []
    for i in range(n):
        label = classes[int(order[i % len(classes)])]
        color, shape = label.split(" ")
        scene, jpeg, rng = w.sample(stream, i, train=False, n_objects=1, first=(color, shape))
        w.write_image(f"{folder}/images", f"{i:06d}.jpg", jpeg)
        records.append({"image": f"images/{i:06d}.jpg", "caption": brief_caption(scene, rng), "label": label})
        scenes.append({"image": f"images/{i:06d}.jpg", "scene": scene})
    return records, scenes


def _stage1_eval(w: _World, n: int, probe_train: int, probe_test: int) -> None:
    """The zero-shot/retrieval split, and a linear-probe train/test pair (same classes, disjoint images)."""
    classes = sorted(f"{c} {s}" for c in COLORS for s in SHAPES)
    records, scenes = _labelled(w, "stage1_eval", "stage1/eval", n)
    w.write("stage1/eval/eval.jsonl", writers.write_jsonl, records)
    w.write("stage1/eval/scenes.jsonl", writers.write_jsonl, scenes)
    w.write("stage1/eval/classnames.json", writers.write_json, classes)
    w.write("stage1/eval/templates.json", writers.write_json, TEMPLATES)
    for split, per_class in (("train", probe_train), ("test", probe_test)):
        records, _ = _labelled(w, f"probe_{split}", f"stage1/probe_{split}", per_class * len(classes))
        w.write(f"stage1/probe_{split}/probe.jsonl", writers.write_jsonl, records)
        w.write(f"stage1/probe_{split}/classnames.json", writers.write_json, classes)


def _stage2(w: _World, n_images: int, n_finetune: int) -> int:
    scenes, pretrain = [], []
    for i in range(n_images):
        scene, jpeg, rng = w.sample("stage2_images", i, train=True)
        w.write_image("stage2/images", f"{i:06d}.jpg", jpeg)
        scenes.append(scene)
        # short alt-text captions, as LLaVA's pretrain set (LCS-558K: BLIP captions of CC3M/LAION/SBU): with the
        # world's full descriptions most caption tokens are templates and the pretrained MLLM's caption loss moved
        # 0.002 nats between its own and another image; with these, 0.03
        text = brief_caption(scene, rng)
        pretrain.append(instruct.pretrain_record(f"{i:09d}", f"{i:06d}.jpg", text, rng))
    w.write("stage2/pretrain.json", writers.write_json, pretrain)
    w.write("stage2/scenes.jsonl", writers.write_jsonl,
            [{"image": r["image"], "scene": scene} for r, scene in zip(pretrain, scenes, strict=True)])
    finetune, balance, text_only = [], instruct.YesNoBalancer(), 0
    for i in range(n_finetune):
        rng = _rng(w.seed, "stage2_finetune", i)
        if i % instruct.TEXT_ONLY_EVERY == instruct.TEXT_ONLY_EVERY - 1:
            finetune.append(instruct.text_only_record(f"text_{i:06d}", rng))
            text_only += 1
        else:
            k = i % n_images
            finetune.append(instruct.finetune_record(f"{i:09d}", f"{k:06d}.jpg", scenes[k], rng, balance))
    w.write("stage2/finetune.json", writers.write_json, finetune)
    return text_only


def _eval_items(w: _World, stream: str, n: int, **scene_kw) -> list[tuple[int, dict, bytes]]:
    return [(i, *w.sample(stream, i, train=False, **scene_kw)[:2]) for i in range(n)]


def _eval_sets(w: _World, c: dict) -> dict[str, int]:
    def questions_rng(name: str) -> np.random.Generator:
        return _rng(w.seed, name, QUESTIONS_INDEX)  # image draws use indices 0..n-1 of the same stream

    pairs = -(-c["vqav2"] // 2), -(-c["gqa"] // 2)  # two questions per image, as VQAv2/GQA ask several
    items = {
        "pope": _eval_items(w, "pope", c["pope_images"], n_objects=3, distinct_shapes=True),
        "vqav2": _eval_items(w, "vqav2", pairs[0]),
        "gqa": _eval_items(w, "gqa", pairs[1]),
        "mmstar": _eval_items(w, "mmstar", c["mmstar"]),
        "mmbench": _eval_items(w, "mmbench", c["mmbench_questions"]),
    }
    built = {
        "pope": benchmarks.pope(items["pope"], questions_rng("pope")),
        "vqav2": benchmarks.vqav2(items["vqav2"], questions_rng("vqav2"), c["vqav2"], instruct.YesNoBalancer()),
        "gqa": benchmarks.gqa(items["gqa"], questions_rng("gqa"), c["gqa"], instruct.YesNoBalancer()),
        "mmstar": benchmarks.mmstar(items["mmstar"], questions_rng("mmstar")),
        "mmbench": benchmarks.mmbench(items["mmbench"], questions_rng("mmbench")),
    }
    rows = {}
    for name, (cols, feats) in built.items():
        rows[name] = len(next(iter(cols.values())))
        w.write(f"eval/{name}.parquet", writers.write_parquet, cols, feats)
    scenes = [{"benchmark": name, "image_id": i, "scene": scene} for name, its in items.items() for i, scene, _ in its]
    w.write("eval/scenes.jsonl", writers.write_jsonl, scenes)
    return rows


def _prune(root: Path, folder: str, suffix: str, keep: list[str]) -> None:
    """Remove files of ours left by an earlier, larger generation (or a killed one) in the same directory."""
    d = root / folder
    if d.is_dir():
        keep_set = set(keep)
        for p in [*d.glob(f"*{suffix}"), *d.glob(f".*{suffix}.*tmp")]:
            if p.name not in keep_set:
                p.unlink()


def generate(out_dir: str | os.PathLike, size: str = "demo", seed: int = 0, image_size: int = 64) -> dict:
    """Render the demo world into `out_dir` and return its manifest (also written to manifest.json)."""
    if size not in SIZES:
        raise InputError(f"data.size: {size!r} is not one of {sorted(SIZES)}")
    if not 16 <= int(image_size) <= 1024:
        raise InputError(f"data.image_size: {image_size} is outside [16, 1024]")
    if int(seed) < 0:
        raise InputError(f"data.seed: {seed} must be >= 0")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)
    c = SIZES[size]
    w = _World(root, int(seed), int(image_size))

    shards = _stage1_train(w, c["stage1_train"], c["stage1_shards"])
    text_only = _stage2(w, c["stage2_images"], c["stage2_finetune"])
    _stage1_eval(w, c["stage1_eval"], c["probe_train_per_class"], c["probe_test_per_class"])
    rows = _eval_sets(w, c)
    _prune(root, "stage1/shards", ".tar", shards)
    for folder, names in w.folders.items():
        _prune(root, folder, ".jpg", names)
    os.sync()  # images were written without fsync; make them durable before the manifest claims them

    counts = {
        "stage1_train": c["stage1_train"], "stage1_shards": len(shards), "stage1_eval": c["stage1_eval"],
        "stage1_classes": len(COLORS) * len(SHAPES), "stage1_probe_train": c["probe_train_per_class"] * len(COLORS) * len(SHAPES),
        "stage1_probe_test": c["probe_test_per_class"] * len(COLORS) * len(SHAPES), "stage2_images": c["stage2_images"],
        "stage2_pretrain": c["stage2_images"], "stage2_finetune": c["stage2_finetune"],
        "stage2_finetune_text_only": text_only, "pope_images": c["pope_images"],
        "mmbench_questions": c["mmbench_questions"], **rows,
    }
    manifest = {
        "generator_version": GENERATOR_VERSION, "seed": int(seed), "size": size, "image_size": int(image_size),
        "counts": counts,
        "files": {p.relative_to(root).as_posix(): writers.file_entry(p) for p in sorted(w.files)},
        "folders": {f: writers.folder_entry(root / f, names) for f, names in sorted(w.folders.items())},
        "paths": {
            "stage1_shards": "stage1/shards/{" + shards[0][:-4] + ".." + shards[-1][:-4] + "}.tar",
            "stage1_eval": "stage1/eval/eval.jsonl",
            "stage1_probe_train": "stage1/probe_train/probe.jsonl",
            "stage1_probe_test": "stage1/probe_test/probe.jsonl",
            "stage1_classnames": "stage1/eval/classnames.json",
            "stage1_templates": "stage1/eval/templates.json",
            "stage2_pretrain": "stage2/pretrain.json",
            "stage2_finetune": "stage2/finetune.json",
            "stage2_images": "stage2/images",
            "scenes": {"stage1_eval": "stage1/eval/scenes.jsonl", "stage2": "stage2/scenes.jsonl",
                       "eval": "eval/scenes.jsonl"},
            "eval": {name: f"eval/{name}.parquet" for name in rows},
        },
    }
    writers.write_json(root / "manifest.json", manifest)
    return manifest
