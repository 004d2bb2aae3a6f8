"""POPE negative sampling (Li et al. 2023, "Evaluating Object Hallucination in LVLMs").

For each image the positives are the objects present; negatives are objects absent
from the image, chosen three ways:
- random: uniformly among the absent objects;
- popular: the absent objects most frequent over the whole dataset;
- adversarial: the absent objects that co-occur most often with the present ones.
Ties are broken by overall frequency, then by name, so the ranking is deterministic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

CATEGORIES = ("random", "popular", "adversarial")


def object_frequencies(images: Iterable[Iterable[str]]) -> Counter:
    """Number of images each object appears in (an object counts once per image)."""
    freq: Counter = Counter()
    for objs in images:
        freq.update(set(objs))
    return freq


def cooccurrence_counts(images: Iterable[Iterable[str]]) -> dict[str, Counter]:
    """cooc[a][b]: number of images holding both a and b (a != b)."""
    cooc: dict[str, Counter] = {}
    for objs in images:
        present = sorted(set(objs))
        for a in present:
            row = cooc.setdefault(a, Counter())
            row.update(b for b in present if b != a)
    return cooc


def random_negatives(present: Iterable[str], vocabulary: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
    absent = [v for v in vocabulary if v not in set(present)]
    k = min(k, len(absent))
    return [absent[int(i)] for i in rng.choice(len(absent), size=k, replace=False)]


def popular_negatives(present: Iterable[str], vocabulary: Sequence[str], freq: Counter, k: int) -> list[str]:
    absent = [v for v in vocabulary if v not in set(present)]
    return sorted(absent, key=lambda v: (-freq[v], v))[:k]


def adversarial_negatives(
    present: Iterable[str], vocabulary: Sequence[str], cooc: dict[str, Counter], freq: Counter, k: int
) -> list[str]:
    present = set(present)
    absent = [v for v in vocabulary if v not in present]

    def score(v: str) -> int:
        return sum(cooc.get(p, Counter())[v] for p in present)

    return sorted(absent, key=lambda v: (-score(v), -freq[v], v))[:k]


def pope_questions(
    images: Sequence[tuple[str, Sequence[str]]], vocabulary: Sequence[str], k: int, rng: np.random.Generator
) -> list[dict]:
    """POPE items for every category: per image, up to `k` positives and as many negatives.

    `images` holds (image_id, objects present). Returns dicts {image_id, category, object,
    answer} with answer "yes"/"no", in category order, then image order, then yes before no.
    The statistics come from `images` itself, as POPE ranks objects over its own dataset.
    """
    freq = object_frequencies(objs for _, objs in images)
    cooc = cooccurrence_counts(objs for _, objs in images)
    out = []
    for category in CATEGORIES:
        for image_id, objs in images:
            present = sorted(set(objs))
            pos = [present[int(i)] for i in rng.choice(len(present), size=min(k, len(present)), replace=False)]
            if category == "random":
                neg = random_negatives(present, vocabulary, len(pos), rng)
            elif category == "popular":
                neg = popular_negatives(present, vocabulary, freq, len(pos))
            else:
                neg = adversarial_negatives(present, vocabulary, cooc, freq, len(pos))
            if len(neg) < len(pos):  # keep yes/no balanced when the vocabulary is nearly exhausted
                pos = pos[: len(neg)]
            out += [{"image_id": image_id, "category": category, "object": o, "answer": "yes"} for o in pos]
            out += [{"image_id": image_id, "category": category, "object": o, "answer": "no"} for o in neg]
    return out
