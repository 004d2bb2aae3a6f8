"""Evaluation records in the column layouts of the lmms-lab benchmark datasets lmms-eval reads.

POPE: id, question_id, question, answer, image_source, image, category.
VQAv2: question_id, question, question_type, answer_type, multiple_choice_answer, answers
(10 x {answer, answer_confidence, answer_id}), image_id, image.
GQA (testdev_balanced_instructions with the image embedded): id, imageId, question,
answer, fullAnswer, isBalanced, types {structural, semantic, detailed}, image.
MMStar: index, question (options inline, "Options: A: x, B: y, ..."), image, answer,
category, l2_category, meta_info {source, split, image_path}.
MMBench (dev, circular copies at index + k*1e6 with rotated options as in the real split):
index, question, hint, A, B, C, D, answer, category, L2-category, source, split, image.
Images are JPEG bytes; each builder returns (columns, features) for `write_parquet`.
"""

from __future__ import annotations

import numpy as np

from demo_world import language as L
from demo_world import multichoice
from demo_world.pope import pope_questions
from demo_world.scenes import SHAPES

SOURCE = "ito-mllm demo world"
SYNONYMS = {
    "gray": ("grey",), "0": ("zero", "none"), "1": ("one",), "2": ("two",), "3": ("three",), "4": ("four",),
    "top left": ("upper left",), "top right": ("upper right",), "bottom left": ("lower left",),
    "bottom right": ("lower right",), "center": ("middle",), "large": ("big",), "small": ("little",),
    "crescent": ("moon",), "cross": ("plus",), "ring": ("donut",),
}
VQA_KINDS = ("color", "shape", "exists", "count", "size", "where", "background", "relation")
GQA_KINDS = ("color", "shape", "exists", "size", "where", "background", "relation", "relation_choose")
GQA_DETAILED = {
    "color": "objectColorQuery", "shape": "categoryQuery", "exists": "existAttr", "size": "sizeChoose",
    "where": "positionQuery", "background": "placeQuery", "relation": "relVerify", "relation_choose": "relChooser",
}


def _image_feature():
    import datasets

    return datasets.Image()


def _str():
    import datasets

    return datasets.Value("string")


def _int():
    import datasets

    return datasets.Value("int64")


def _img(jpeg: bytes) -> dict:
    return {"bytes": jpeg, "path": None}


def pope(items: list[tuple[int, dict, bytes]], rng: np.random.Generator, k: int = 3):
    """items: (image_id, scene, jpeg). Three questions of each answer per image and category."""
    by_id = {image_id: jpeg for image_id, _, jpeg in items}
    images = [(image_id, [o["shape"] for o in scene["objects"]]) for image_id, scene, _ in items]
    qs = pope_questions(images, SHAPES, k, rng)
    cols = {key: [] for key in ("id", "question_id", "question", "answer", "image_source", "image", "category")}
    for n, q in enumerate(qs):
        cols["id"].append(str(n))
        cols["question_id"].append(str(n + 1))
        cols["question"].append(f"Is there {L.with_article(q['object'])} in the image?")
        cols["answer"].append(q["answer"])
        cols["image_source"].append(f"world_pope_{q['image_id']:06d}")
        cols["image"].append(_img(by_id[q["image_id"]]))
        cols["category"].append(q["category"])
    feats = {key: _str() for key in cols}
    feats["image"] = _image_feature()
    return cols, feats


def vqa_answers(answer: str, pool: tuple[str, ...], rng: np.random.Generator) -> list[dict]:
    """Ten annotator answers: mostly `answer`, some synonyms, rarely a wrong one; the canonical one keeps a majority."""
    while True:
        answers, conf = [], []
        for _ in range(10):
            r = rng.random()
            if r < 0.15 and answer in SYNONYMS:
                answers.append(L._choice(rng, SYNONYMS[answer]))
                conf.append("maybe")
            elif r < 0.18 and len(pool) > 1:
                answers.append(L._choice(rng, [p for p in pool if p != answer]))
                conf.append("maybe")
            else:
                answers.append(answer)
                conf.append("yes")
        if answers.count(answer) >= 5:
            return [{"answer": a, "answer_confidence": c, "answer_id": i + 1} for i, (a, c) in enumerate(zip(answers, conf, strict=True))]


def _questions_per_image(scene: dict, rng: np.random.Generator, kinds: tuple[str, ...], n: int, balance) -> list:
    out: list[L.QA] = []
    for _ in range(n * 4):
        if len(out) == n:
            break
        qa = L.qa_any(scene, rng, kinds, want_yes=balance)
        if all(qa.question != p.question for p in out):
            out.append(qa)
    return out


def vqav2(items: list[tuple[int, dict, bytes]], rng: np.random.Generator, n_questions: int, balance):
    cols = {key: [] for key in ("question_id", "question", "question_type", "answer_type", "multiple_choice_answer",
                                "answers", "image_id", "image")}
    per_image = -(-n_questions // len(items))
    for image_id, scene, jpeg in items:
        for k, qa in enumerate(_questions_per_image(scene, rng, VQA_KINDS, per_image, balance)):
            if len(cols["question_id"]) == n_questions:
                break
            pool = qa.pool or ("yes", "no")
            cols["question_id"].append(image_id * 1000 + k)
            cols["question"].append(qa.question)
            cols["question_type"].append(qa.qtype)
            cols["answer_type"].append(qa.atype)
            cols["multiple_choice_answer"].append(qa.answer)
            cols["answers"].append(vqa_answers(qa.answer, pool, rng))
            cols["image_id"].append(image_id)
            cols["image"].append(_img(jpeg))
    import datasets

    feats = {key: _str() for key in cols}
    feats.update(question_id=_int(), image_id=_int(), image=_image_feature(), answers=datasets.List(
        {"answer": _str(), "answer_confidence": _str(), "answer_id": _int()}))
    return cols, feats


def gqa(items: list[tuple[int, dict, bytes]], rng: np.random.Generator, n_questions: int, balance):
    cols = {key: [] for key in ("id", "imageId", "question", "answer", "fullAnswer", "isBalanced", "types", "image")}
    per_image = -(-n_questions // len(items))
    for image_id, scene, jpeg in items:
        for k, qa in enumerate(_questions_per_image(scene, rng, GQA_KINDS, per_image, balance)):
            if len(cols["id"]) == n_questions:
                break
            cols["id"].append(f"{image_id:06d}{k}")
            cols["imageId"].append(f"w{image_id:06d}")
            cols["question"].append(qa.question)
            cols["answer"].append(qa.answer)
            cols["fullAnswer"].append(qa.full)
            cols["isBalanced"].append(True)
            cols["types"].append({"structural": qa.structural, "semantic": qa.semantic,
                                  "detailed": GQA_DETAILED[qa.kind]})
            cols["image"].append(_img(jpeg))
    import datasets

    feats = {key: _str() for key in cols}
    feats.update(isBalanced=datasets.Value("bool"), image=_image_feature(),
                 types={"structural": _str(), "semantic": _str(), "detailed": _str()})
    return cols, feats


def mmstar(items: list[tuple[int, dict, bytes]], rng: np.random.Generator):
    cols = {key: [] for key in ("index", "question", "image", "answer", "category", "l2_category", "meta_info")}
    for image_id, scene, jpeg in items:
        mc = multichoice.sample(scene, rng)
        opts = ", ".join(f"{'ABCD'[i]}: {o}" for i, o in enumerate(mc.options))
        cols["index"].append(len(cols["index"]))
        cols["question"].append(f"{mc.question}\nOptions: {opts}")
        cols["image"].append(_img(jpeg))
        cols["answer"].append(mc.letter)
        cols["category"].append(mc.mmstar[0])
        cols["l2_category"].append(mc.mmstar[1])
        cols["meta_info"].append({"source": SOURCE, "split": "val", "image_path": f"mmstar/{image_id:06d}.jpg"})
    feats = {key: _str() for key in cols}
    feats.update(index=_int(), image=_image_feature(),
                 meta_info={"source": _str(), "split": _str(), "image_path": _str()})
    return cols, feats


def mmbench(items: list[tuple[int, dict, bytes]], rng: np.random.Generator):
    keys = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "L2-category", "source", "split",
            "image")
    cols = {key: [] for key in keys}
    mcs = [(multichoice.sample(scene, rng), jpeg) for _, scene, jpeg in items]
    for shift in range(4):  # circular evaluation: every question again with its options rotated
        for idx, (mc, jpeg) in enumerate(mcs):
            options = mc.options[shift:] + mc.options[:shift]
            cols["index"].append(idx + shift * 1_000_000)
            cols["question"].append(mc.question)
            cols["hint"].append(mc.hint)
            for i, letter in enumerate("ABCD"):
                cols[letter].append(options[i])
            cols["answer"].append("ABCD"[options.index(mc.options["ABCD".index(mc.letter)])])
            cols["category"].append(mc.mmbench[0])
            cols["L2-category"].append(mc.mmbench[1])
            cols["source"].append(SOURCE)
            cols["split"].append("dev")
            cols["image"].append(_img(jpeg))
    feats = {key: _str() for key in cols}
    feats.update(index=_int(), image=_image_feature())
    return cols, feats
