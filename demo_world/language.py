"""Caption grammar and question generators for the demo world.

Captions are several sentences, each ending with ".": one per object (with paraphrased
templates), plus scene sentences (object count, background, one spatial relation), in a
partly shuffled order. Every object is named by "<colour> <shape>" right next to each
other, so `mentions` can parse a caption back into the scene's objects.

Question generators return a `QA` (or None when the scene does not support the
question); the stage-2 instructions and every evaluation format are built from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from demo_world.scenes import BACKGROUNDS, COLORS, REGIONS, SHAPES

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
WHERE = {
    "top left": ("in the top left", "in the top left corner", "near the top left corner", "in the upper left"),
    "top right": ("in the top right", "in the top right corner", "near the top right corner", "in the upper right"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "near the bottom left corner", "in the lower left"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "near the bottom right corner",
                     "in the lower right"),
    "top": ("at the top", "near the top", "along the top edge", "at the top center"),
    "bottom": ("at the bottom", "near the bottom", "along the bottom edge", "at the bottom center"),
    "left": ("on the left", "near the left side", "at the left edge", "on the left side"),
    "right": ("on the right", "near the right side", "at the right edge", "on the right side"),
    "center": ("in the center", "in the middle", "near the center", "right in the middle"),
}
OBJECT_TEMPLATES = (
    "{a_obj} sits {where}.",
    "There is {a_obj} {where}.",
    "{Where}, there is {a_obj}.",
    "You can see {a_obj} {where}.",
    "{a_obj} is placed {where}.",
    "{Where} is {a_obj}.",
)
BARE_TEMPLATES = ("{a_obj}.", "There is {a_obj}.", "You can see {a_obj}.", "The image shows {a_obj}.")
BACKGROUND_TEMPLATES = {
    "solid": ("The background is plain {bg}.", "Everything is set against a plain {bg} background.",
              "The backdrop is solid {bg}."),
    "gradient": ("The background is a {bg} gradient.", "The backdrop fades smoothly in {bg} tones."),
    "stripes": ("The background has {bg} stripes.", "The backdrop is striped in {bg} tones."),
    "noise": ("The background is a grainy {bg} texture.", "The backdrop is a noisy {bg} pattern."),
    "checker": ("The background is a {bg} checkerboard.", "A {bg} checkered pattern fills the background."),
}
BACKGROUND_WORDS = {"solid": "plain", "gradient": "gradient", "stripes": "striped", "noise": "noisy",
                    "checker": "checkered"}
COUNT_ONE = ("There is only one object.", "The image shows a single shape.", "Just one shape is visible.")
COUNT_MANY = ("There are {n} objects.", "The image shows {n} shapes.", "{N} shapes are visible.")
RELATIONS = {"left": ("to the left of", "to the right of"), "right": ("to the right of", "to the left of"),
             "above": ("above", "below"), "below": ("below", "above")}
_MENTION = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def name(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


def mentions(text: str) -> set[tuple[str, str]]:
    """Every (colour, shape) named in `text`."""
    return {(m.group(1), m.group(2)) for m in _MENTION.finditer(text)}


def _choice(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def relation(a: dict, b: dict) -> str:
    """Where `a` is relative to `b` by grid cell: columns first (objects sit in distinct cells)."""
    ia, ib = REGIONS.index(a["region"]), REGIONS.index(b["region"])
    if ia % 3 != ib % 3:
        return "left" if ia % 3 < ib % 3 else "right"
    return "above" if ia // 3 < ib // 3 else "below"


def object_sentence(obj: dict, rng: np.random.Generator, p_size: float = 0.8, p_where: float = 1.0) -> str:
    phrase = f"{obj['size']} {name(obj)}" if rng.random() < p_size else name(obj)
    if rng.random() < p_where:
        where = _choice(rng, WHERE[obj["region"]])
        text = _choice(rng, OBJECT_TEMPLATES).format(a_obj=with_article(phrase), where=where, Where=where.capitalize())
    else:
        text = _choice(rng, BARE_TEMPLATES).format(a_obj=with_article(phrase))
    return text[0].upper() + text[1:]


def count_sentence(n: int, rng: np.random.Generator) -> str:
    if n == 1:
        return _choice(rng, COUNT_ONE)
    return _choice(rng, COUNT_MANY).format(n=NUMBER_WORDS[n], N=NUMBER_WORDS[n].capitalize())


def background_sentence(background: dict, rng: np.random.Generator) -> str:
    return _choice(rng, BACKGROUND_TEMPLATES[background["kind"]]).format(bg=background["color"])


def relation_sentence(a: dict, b: dict, rng: np.random.Generator) -> str:
    forward, inverse = RELATIONS[relation(a, b)]
    if rng.random() < 0.5:
        return f"The {name(a)} is {forward} the {name(b)}."
    return f"The {name(b)} is {inverse} the {name(a)}."


def caption(scene: dict, rng: np.random.Generator, detailed: bool = False) -> str:
    """Multi-sentence caption; `detailed` adds every pairwise relation and always keeps the count first."""
    objs = scene["objects"]
    body = [object_sentence(objs[int(i)], rng) for i in rng.permutation(len(objs))]
    if len(objs) > 1:
        pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))]
        chosen = pairs if detailed else [pairs[int(rng.integers(len(pairs)))]]
        rels = [relation_sentence(objs[i], objs[j], rng) for i, j in chosen]
        if detailed or rng.random() < 0.7:
            body += rels
        else:
            body.insert(int(rng.integers(1, len(body) + 1)), rels[0])
    body.insert(int(rng.integers(0, len(body) + 1)), background_sentence(scene["background"], rng))
    count = count_sentence(len(objs), rng)
    sentences = [count] + body if detailed or rng.random() < 0.5 else body + [count]
    return " ".join(sentences)


# Brief (alt-text) captions: every object by colour and shape, the rest of the scene only sometimes. Each extra
# sentence is a shortcut a contrastive batch can be told apart by instead of the shapes: with (size .5, where .4,
# relation .2, background .3, count .3) a demo tower reached 19% zero-shot, with these rates 41% (256 steps).
BRIEF = {"size": 0.3, "where": 0.1, "relation": 0.05, "background": 0.1, "count": 0.1}


def brief_caption(scene: dict, rng: np.random.Generator) -> str:
    """An alt-text-like caption: one sentence per object (colour and shape always; size and place sometimes),
    then, each with its own probability (`BRIEF`), a relation, the background and the object count.

    The stage-1 pairs use it: when every caption spells out the background and each object's place, those
    alone tell a batch's images apart and a contrastive tower never needs the shapes (measured: zero-shot
    shape accuracy at chance while retrieval R@10 reached 89%)."""
    objs = scene["objects"]
    body = [object_sentence(objs[int(i)], rng, BRIEF["size"], BRIEF["where"]) for i in rng.permutation(len(objs))]
    if len(objs) > 1 and rng.random() < BRIEF["relation"]:
        i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
        body.append(relation_sentence(objs[i], objs[j], rng))
    if rng.random() < BRIEF["background"]:
        body.insert(int(rng.integers(0, len(body) + 1)), background_sentence(scene["background"], rng))
    if rng.random() < BRIEF["count"]:
        body.append(count_sentence(len(objs), rng))
    return " ".join(body)


# --- questions ---------------------------------------------------------------------------


@dataclass
class QA:
    """One question about a scene. `pool` is the answer vocabulary for multiple-choice distractors."""

    kind: str
    question: str
    answer: str
    full: str  # the answer as a sentence (GQA's fullAnswer)
    qtype: str  # VQAv2 question_type: the question's opening words
    atype: str  # VQAv2 answer_type: "yes/no", "number" or "other"
    structural: str  # GQA types
    semantic: str
    pool: tuple[str, ...] = field(default=())


def _unique(objs: list[dict], key: str) -> list[dict]:
    return [o for o in objs if sum(p[key] == o[key] for p in objs) == 1]


def qa_color(scene: dict, rng: np.random.Generator) -> QA | None:
    cands = _unique(scene["objects"], "shape")
    if not cands:
        return None
    o = _choice(rng, cands)
    q = _choice(rng, ("What color is the {s}?", "What is the color of the {s}?", "Which color does the {s} have?"))
    return QA("color", q.format(s=o["shape"]), o["color"], f"The {o['shape']} is {o['color']}.",
              "what color is the", "other", "query", "attr", tuple(COLORS))


def qa_shape(scene: dict, rng: np.random.Generator) -> QA | None:
    o = _choice(rng, scene["objects"])
    where = WHERE[o["region"]][0]
    q = _choice(rng, ("What shape is {w}?", "Which shape can be seen {w}?", "What kind of shape is {w}?"))
    return QA("shape", q.format(w=where), o["shape"], f"The shape {where} is {with_article(o['shape'])}.",
              "what shape is", "other", "query", "obj", SHAPES)


def absent_object(scene: dict, rng: np.random.Generator) -> tuple[str, str]:
    """A (colour, shape) not in the scene; usually a near miss sharing the colour or the shape."""
    present = {(o["color"], o["shape"]) for o in scene["objects"]}
    o = _choice(rng, scene["objects"])
    r = rng.random()
    if r < 0.4:
        cands = [(c, o["shape"]) for c in COLORS]
    elif r < 0.8:
        cands = [(o["color"], s) for s in SHAPES]
    else:
        cands = [(c, s) for c in COLORS for s in SHAPES]
    cands = [c for c in cands if c not in present]
    return _choice(rng, cands)


def qa_exists(scene: dict, rng: np.random.Generator, want_yes: bool) -> QA:
    if want_yes:
        o = _choice(rng, scene["objects"])
        color, shape = o["color"], o["shape"]
    else:
        color, shape = absent_object(scene, rng)
    phrase = with_article(f"{color} {shape}")
    q = _choice(rng, ("Is there {p} in the image?", "Does the image contain {p}?", "Can you see {p} in the picture?"))
    full = f"Yes, there is {phrase}." if want_yes else f"No, there is no {color} {shape}."
    return QA("exists", q.format(p=phrase), "yes" if want_yes else "no", full, "is there a", "yes/no", "verify", "obj")


def qa_count(scene: dict, rng: np.random.Generator) -> QA:
    r = rng.random()
    objs = scene["objects"]
    if r < 0.5:
        n = len(objs)
        q = _choice(rng, ("How many objects are there?", "How many shapes are in the image?",
                          "How many shapes can you see?"))
        noun = "object" if "objects" in q else "shape"
    elif r < 0.8:
        c = _choice(rng, objs)["color"] if rng.random() < 0.7 else _choice(rng, tuple(COLORS))
        n = sum(o["color"] == c for o in objs)
        q, noun = f"How many {c} shapes are there?", f"{c} shape"
    else:
        s = _choice(rng, ("small", "large"))
        n = sum(o["size"] == s for o in objs)
        q, noun = f"How many {s} shapes are there?", f"{s} shape"
    full = f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}."
    return QA("count", q, str(n), full, "how many", "number", "query", "attr", ("0", "1", "2", "3", "4"))


def qa_size(scene: dict, rng: np.random.Generator) -> QA:
    o = _choice(rng, scene["objects"])
    q = _choice(rng, ("Is the {n} small or large?", "Is the {n} large or small?", "What size is the {n}?"))
    return QA("size", q.format(n=name(o)), o["size"], f"The {name(o)} is {o['size']}.",
              "is the" if q.startswith("Is") else "what", "other", "choose", "attr", ("small", "large"))


def qa_where(scene: dict, rng: np.random.Generator) -> QA:
    o = _choice(rng, scene["objects"])
    q = _choice(rng, ("Where is the {n}?", "Where is the {n} located?", "In which part of the image is the {n}?"))
    return QA("where", q.format(n=name(o)), o["region"], f"The {name(o)} is {WHERE[o['region']][0]}.",
              "where is the", "other", "query", "rel", REGIONS)


def qa_relation(scene: dict, rng: np.random.Generator, want_yes: bool | None = None) -> QA | None:
    objs = scene["objects"]
    if len(objs) < 2:
        return None
    i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
    a, b = objs[i], objs[j]
    truth = relation(a, b)
    yes = bool(rng.random() < 0.5) if want_yes is None else want_yes
    if yes:
        asked = truth
    else:
        # the mirror relation is always false; other axes may hold too, so never ask those for "no"
        asked = {"left": "right", "right": "left", "above": "below", "below": "above"}[truth]
    phrase = RELATIONS[asked][0]
    q = f"Is the {name(a)} {phrase} the {name(b)}?"
    full = f"{'Yes' if yes else 'No'}, the {name(a)} is {RELATIONS[truth][0]} the {name(b)}."
    return QA("relation", q, "yes" if yes else "no", full, "is the", "yes/no", "verify", "rel")


def qa_relation_choose(scene: dict, rng: np.random.Generator) -> QA | None:
    objs = scene["objects"]
    if len(objs) < 2:
        return None
    i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
    a, b = objs[i], objs[j]
    truth = relation(a, b)
    if truth in ("left", "right"):
        opts = ("left", "right") if rng.random() < 0.5 else ("right", "left")
        q = f"Is the {name(a)} to the {opts[0]} or to the {opts[1]} of the {name(b)}?"
    else:
        opts = ("above", "below") if rng.random() < 0.5 else ("below", "above")
        q = f"Is the {name(a)} {opts[0]} or {opts[1]} the {name(b)}?"
    return QA("relation_choose", q, truth, f"The {name(a)} is {RELATIONS[truth][0]} the {name(b)}.",
              "is the", "other", "choose", "rel", ("left", "right", "above", "below"))


def qa_background(scene: dict, rng: np.random.Generator) -> QA:
    bg = scene["background"]["color"]
    q = _choice(rng, ("What color is the background?", "What is the color of the background?"))
    return QA("background", q, bg, f"The background is {bg}.", "what color is the", "other", "query", "global",
              tuple(BACKGROUNDS))


def qa_any(scene: dict, rng: np.random.Generator, kinds: tuple[str, ...], want_yes=None) -> QA:
    """A question of a random applicable kind among `kinds`.

    `want_yes` fixes the answer of yes/no kinds: a bool, a callable asked only when a
    yes/no question is built (a balancer), or None for a coin flip."""
    order = [kinds[int(k)] for k in rng.permutation(len(kinds))]
    for kind in order:
        if kind in ("exists", "relation") and (kind == "exists" or len(scene["objects"]) > 1):
            yes = want_yes() if callable(want_yes) else want_yes
            yes = bool(rng.random() < 0.5) if yes is None else yes
        else:
            yes = None
        qa = {
            "color": lambda: qa_color(scene, rng),
            "shape": lambda: qa_shape(scene, rng),
            "exists": lambda y=yes: qa_exists(scene, rng, bool(y)),
            "count": lambda: qa_count(scene, rng),
            "size": lambda: qa_size(scene, rng),
            "where": lambda: qa_where(scene, rng),
            "relation": lambda y=yes: qa_relation(scene, rng, y),
            "relation_choose": lambda: qa_relation_choose(scene, rng),
            "background": lambda: qa_background(scene, rng),
        }[kind]()
        if qa is not None:
            return qa
    return qa_count(scene, rng)


def make_choices(qa: QA, rng: np.random.Generator, n: int = 4) -> tuple[list[str], str] | None:
    """`n` shuffled options holding the answer, and the answer's letter; None if the pool is too small."""
    distractors = [p for p in qa.pool if p != qa.answer]
    if len(distractors) < n - 1:
        return None
    picked = [distractors[int(k)] for k in rng.choice(len(distractors), size=n - 1, replace=False)]
    options = picked + [qa.answer]
    options = [options[int(k)] for k in rng.permutation(n)]
    return options, "ABCDEFGH"[options.index(qa.answer)]
