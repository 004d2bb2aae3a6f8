"""Demo world: determinism, file formats, caption/scene consistency, benchmark layouts."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.io import InputError
from demo_world import GENERATOR_VERSION, SIZES, generate, multichoice
from demo_world import language as L
from demo_world.scenes import COLORS, REGIONS, SHAPES, render, sample_scene

# before any `datasets` import (the tests import it lazily): never reach for the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PARQUET_COLUMNS = {
    "pope": ["id", "question_id", "question", "answer", "image_source", "image", "category"],
    "vqav2": ["question_id", "question", "question_type", "answer_type", "multiple_choice_answer", "answers",
              "image_id", "image"],
    "gqa": ["id", "imageId", "question", "answer", "fullAnswer", "isBalanced", "types", "image"],
    "mmstar": ["index", "question", "image", "answer", "category", "l2_category", "meta_info"],
    "mmbench": ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "L2-category", "source",
                "split", "image"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "tiny"
    manifest = generate(root, size="tiny", seed=0)
    return root, manifest


def _load(path: Path):
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset("parquet", data_files=str(path), split="train")


def _expand(pattern: str) -> list[str]:
    m = re.fullmatch(r"(.*)\{(\d+)\.\.(\d+)\}(.*)", pattern)
    width = len(m.group(2))
    return [f"{m.group(1)}{i:0{width}d}{m.group(4)}" for i in range(int(m.group(2)), int(m.group(3)) + 1)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- determinism and manifest -------------------------------------------------------------


def test_same_seed_is_byte_identical_and_other_seed_differs(world, tmp_path):
    root, manifest = world
    again = generate(tmp_path / "again", size="tiny", seed=0)
    assert again["files"] == manifest["files"] and again["folders"] == manifest["folders"]
    for rel in ("stage1/shards/00000.tar", "eval/pope.parquet", "stage2/finetune.json", "stage2/images/000003.jpg"):
        assert (root / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    other = generate(tmp_path / "other", size="tiny", seed=1)
    assert other["files"]["stage1/shards/00000.tar"] != manifest["files"]["stage1/shards/00000.tar"]
    assert other["files"]["stage2/finetune.json"] != manifest["files"]["stage2/finetune.json"]
    assert other["folders"]["stage2/images"]["sha256"] != manifest["folders"]["stage2/images"]["sha256"]


def test_manifest_describes_every_file(world):
    root, manifest = world
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["generator_version"] == GENERATOR_VERSION and manifest["size"] == "tiny"
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    folders = manifest["folders"]
    listed = set(manifest["files"]) | {f"{f}/{n}" for f in folders for n in os.listdir(root / f)}
    assert on_disk == listed
    for rel, entry in manifest["files"].items():
        data = (root / rel).read_bytes()
        assert entry == {"bytes": len(data), "sha256": _sha(data)}, rel
    assert folders["stage2/images"]["count"] == SIZES["tiny"]["stage2_images"]
    assert folders["stage1/eval/images"]["count"] == SIZES["tiny"]["stage1_eval"]
    paths = manifest["paths"]
    assert _expand(paths["stage1_shards"]) == ["stage1/shards/00000.tar", "stage1/shards/00001.tar"]
    for key in ("stage1_eval", "stage2_pretrain", "stage2_finetune", "stage2_images"):
        assert (root / paths[key]).exists(), key
    assert sorted(paths["eval"]) == sorted(PARQUET_COLUMNS)
    assert manifest["counts"]["stage2_finetune_text_only"] == SIZES["tiny"]["stage2_finetune"] // 20


def test_regenerating_smaller_prunes_stale_files(world, tmp_path):
    root = tmp_path / "w"
    generate(root, size="tiny", seed=0)
    (root / "stage1/shards/00007.tar").write_bytes(b"stale")
    (root / "stage2/images/999999.jpg").write_bytes(b"stale")
    (root / "stage2/images/.000001.jpg.tmp").write_bytes(b"torn")  # what a killed image write leaves
    generate(root, size="tiny", seed=0)
    assert not (root / "stage1/shards/00007.tar").exists() and not (root / "stage2/images/999999.jpg").exists()
    assert not (root / "stage2/images/.000001.jpg.tmp").exists()
    assert (root / "manifest.json").exists()


def test_bad_arguments_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="data.size"):
        generate(tmp_path, size="huge")
    with pytest.raises(InputError, match="data.image_size"):
        generate(tmp_path, size="tiny", image_size=4)
    assert not (tmp_path / "manifest.json").exists()


# --- captions and questions ---------------------------------------------------------------


def test_captions_name_exactly_the_scene_objects():
    for i in range(400):
        rng = np.random.default_rng([7, i])
        scene = sample_scene(rng)
        text = L.caption(scene, rng, detailed=bool(i % 2))
        assert L.mentions(text) == {(o["color"], o["shape"]) for o in scene["objects"]}, text
        sentences = [s for s in re.split(r"(?<=\.)\s+", text) if s]
        assert all(s.endswith(".") and s[0].isupper() for s in sentences), text
        assert len(sentences) >= scene["count"] + 2  # one per object, count, background (+ relation)


def test_scene_sampling_invariants():
    shapes = Counter()
    for i in range(500):
        scene = sample_scene(np.random.default_rng([3, i]))
        objs = scene["objects"]
        assert scene["count"] == len(objs) and 1 <= len(objs) <= 3
        assert len({o["region"] for o in objs}) == len(objs)  # distinct grid cells
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
        for o in objs:
            x0, y0, x1, y1 = o["position"]["bbox"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert REGIONS.index(o["region"]) == int(o["position"]["y"] * 3) * 3 + int(o["position"]["x"] * 3)
        for a in objs:  # objects may cross cell borders but never touch each other
            for b in objs:
                ra, rb = a["position"]["r"], b["position"]["r"]
                d = ((a["position"]["x"] - b["position"]["x"]) ** 2 + (a["position"]["y"] - b["position"]["y"]) ** 2) ** 0.5
                assert a is b or d >= ra + rb
        shapes.update(o["shape"] for o in objs)
    # non-uniform statistics, so POPE's popular and adversarial negatives differ from random ones
    shapes, pairs = Counter(), Counter()
    for i in range(1500):
        objs = sorted(o["shape"] for o in sample_scene(np.random.default_rng([4, i]), 3, True)["objects"])
        shapes.update(objs)
        pairs.update((a, b) for a in objs for b in objs if a < b)
    assert shapes.most_common(1)[0][0] == "circle" and shapes["circle"] > 1.5 * shapes["crescent"]
    assert shapes["triangle"] > shapes["ring"] and pairs[("circle", "ring")] > 1.3 * pairs[("circle", "triangle")]
    img = render(scene, 48, np.random.default_rng(0))
    assert img.size == (48, 48) and img.mode == "RGB"


def _scene(*objs, bg=("solid", "white")):
    return {"objects": [{"color": c, "shape": s, "size": z, "region": r,
                         "position": {"x": 0.5, "y": 0.5, "bbox": [0.4, 0.4, 0.6, 0.6]}} for c, s, z, r in objs],
            "background": {"kind": bg[0], "color": bg[1]}, "count": len(objs)}


def test_question_generators_answer_from_the_scene():
    scene = _scene(("red", "star", "small", "top left"), ("blue", "circle", "large", "bottom right"),
                   ("green", "circle", "small", "top right"))
    rng = np.random.default_rng(0)
    for _ in range(30):
        qa = L.qa_color(scene, rng)
        assert (qa.question, qa.answer) in {(q, "red") for q in (
            "What color is the star?", "What is the color of the star?", "Which color does the star have?")}
        assert L.qa_exists(scene, rng, False).answer == "no"
        no = L.qa_exists(scene, rng, False)
        present = {(o["color"], o["shape"]) for o in scene["objects"]}
        assert len(L.mentions(no.question)) == 1 and not L.mentions(no.question) & present
        rel = L.qa_relation(scene, rng, want_yes=False)
        assert rel.answer == "no"
        qa = L.qa_size(scene, rng)
        assert qa.answer == {"red star": "small", "blue circle": "large", "green circle": "small"}[
            " ".join(qa.question.split("the ")[1].split()[:2]).rstrip("?")]
    assert L.relation(scene["objects"][0], scene["objects"][1]) == "left"
    assert L.relation(scene["objects"][2], scene["objects"][1]) == "above"
    assert L.qa_count(scene, np.random.default_rng(1)).answer in {"0", "1", "2", "3"}
    options, letter = L.make_choices(L.qa_color(scene, rng), rng)
    assert len(set(options)) == 4 and options["ABCD".index(letter)] == "red"


def test_multiple_choice_answers_point_at_the_truth():
    seen = set()
    for i in range(300):
        rng = np.random.default_rng([11, i])
        scene = sample_scene(rng)
        mc = multichoice.sample(scene, rng)
        assert len(mc.options) == 4 and len(set(mc.options)) == 4 and mc.letter in "ABCD"
        seen.add(mc.mmstar)
        correct = mc.options["ABCD".index(mc.letter)]
        if mc.question.startswith("What kind of background"):
            assert correct == L.BACKGROUND_WORDS[scene["background"]["kind"]]
        if mc.question == "What is the color of the background?":
            assert correct == scene["background"]["color"]
    assert len(seen) >= 10


# --- stage-1 files --------------------------------------------------------------------------


def test_shards_read_with_webdataset(world):
    import webdataset as wds

    root, manifest = world
    urls = [str(root / p) for p in _expand(manifest["paths"]["stage1_shards"])]
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        assert re.fullmatch(r"\d{9}", sample["__key__"]) and meta["key"] == sample["__key__"]
        assert sample["jpg"].size == (64, 64) and sample["jpg"].mode == "RGB"
        assert sample["txt"] == meta["caption"] and meta["status"] == "success"
        assert (meta["width"], meta["height"]) == (64, 64)
        assert L.mentions(sample["txt"]) == {(o["color"], o["shape"]) for o in meta["scene"]["objects"]}
        n += 1
    assert n == SIZES["tiny"]["stage1_train"]
    import tarfile

    with tarfile.open(urls[0]) as tf:  # reproducible headers: no timestamps, fixed owner
        members = tf.getmembers()
    assert {(m.mtime, m.uname, m.gname) for m in members} == {(0, "ito", "ito")}
    assert [m.name for m in members[:3]] == ["000000000.jpg", "000000000.json", "000000000.txt"]


def test_stage1_eval_split(world):
    root, manifest = world
    jsonl = root / manifest["paths"]["stage1_eval"]
    classnames = json.loads((jsonl.parent / "classnames.json").read_text())
    templates = json.loads((jsonl.parent / "templates.json").read_text())
    assert classnames == sorted(f"{c} {s}" for c in COLORS for s in SHAPES)
    assert len(templates) >= 6 and all("{}" in t for t in templates)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == SIZES["tiny"]["stage1_eval"]
    assert len({r["label"] for r in records}) == len(records)  # 64 records < 80 classes: all distinct
    for r in records:
        assert (jsonl.parent / r["image"]).is_file()
        assert L.mentions(r["caption"]) == {tuple(r["label"].split(" "))}


def _training_hashes(root: Path) -> set[str]:
    import tarfile

    hashes = set()
    for shard in sorted((root / "stage1/shards").glob("*.tar")):
        with tarfile.open(shard) as tf:
            hashes |= {_sha(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".jpg")}
    hashes |= {_sha(p.read_bytes()) for p in (root / "stage2/images").glob("*.jpg")}
    return hashes


def test_eval_images_are_disjoint_from_training(world):
    import pyarrow.parquet as pq

    root, _ = world
    train = _training_hashes(root)
    assert len(train) == SIZES["tiny"]["stage1_train"] + SIZES["tiny"]["stage2_images"]
    evals = {_sha(p.read_bytes()) for p in (root / "stage1/eval/images").glob("*.jpg")}
    for name in PARQUET_COLUMNS:
        evals |= {_sha(img["bytes"]) for img in pq.read_table(root / f"eval/{name}.parquet").column("image").to_pylist()}
    assert evals and not evals & train


# --- stage-2 files --------------------------------------------------------------------------


def _check_llava(records: list[dict], image_dir: Path) -> tuple[int, int]:
    assert len({r["id"] for r in records}) == len(records)
    text_only = 0
    for r in records:
        conv = r["conversations"]
        assert conv and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        n_tokens = sum(t["value"].count("<image>") for t in conv)
        if "image" in r:
            assert (image_dir / r["image"]).is_file()
            assert conv[0]["value"].startswith("<image>\n") and n_tokens == 1
        else:
            assert n_tokens == 0
            text_only += 1
    return len(records), text_only


def test_llava_json(world):
    root, manifest = world
    images = root / manifest["paths"]["stage2_images"]
    pretrain = json.loads((root / manifest["paths"]["stage2_pretrain"]).read_text())
    finetune = json.loads((root / manifest["paths"]["stage2_finetune"]).read_text())
    assert _check_llava(pretrain, images) == (SIZES["tiny"]["stage2_images"], 0)
    assert all(len(r["conversations"]) == 2 and L.mentions(r["conversations"][1]["value"]) for r in pretrain)
    n, text_only = _check_llava(finetune, images)
    assert (n, text_only) == (SIZES["tiny"]["stage2_finetune"], n // 20)
    answers = Counter(t["value"] for r in finetune for t in r["conversations"] if t["from"] == "gpt")
    assert answers["Yes"] > 0 and abs(answers["Yes"] - answers["No"]) <= 3
    humans = [t["value"] for r in finetune for t in r["conversations"] if t["from"] == "human"]
    assert any(h.endswith("\nAnswer the question using a single word or phrase.") for h in humans)
    mc = [h for h in humans if h.endswith("\nAnswer with the option's letter from the given choices directly.")]
    assert mc and all("\nA. " in h and "\nD. " in h for h in mc)


# --- stage-3 parquet ------------------------------------------------------------------------


def test_parquets_load_with_datasets(world):
    from PIL import Image

    root, manifest = world
    for name, columns in PARQUET_COLUMNS.items():
        ds = _load(root / manifest["paths"]["eval"][name])
        assert ds.column_names == columns, name
        assert len(ds) == manifest["counts"][name]
        img = ds[0]["image"]
        assert isinstance(img, Image.Image) and img.size == (64, 64), name


def test_benchmark_record_contents(world):
    root, _ = world
    pope = _load(root / "eval/pope.parquet")
    for cat in ("random", "popular", "adversarial"):
        answers = Counter(a for a, c in zip(pope["answer"], pope["category"], strict=True) if c == cat)
        assert answers["yes"] == answers["no"] > 0, cat
    assert all(re.fullmatch(r"Is there an? \w+ in the image\?", q) for q in pope["question"])
    vqa = _load(root / "eval/vqav2.parquet")
    for row in vqa.select_columns(["answers", "multiple_choice_answer", "answer_type"]):
        assert len(row["answers"]) == 10 and [a["answer_id"] for a in row["answers"]] == list(range(1, 11))
        assert [a["answer"] for a in row["answers"]].count(row["multiple_choice_answer"]) >= 5
        assert row["answer_type"] in {"yes/no", "number", "other"}
    star = _load(root / "eval/mmstar.parquet").select_columns(["question", "answer"])
    for row in star:
        parts = re.split(r", (?=[B-D]: )", row["question"].split("\nOptions: ")[1])
        options = dict(p.split(": ", 1) for p in parts)
        assert sorted(options) == ["A", "B", "C", "D"] and row["answer"] in options
    bench = _load(root / "eval/mmbench.parquet").select_columns(["index", "A", "B", "C", "D", "answer"])
    by_question = {}
    for row in bench:
        assert row["answer"] in "ABCD" and len({row[c] for c in "ABCD"}) == 4
        by_question.setdefault(row["index"] % 1_000_000, set()).add(row[row["answer"]])
    assert len(by_question) == SIZES["tiny"]["mmbench_questions"]
    assert all(len(v) == 1 for v in by_question.values())  # circular copies keep the same correct option


def test_lmms_eval_task_functions_score_the_records(world):
    """lmms-eval's own doc_to_text / process_results accept the records and score true answers as correct."""
    from lmms_eval.tasks.gqa.utils import gqa_doc_to_text
    from lmms_eval.tasks.mmbench.en_utils import mmbench_doc_to_text, mmbench_evaluator, mmbench_process_results
    from lmms_eval.tasks.mmstar.utils import mmstar_doc_to_text, mmstar_process_results
    from lmms_eval.tasks.pope.utils import pope_aggregate_accuracy, pope_doc_to_text, pope_process_results
    from lmms_eval.tasks.vqav2.utils import vqav2_doc_to_text, vqav2_process_results_val

    root, _ = world
    short = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    pope = [dict(r) for r in _load(root / "eval/pope.parquet").remove_columns("image")]
    assert pope_doc_to_text(pope[0], short).endswith("in the image?\nAnswer the question using a single word or phrase.")
    assert pope_aggregate_accuracy([pope_process_results(d, [d["answer"].capitalize()])["pope_accuracy"]
                                    for d in pope]) == 1.0
    for d in _load(root / "eval/vqav2.parquet").remove_columns("image"):
        assert vqav2_doc_to_text(d, short).startswith(d["question"])
        assert vqav2_process_results_val(d, [d["multiple_choice_answer"]])["exact_match"] == 1.0
    gqa = dict(_load(root / "eval/gqa.parquet").remove_columns("image")[0])
    assert gqa_doc_to_text(gqa, short) == gqa["question"] + short["post_prompt"]
    letter = {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly"}
    for d in _load(root / "eval/mmstar.parquet").remove_columns("image"):
        assert "\nOptions: A: " in mmstar_doc_to_text(d, letter)
        assert mmstar_process_results(d, [d["answer"]])["average"]["score"] == 1.0
    bench = [dict(r) for r in _load(root / "eval/mmbench.parquet").remove_columns("image")]
    assert "\nA. " in mmbench_doc_to_text(bench[0], {"post_prompt": "x"})
    right = [mmbench_process_results(d, [d["answer"]])["gpt_eval_score"] for d in bench]
    assert mmbench_evaluator.eval_result(right, eval_method="static")[0] == 1.0
    # one wrong circular copy fails its question, as in MMBench's CircularEval
    wrong = [dict(r, prediction="A" if r["answer"] != "A" else "B") if r["index"] == 1_000_000 else r for r in right]
    assert mmbench_evaluator.eval_result(wrong, eval_method="static")[0] == pytest.approx(1 - 1 / len(right) * 4)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_agree_with_scene_metadata(world):
    """Spot-check answers in stage-2 instructions and eval sets against the stored scenes."""
    root, manifest = world
    scenes = {r["image"]: r["scene"] for r in _read_jsonl(root / manifest["paths"]["scenes"]["stage2"])}
    pretrain = json.loads((root / "stage2/pretrain.json").read_text())
    for r in pretrain:
        assert L.mentions(r["conversations"][1]["value"]) == {(o["color"], o["shape"]) for o in scenes[r["image"]]["objects"]}
    checked = 0
    for r in json.loads((root / "stage2/finetune.json").read_text()):
        if "image" not in r:
            continue
        scene, conv = scenes[r["image"]], r["conversations"]
        present = {(o["color"], o["shape"]) for o in scene["objects"]}
        for q, a in zip(conv[::2], conv[1::2], strict=True):
            text = q["value"].removeprefix("<image>\n").split("\n")[0]
            if text.startswith(("Is there", "Does the image contain", "Can you see")):
                assert a["value"] == ("Yes" if L.mentions(text) <= present else "No"), text
                checked += 1
            elif text in ("How many objects are there?", "How many shapes are in the image?") and "\nA." not in q["value"]:
                assert a["value"] == str(scene["count"])
                checked += 1
            elif text.startswith("What color is the background") and "\nA." not in q["value"]:
                assert a["value"] == scene["background"]["color"]
                checked += 1
    assert checked >= 10
    evals = {(r["benchmark"], r["image_id"]): r["scene"] for r in _read_jsonl(root / "eval/scenes.jsonl")}
    pope = _load(root / "eval/pope.parquet").remove_columns("image")
    for d in pope:
        shapes = {o["shape"] for o in evals[("pope", int(d["image_source"].rsplit("_", 1)[1]))]["objects"]}
        assert (d["question"].split()[3] in shapes) == (d["answer"] == "yes")
    for d in _load(root / "eval/vqav2.parquet").remove_columns("image"):
        scene = evals[("vqav2", d["image_id"])]
        if d["question"] == "How many objects are there?":
            assert d["multiple_choice_answer"] == str(scene["count"])
        if d["question_type"] == "where is the":
            obj = [o for o in scene["objects"] if f"{o['color']} {o['shape']}" in d["question"]]
            assert [o["region"] for o in obj] == [d["multiple_choice_answer"]]
