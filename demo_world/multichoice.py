"""Four-option questions about a scene, tagged with MMStar and MMBench categories.

Each generator returns an `MC` or None when the scene cannot support it; `sample` tries
the generators in random order. Categories use the benchmarks' own names (MMStar's six
core capabilities and their sub-categories, MMBench's L3/L2 ability names) so lmms-eval's
per-category aggregation works unchanged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from demo_world import language as L
from demo_world.scenes import COLORS, SHAPES

WAVELENGTH_ORDER = ("red", "orange", "yellow", "green", "blue", "purple")  # longest first
SIDES = {"triangle": 3, "square": 4, "diamond": 4, "hexagon": 6}
GRID_HINT = "The image is divided into a 3x3 grid of regions."


@dataclass
class MC:
    question: str
    options: list[str]
    letter: str
    mmstar: tuple[str, str]
    mmbench: tuple[str, str]
    hint: str | None = None


def _mc(question: str, answer: str, distractors: list[str], rng: np.random.Generator, mmstar, mmbench, hint=None):
    distractors = [d for d in dict.fromkeys(distractors) if d != answer]
    if len(distractors) < 3:
        return None
    picked = [distractors[int(k)] for k in rng.choice(len(distractors), size=3, replace=False)]
    options = [(picked + [answer])[int(k)] for k in rng.permutation(4)]
    return MC(question, options, "ABCD"[options.index(answer)], mmstar, mmbench, hint)


def _from_qa(qa: L.QA | None, rng, mmstar, mmbench, hint=None) -> MC | None:
    if qa is None:
        return None
    return _mc(qa.question, qa.answer, list(qa.pool), rng, mmstar, mmbench, hint)


def bg_color(scene, rng):
    return _from_qa(L.qa_background(scene, rng), rng, ("coarse perception", "image scene and topic"),
                    ("image_scene", "coarse_perception"))


def bg_style(scene, rng):
    answer = L.BACKGROUND_WORDS[scene["background"]["kind"]]
    return _mc("What kind of background does the image have?", answer, list(L.BACKGROUND_WORDS.values()), rng,
               ("coarse perception", "image style & quality"), ("image_style", "coarse_perception"))


def counting(scene, rng):
    return _from_qa(L.qa_count(scene, rng), rng, ("fine-grained perception", "object counting"),
                    ("object_localization", "finegrained_perception (instance-level)"))


def recognition(scene, rng):
    qa = L.qa_color(scene, rng) if rng.random() < 0.5 else None
    qa = qa or L.qa_shape(scene, rng)
    return _from_qa(qa, rng, ("fine-grained perception", "recognition"),
                    ("attribute_recognition", "finegrained_perception (instance-level)"))


def localization(scene, rng):
    return _from_qa(L.qa_where(scene, rng), rng, ("fine-grained perception", "localization"),
                    ("object_localization", "finegrained_perception (instance-level)"), GRID_HINT)


def size_and_color(scene, rng):
    cands = L._unique(scene["objects"], "shape")
    if not cands:
        return None
    o = L._choice(rng, cands)
    answer = f"{o['size']} and {o['color']}"
    other = [c for c in COLORS if c != o["color"]]
    alt = L._choice(rng, other)
    distractors = [f"{s} and {c}" for s in ("small", "large") for c in (o["color"], alt)]
    return _mc(f"What are the size and the color of the {o['shape']}?", answer, distractors, rng,
               ("instance reasoning", "single-instance reasoning"), ("attribute_recognition",
                                                                      "finegrained_perception (instance-level)"))


def neighbour_color(scene, rng):
    objs = scene["objects"]
    for b in [objs[int(k)] for k in rng.permutation(len(objs))]:
        others = [a for a in objs if a is not b]
        rels = [L.relation(a, b) for a in others]
        unique = [(a, r) for a, r in zip(others, rels, strict=True) if rels.count(r) == 1]
        if unique:
            a, rel = unique[int(rng.integers(len(unique)))]
            q = f"What is the color of the shape {L.RELATIONS[rel][0]} the {L.name(b)}?"
            return _mc(q, a["color"], list(COLORS), rng, ("instance reasoning", "cross-instance attribute reasoning"),
                       ("attribute_comparison", "finegrained_perception (cross-instance)"))
    return None


def relation_statement(scene, rng):
    objs = scene["objects"]
    if len(objs) < 2:
        return None
    i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
    a, b = objs[i], objs[j]
    truth = f"The {L.name(a)} is {L.RELATIONS[L.relation(a, b)][0]} the {L.name(b)}."
    # statements on the other axis may hold too: only false ones, in either order, are distractors
    wrong = [f"The {L.name(x)} is {L.RELATIONS[r][0]} the {L.name(y)}." for x, y in ((a, b), (b, a))
             for r in L.RELATIONS if not _also_true(x, y, r)]
    return _mc("Which option describes the relationship between the two objects correctly?", truth, wrong, rng,
               ("instance reasoning", "cross-instance relation reasoning"), ("spatial_relationship",
                                                                             "relation_reasoning"))


def _also_true(a: dict, b: dict, rel: str) -> bool:
    ia, ib = L.REGIONS.index(a["region"]), L.REGIONS.index(b["region"])
    return {"left": ia % 3 < ib % 3, "right": ia % 3 > ib % 3, "above": ia // 3 < ib // 3,
            "below": ia // 3 > ib // 3}[rel]


def sides(scene, rng):
    cands = [o for o in scene["objects"] if o["shape"] in SIDES]
    if not cands:
        return None
    o = L._choice(rng, cands)
    return _mc(f"How many sides does the {L.name(o)} have?", str(SIDES[o["shape"]]), ["3", "4", "5", "6", "8"], rng,
               ("math", "geometry"), ("physical_property_reasoning", "attribute_reasoning"))


def remaining(scene, rng):
    objs = scene["objects"]
    o = L._choice(rng, objs)
    answer = str(len(objs) - 1)
    return _mc(f"If the {L.name(o)} were removed, how many shapes would remain?", answer,
               ["0", "1", "2", "3", "4"], rng, ("math", "numeric commonsense and calculation"),
               ("structuralized_imagetext_understanding", "logic_reasoning"))


def wavelength(scene, rng):
    objs = scene["objects"]
    colors = [o["color"] for o in objs]
    if len(objs) < 2 or any(c not in WAVELENGTH_ORDER for c in colors) or len(set(colors)) < len(colors):
        return None
    best = min(objs, key=lambda o: WAVELENGTH_ORDER.index(o["color"]))
    rank = WAVELENGTH_ORDER.index(best["color"])
    present = {(o["color"], o["shape"]) for o in objs}
    absent = [f"{c} {s}" for c in WAVELENGTH_ORDER[rank + 1:] for s in SHAPES if (c, s) not in present]
    others = [L.name(o) for o in objs if o is not best]
    distractors = others + [absent[int(k)] for k in rng.permutation(len(absent))[: max(0, 3 - len(others))]]
    return _mc("Which object's color has the longest wavelength of visible light?", L.name(best), distractors, rng,
               ("science & technology", "biology & chemistry & physics"), ("physical_property_reasoning",
                                                                            "attribute_reasoning"))


def left_to_right(scene, rng):
    objs = scene["objects"]
    cols = [L.REGIONS.index(o["region"]) % 3 for o in objs]
    if len(objs) < 2 or len(set(cols)) < len(cols):
        return None
    order = [L.name(o) for _, o in sorted(zip(cols, objs, strict=True), key=lambda t: t[0])]
    answer = ", ".join(order)
    wrong = [", ".join(p) for p in itertools.permutations(order) if list(p) != order]
    present = {(o["color"], o["shape"]) for o in objs}
    for _ in range(4):  # a 2-object scene has one wrong order: add orders holding an absent object
        swap = L.absent_object(scene, rng)
        if swap not in present:
            k = int(rng.integers(len(order)))
            wrong.append(", ".join(order[:k] + [f"{swap[0]} {swap[1]}"] + order[k + 1:]))
    return _mc("Reading from left to right, in which order do the shapes appear?", answer, wrong, rng,
               ("logical reasoning", "code & sequence reasoning"),
               ("structuralized_imagetext_understanding", "logic_reasoning"))


GENERATORS = (bg_color, bg_style, counting, recognition, localization, size_and_color, neighbour_color,
              relation_statement, sides, remaining, wavelength, left_to_right)


def sample(scene: dict, rng: np.random.Generator) -> MC:
    for k in rng.permutation(len(GENERATORS)):
        mc = GENERATORS[int(k)](scene, rng)
        if mc is not None:
            return mc
    raise AssertionError("bg_style always applies")  # pragma: no cover
