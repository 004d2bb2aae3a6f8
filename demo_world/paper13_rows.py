"""Rows of the paper-13 fixture datasets: demo-world scenes in each benchmark's own record layout.

Every builder draws scenes with the demo world's sampler and renderer (`demo_world`) and
returns `{split: [row, ...]}` with the columns of the real dataset (see `demo_world.paper13`
for the features and where each dataset lives). Rows are deterministic in (seed, row index).

Ground truth is fixed by row index wherever a score depends on it, so tests can compute the
expected score by hand:
- VQA-style annotator lists (VQAv2, TextVQA, VizWiz): row i has 10 answers, the canonical
  answer `10 - m` times and one alternative `m` times, m = i % 4;
- POPE: within every split the answers alternate yes, no, yes, ... from the first row;
- MMBench: every question appears 4 times (circular evaluation: options rotated one step per
  copy, index + k * 1e6), as in the real dev split;
- MMMU: rows 0-3 multiple-choice, rows 4-5 open (a count), subfields Math, Art, Computer_Science
  in turn; MMStar: one row per generator of MMSTAR_GENERATORS (five L2 categories).
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from demo_world import language as L
from demo_world import multichoice
from demo_world.benchmarks import GQA_DETAILED
from demo_world.pope import pope_questions
from demo_world.scenes import COLORS, SHAPES, jpeg_bytes, render, sample_scene

IMAGE_SIZE = 64
TEXT_IMAGE_SIZE = 96  # TextVQA images carry a printed word; the default bitmap font needs the room
SOURCE = "ito-mllm paper13 fixtures"
CIRCULAR = 1_000_000  # lmms-eval's MMBench: index >= 1e6 marks a circular copy of index % 1e6
VQA_KINDS = ("color", "shape", "exists", "count", "size", "background")
GQA_KINDS = ("color", "shape", "exists", "size", "where", "background", "relation")
WORDS = ("stop", "cafe", "exit", "open", "sale", "taxi", "hotel", "pizza")
CN_COLORS = {"red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "blue": "蓝色", "purple": "紫色",
             "pink": "粉色", "gray": "灰色"}
CN_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "heart": "心形",
             "diamond": "菱形", "cross": "十字形", "hexagon": "六边形", "crescent": "月牙形", "ring": "环形"}
MMMU_SUBFIELDS = ("Math", "Art", "Computer_Science")


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), index])


def _scene(rng: np.random.Generator, size: int = IMAGE_SIZE, **kw) -> tuple[dict, Image.Image]:
    scene = sample_scene(rng, **kw)
    return scene, render(scene, size, rng)


def _image(image: Image.Image) -> dict:
    return {"bytes": jpeg_bytes(image), "path": None}


def minority(i: int) -> int:
    """How many of row i's 10 annotators gave the alternative answer."""
    return i % 4


def annotators(answer: str, alternative: str, i: int) -> list[str]:
    m = minority(i)
    return [answer] * (10 - m) + [alternative] * m


def _alternative(qa: L.QA, rng: np.random.Generator) -> str:
    pool = [p for p in (qa.pool or ("yes", "no")) if p != qa.answer]
    return L._choice(rng, pool)


def vqav2(seed: int, n: int = 8) -> dict[str, list[dict]]:
    rows = []
    for i in range(n):
        rng = _rng(seed, "vqav2", i)
        scene, image = _scene(rng)
        qa = L.qa_any(scene, rng, VQA_KINDS, want_yes=i % 2 == 0)
        answers = annotators(qa.answer, _alternative(qa, rng), i)
        rows.append({
            "question_type": qa.qtype, "multiple_choice_answer": qa.answer,
            "answers": [{"answer": a, "answer_confidence": "yes" if a == qa.answer else "maybe", "answer_id": j + 1}
                        for j, a in enumerate(answers)],
            "image_id": 100 + i, "answer_type": qa.atype, "question_id": (100 + i) * 1000, "question": qa.question,
            "image": _image(image),
        })
    return {"validation": rows}


def _gqa_question(qid: str, image_id: str, qa: L.QA) -> dict:
    return {
        "id": qid, "imageId": image_id, "question": qa.question, "answer": qa.answer, "fullAnswer": qa.full,
        "isBalanced": True, "groups": {"global": None, "local": f"{qa.kind}-{qa.semantic}"},
        "entailed": "", "equivalent": f"['{qid}']",
        "types": {"structural": qa.structural, "semantic": qa.semantic, "detailed": GQA_DETAILED[qa.kind]},
        "annotations": {"question": [], "answer": [], "fullAnswer": []},
        "semantic": [{"operation": "select", "argument": "scene", "dependencies": []},
                     {"operation": f"{qa.structural} {qa.semantic}", "argument": qa.kind, "dependencies": [0]}],
        "semanticStr": f"select: scene->{qa.structural} {qa.semantic}: {qa.kind} [0]",
    }


def gqa(seed: int, n_images: int = 4, per_image: int = 2) -> tuple[dict, dict]:
    """(instructions, images): GQA keeps questions and images in two configs joined by imageId."""
    questions, images = [], []
    for i in range(n_images):
        rng = _rng(seed, "gqa", i)
        scene, image = _scene(rng)
        image_id = f"fx{i:04d}"
        images.append({"id": image_id, "image": _image(image)})
        asked: list[str] = []
        while len(asked) < per_image:
            qa = L.qa_any(scene, rng, GQA_KINDS, want_yes=len(asked) % 2 == 0)
            if qa.question not in asked:
                asked.append(qa.question)
                questions.append(_gqa_question(f"{2000 + i}{len(asked)}", image_id, qa))
    return {"testdev": questions}, {"testdev": images}


def _text_image(scene_rng: np.random.Generator, word: str) -> Image.Image:
    _, image = _scene(scene_rng, TEXT_IMAGE_SIZE, n_objects=1)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), word.upper(), font=font)
    x, y = (TEXT_IMAGE_SIZE - (right - left)) // 2, TEXT_IMAGE_SIZE - (bottom - top) - 12
    draw.rectangle((x - 4, y - 3, x + right - left + 4, y + bottom - top + 5), fill=(250, 250, 250))
    draw.text((x - left, y - top), word.upper(), fill=(10, 10, 10), font=font)
    return image


def textvqa(seed: int, n: int = 6) -> dict[str, list[dict]]:
    rows = []
    templates = ("what word is written on the sign?", "what does the sign say?", "what is written in the box?")
    for i in range(n):
        rng = _rng(seed, "textvqa", i)
        word = WORDS[i % len(WORDS)]
        image = _text_image(rng, word)
        question = templates[i % len(templates)]
        ocr = [word] if i % 2 == 0 else [word, str(10 + i)]  # a decoy token, as OCR systems return
        rows.append({
            "image_id": f"{0x0fa1 + i:016x}", "question_id": 34602 + i, "question": question,
            "question_tokens": question.rstrip("?").split(), "image": _image(image),
            "image_width": TEXT_IMAGE_SIZE, "image_height": TEXT_IMAGE_SIZE, "flickr_original_url": "",
            "flickr_300k_url": "", "answers": annotators(word, WORDS[(i + 3) % len(WORDS)], i),
            "image_classes": ["Sign"], "set_name": "val", "ocr_tokens": ocr,
        })
    return {"validation": rows}


def scienceqa(seed: int, n: int = 6) -> dict[str, list[dict]]:
    """Two to four choices (ScienceQA has 2-5), an empty hint on even rows as in many real items."""
    rows = []
    for i in range(n):
        rng = _rng(seed, "scienceqa", i)
        scene, image = _scene(rng)
        mc = multichoice.sample(scene, rng)
        correct = mc.options["ABCD".index(mc.letter)]
        keep = 2 + i % 3
        choices = [o for o in mc.options if o != correct][: keep - 1]
        choices.insert(i % keep, correct)
        rows.append({
            "image": _image(image), "question": mc.question, "choices": choices,
            "answer": choices.index(correct), "hint": "" if i % 2 == 0 else (mc.hint or "Look at the picture."),
            "task": "closed choice", "grade": "grade3", "subject": "natural science", "topic": "shapes",
            "category": "Identify shapes and colors", "skill": "Identify shapes and colors", "lecture": "",
            "solution": "",
        })
    return {"test": rows}


def vizwiz(seed: int, n: int = 6) -> dict[str, list[dict]]:
    """The last row cannot be answered from the image; its annotators mostly say 'unanswerable'."""
    rows = []
    for i in range(n):
        rng = _rng(seed, "vizwiz", i)
        scene, image = _scene(rng)
        if i == n - 1:
            question, answer, alt, category = "What does the label on the bottle say?", "unanswerable", "no", \
                "unanswerable"
        else:
            qa = L.qa_any(scene, rng, ("color", "shape", "count", "exists"), want_yes=True)
            # VizWiz questions are typed by users, often in lower case (lmms-eval capitalises them)
            question = qa.question if i % 2 == 0 else qa.question[0].lower() + qa.question[1:]
            answer, alt = qa.answer, _alternative(qa, rng)
            category = {"yes/no": "yes/no", "number": "number"}.get(qa.atype, "other")
        rows.append({"question_id": f"VizWiz_val_{i:08d}", "image": _image(image), "question": question,
                     "answers": annotators(answer, alt, i), "category": category})
    return {"val": rows}


def _circular(questions: list[dict]) -> list[dict]:
    """MMBench rows: each question once per rotation of its options, index + k * 1e6 for copy k."""
    rows = []
    for shift in range(4):
        for idx, q in enumerate(questions):
            options = q["options"][shift:] + q["options"][:shift]
            row = {key: q[key] for key in ("question", "hint", "category", "L2-category", "image")}
            row.update(index=idx + shift * CIRCULAR, answer="ABCD"[options.index(q["correct"])], source=SOURCE,
                       comment=None, split="dev", **dict(zip("ABCD", options, strict=True)))
            rows.append(row)
    return rows


def mmbench_en(seed: int, n: int = 3) -> dict[str, list[dict]]:
    questions = []
    for i in range(n):
        rng = _rng(seed, "mmbench_en", i)
        scene, image = _scene(rng)
        mc = multichoice.sample(scene, rng)
        questions.append({"question": mc.question, "hint": mc.hint or (None if i % 2 else "Look at the image."),
                          "options": list(mc.options), "correct": mc.options["ABCD".index(mc.letter)],
                          "category": mc.mmbench[0], "L2-category": mc.mmbench[1], "image": _image(image)})
    return {"dev": _circular(questions)}


def _cn_question(scene: dict, rng: np.random.Generator, i: int) -> dict:
    objs = scene["objects"]
    if i % 2 == 0:
        present = {o["shape"] for o in objs}
        correct = L._choice(rng, sorted(present))
        wrong = [s for s in SHAPES if s not in present]
        picked = [wrong[int(k)] for k in rng.choice(len(wrong), size=3, replace=False)]
        options, question = [CN_SHAPES[s] for s in [correct, *picked]], "图中有下列哪种形状？"
        category, l2 = "object_localization", "finegrained_perception (instance-level)"
    else:
        o = L._choice(rng, objs)
        wrong = [c for c in COLORS if c != o["color"]]
        picked = [wrong[int(k)] for k in rng.choice(len(wrong), size=3, replace=False)]
        options, question = [CN_COLORS[c] for c in [o["color"], *picked]], f"图中的{CN_SHAPES[o['shape']]}是什么颜色？"
        category, l2 = "attribute_recognition", "finegrained_perception (instance-level)"
    correct_text = options[0]
    options = [options[int(k)] for k in rng.permutation(4)]
    return {"question": question, "hint": None if i % 2 else "请仔细观察图片。", "options": options,
            "correct": correct_text, "category": category, "L2-category": l2}


def mmbench_cn(seed: int, n: int = 3) -> dict[str, list[dict]]:
    questions = []
    for i in range(n):
        rng = _rng(seed, "mmbench_cn", i)
        scene, image = _scene(rng)
        questions.append({**_cn_question(scene, rng, i), "image": _image(image)})
    return {"dev": _circular(questions)}


def mmvet(seed: int, n: int = 4) -> dict[str, list[dict]]:
    rows = []
    for i in range(n):
        rng = _rng(seed, "mmvet", i)
        scene, image = _scene(rng)
        qa = L.qa_any(scene, rng, ("color", "shape", "count", "relation_choose", "background"))
        rows.append({"question_id": f"v1_{i}", "image": _image(image), "question": qa.question, "answer": qa.answer,
                     "image_source": f"fixture_{i}", "capability": ["rec"] if i % 2 == 0 else ["rec", "spat"]})
    return {"test": rows}


def pope(seed: int, n_images: int = 3) -> dict[str, list[dict]]:
    """Splits random / popular / adversarial; per image one object present and one absent."""
    drawn = [_scene(_rng(seed, "pope", i), n_objects=3, distinct_shapes=True) for i in range(n_images * 2)]
    images = [(i, [o["shape"] for o in scene["objects"]]) for i, (scene, _) in enumerate(drawn)]
    items = pope_questions(images, SHAPES, 1, _rng(seed, "pope_questions", 0))
    out: dict[str, list[dict]] = {}
    for item in items:
        rows = out.setdefault(item["category"], [])
        if item["image_id"] >= n_images:  # the other images only shape the popular/adversarial statistics
            continue
        n = sum(len(r) for r in out.values())
        rows.append({"id": str(n), "question_id": str(n + 1),
                     "question": f"Is there {L.with_article(item['object'])} in the image?", "answer": item["answer"],
                     "image_source": f"fixture_pope_{item['image_id']:06d}", "image": _image(drawn[item["image_id"]][1]),
                     "category": item["category"]})
    return out


def _mmmu_row(i: int, scene: dict, image: Image.Image, rng: np.random.Generator) -> dict:
    sub = MMMU_SUBFIELDS[i % len(MMMU_SUBFIELDS)]
    row = {"id": f"validation_{sub}_{i + 1}", "explanation": "", "img_type": "['Diagrams']",
           "topic_difficulty": "Easy", "subfield": sub, "image_1": _image(image),
           **{f"image_{k}": None for k in range(2, 8)}}
    if i < 4:
        mc = multichoice.sample(scene, rng)
        # "<image 1>" leads the question or sits inside it, as in MMMU
        question = f"<image 1> {mc.question}" if i % 2 == 0 else f"Based on <image 1>, {mc.question[0].lower()}" \
            f"{mc.question[1:]}"
        row.update(question=question, options=repr(list(mc.options)), answer=mc.letter,
                   question_type="multiple-choice")
    else:
        n = len(scene["objects"])
        row.update(question="How many shapes are there in <image 1>?", options="[]", answer=str(n),
                   question_type="open")
    return row


def mmmu(seed: int, n: int = 6) -> dict[str, list[dict]]:
    rows = []
    for i in range(n):
        rng = _rng(seed, "mmmu", i)
        scene, image = _scene(rng)
        rows.append(_mmmu_row(i, scene, image, rng))
    return {"validation": rows}


# MMStar's score is a mean over L2 categories, not over rows: fixed generators make the categories known
# (image scene and topic, image style & quality, object counting x2, recognition, localization).
MMSTAR_GENERATORS = (multichoice.bg_color, multichoice.bg_style, multichoice.counting, multichoice.recognition,
                     multichoice.localization, multichoice.counting)


def mmstar(seed: int) -> dict[str, list[dict]]:
    rows = []
    for i, generator in enumerate(MMSTAR_GENERATORS):
        rng = _rng(seed, "mmstar", i)
        scene, image = _scene(rng)
        mc = generator(scene, rng)
        opts = ", ".join(f"{'ABCD'[k]}: {o}" for k, o in enumerate(mc.options))
        rows.append({"index": i, "question": f"{mc.question}\nOptions: {opts}", "image": _image(image),
                     "answer": mc.letter, "category": mc.mmstar[0], "l2_category": mc.mmstar[1],
                     "meta_info": {"source": SOURCE, "split": "val", "image_path": f"images/{i}.jpg"}})
    return {"val": rows}
