"""Stage-2 conversations in LLaVA's JSON format: pretrain captions and LLaVA-1.5-style instructions.

Prompt styles follow llava_v1_5_mix665k: short answers carry "Answer the question using a
single word or phrase.", multiple choice lists "A. x" lines and "Answer with the option's
letter from the given choices directly.", detailed descriptions use LLaVA's detail
prompts, and a few samples are text-only (no image, no "<image>" token).
"""

from __future__ import annotations

import numpy as np

from demo_world.language import NUMBER_WORDS, QA, caption, make_choices, qa_any
from demo_world.scenes import COLORS, SHAPES

IMAGE_TOKEN = "<image>"
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
PRETRAIN_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
DETAIL_PROMPTS = (
    "Describe the following image.",
    "What do you see happening in this image?",
    "Can you elaborate on the elements of the picture provided?",
    "Explain the visual content of the image in great detail.",
    "Describe the image in detail.",
    "Analyze the image in a comprehensive and detailed manner.",
)
SHORT_KINDS = ("color", "shape", "count", "size", "where", "background", "relation_choose")
YESNO_KINDS = ("exists", "relation")
MC_KINDS = ("color", "shape", "count", "where", "background")
STYLES = ("short", "yesno", "mc", "detail", "mixed")
STYLE_WEIGHTS = (0.35, 0.15, 0.15, 0.10, 0.25)
TEXT_ONLY_EVERY = 20  # one sample in 20 (5%) is text-only, as a fixed share
SIDES = {"triangle": 3, "square": 4, "diamond": 4, "hexagon": 6}


class YesNoBalancer:
    """Alternates the wanted answer of yes/no questions so the set is balanced to within one."""

    def __init__(self) -> None:
        self._next = True

    def __call__(self) -> bool:
        value, self._next = self._next, not self._next
        return value


def _choice(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def pretrain_record(sample_id: str, image: str, text: str, rng: np.random.Generator) -> dict:
    return {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{_choice(rng, PRETRAIN_PROMPTS)}"},
            {"from": "gpt", "value": text},
        ],
    }


def short_answer(qa: QA) -> str:
    return qa.answer.capitalize() if qa.atype == "yes/no" else qa.answer


def mc_turn(qa: QA, rng: np.random.Generator) -> tuple[str, str] | None:
    made = make_choices(qa, rng)
    if made is None:
        return None
    options, letter = made
    lines = "".join(f"\n{'ABCD'[i]}. {o}" for i, o in enumerate(options))
    return f"{qa.question}{lines}{MC_SUFFIX}", letter


def _turn(style: str, scene: dict, rng: np.random.Generator, balance: YesNoBalancer) -> tuple[str, str] | None:
    if style == "mixed":
        style = _choice(rng, ("short", "short", "yesno", "mc"))
    if style == "short":
        qa = qa_any(scene, rng, SHORT_KINDS)
        return qa.question + SHORT_SUFFIX, short_answer(qa)
    if style == "yesno":
        qa = qa_any(scene, rng, YESNO_KINDS, want_yes=balance)
        return qa.question + SHORT_SUFFIX, short_answer(qa)
    if style == "mc":
        return mc_turn(qa_any(scene, rng, MC_KINDS), rng)
    return _choice(rng, DETAIL_PROMPTS), caption(scene, rng, detailed=True)


def finetune_record(sample_id: str, image: str, scene: dict, rng: np.random.Generator, balance: YesNoBalancer) -> dict:
    """1-3 QA turns about one image; "<image>" opens the first human turn only."""
    style = STYLES[int(rng.choice(len(STYLES), p=STYLE_WEIGHTS))]
    n_turns = 1 if style == "detail" else int(rng.integers(1, 4))
    turns: list[tuple[str, str]] = []
    for _ in range(n_turns * 3):  # a few retries to avoid repeating a question
        if len(turns) == n_turns:
            break
        turn = _turn(style, scene, rng, balance)
        if turn is not None and all(turn[0] != t[0] for t in turns):
            turns.append(turn)
    if not turns:
        turns.append((_choice(rng, DETAIL_PROMPTS), caption(scene, rng, detailed=True)))
    conv = []
    for k, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if k == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": sample_id, "image": image, "conversations": conv}


def _text_turn(kind: int, rng: np.random.Generator) -> tuple[str, str]:
    if kind == 0:
        shape = _choice(rng, tuple(SIDES))
        return f"How many sides does a {shape} have?", f"A {shape} has {NUMBER_WORDS[SIDES[shape]]} sides."
    if kind == 1:
        a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        return f"What is {a} plus {b}?{SHORT_SUFFIX}", str(a + b)
    if kind == 2:
        c, s = _choice(rng, tuple(COLORS)), _choice(rng, SHAPES)
        first, second = (c, s) if rng.random() < 0.5 else (s, c)
        return f"Which of these words is a color: {first} or {second}?{SHORT_SUFFIX}", c
    if kind == 3:
        return "Which shape has no corners and is filled?", "A circle has no corners, and it is filled, unlike a ring."
    word = _choice(rng, tuple(COLORS) + SHAPES)
    what = "a color" if word in COLORS else "a shape"
    return f"Is \"{word}\" a color or a shape?{SHORT_SUFFIX}", what


def text_only_record(sample_id: str, rng: np.random.Generator) -> dict:
    conv = []
    for kind in rng.permutation(5)[: int(rng.integers(1, 3))]:
        q, a = _text_turn(int(kind), rng)
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": sample_id, "conversations": conv}
