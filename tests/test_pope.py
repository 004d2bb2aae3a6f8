"""POPE negative sampling (random / popular / adversarial) on hand-made examples and on the world."""

from __future__ import annotations

from collections import Counter

import numpy as np

from demo_world import benchmarks
from demo_world.pope import (
    adversarial_negatives,
    cooccurrence_counts,
    object_frequencies,
    pope_questions,
    popular_negatives,
    random_negatives,
)
from demo_world.scenes import SHAPES, sample_scene

# Hand-made dataset: "a" is everywhere, "b" is frequent, "e" is rare but always comes with "d".
IMAGES = [
    ("i0", ["a", "b"]),
    ("i1", ["a", "b", "c"]),
    ("i2", ["a", "b"]),
    ("i3", ["a", "d", "e"]),
    ("i4", ["a", "d", "e", "e"]),
    ("i5", ["c", "d", "e"]),
]
VOCAB = ["a", "b", "c", "d", "e", "f"]


def test_frequencies_count_images_not_instances():
    freq = object_frequencies(objs for _, objs in IMAGES)
    assert freq == Counter({"a": 5, "b": 3, "d": 3, "e": 3, "c": 2})


def test_cooccurrence_is_symmetric_and_per_image():
    cooc = cooccurrence_counts(objs for _, objs in IMAGES)
    assert cooc["d"]["e"] == cooc["e"]["d"] == 3
    assert cooc["a"]["b"] == 3 and cooc["a"]["e"] == 2 and cooc["c"]["b"] == 1
    assert "a" not in cooc["a"] and cooc["b"]["f"] == 0


def test_popular_negatives_are_the_most_frequent_absent_objects():
    freq = object_frequencies(objs for _, objs in IMAGES)
    assert popular_negatives(["a", "c"], VOCAB, freq, 2) == ["b", "d"]  # b, d, e tie at 3: broken by name
    assert popular_negatives(["b"], VOCAB, freq, 3) == ["a", "d", "e"]
    assert popular_negatives(["a", "b", "c", "d", "e"], VOCAB, freq, 3) == ["f"]  # only what is absent


def test_adversarial_negatives_cooccur_most_with_present_objects():
    freq = object_frequencies(objs for _, objs in IMAGES)
    cooc = cooccurrence_counts(objs for _, objs in IMAGES)
    # "d" is present: "e" co-occurs with it 3 times, "a" twice, "c" once; popular would pick "a" first
    assert adversarial_negatives(["d"], VOCAB, cooc, freq, 2) == ["e", "a"]
    assert popular_negatives(["d"], VOCAB, freq, 2) == ["a", "b"]
    # with several present objects the counts add up: for {b, c}: a=3+1, d=0+1, e=0+1 -> a, then d/e by freq, name
    assert adversarial_negatives(["b", "c"], VOCAB, cooc, freq, 3) == ["a", "d", "e"]


def test_random_negatives_are_distinct_absent_objects():
    seen = set()
    for s in range(50):
        neg = random_negatives(["a", "b"], VOCAB, 3, np.random.default_rng(s))
        assert len(neg) == 3 == len(set(neg)) and not set(neg) & {"a", "b"}
        seen |= set(neg)
    assert seen == {"c", "d", "e", "f"}  # uniform over all absent objects, not a fixed top-k
    assert random_negatives(["a", "b"], VOCAB, 3, np.random.default_rng(1)) == random_negatives(
        ["a", "b"], VOCAB, 3, np.random.default_rng(1))


def test_pope_questions_balance_and_truth():
    qs = pope_questions(IMAGES, VOCAB, 3, np.random.default_rng(0))
    present = {i: set(objs) for i, objs in IMAGES}
    for cat in ("random", "popular", "adversarial"):
        cat_qs = [q for q in qs if q["category"] == cat]
        answers = Counter(q["answer"] for q in cat_qs)
        assert answers["yes"] == answers["no"] == sum(min(3, len(set(o))) for _, o in IMAGES)
        for q in cat_qs:
            assert (q["object"] in present[q["image_id"]]) == (q["answer"] == "yes")
    adv_i3 = [q["object"] for q in qs if q["category"] == "adversarial" and q["image_id"] == "i3" and q["answer"] == "no"]
    pop_i3 = [q["object"] for q in qs if q["category"] == "popular" and q["image_id"] == "i3" and q["answer"] == "no"]
    # {a,d,e} present: b, c, f are absent; b and c both co-occur 3 times with them, b is more frequent
    assert adv_i3 == ["b", "c", "f"] and pop_i3 == ["b", "c", "f"]
    adv_i5 = [q["object"] for q in qs if q["category"] == "adversarial" and q["image_id"] == "i5" and q["answer"] == "no"]
    assert adv_i5 == ["a", "b", "f"]


def test_pope_keeps_balance_when_vocabulary_runs_out():
    qs = pope_questions([("x", ["a", "b", "c", "d", "e"])], VOCAB, 3, np.random.default_rng(0))
    for cat in ("random", "popular", "adversarial"):
        answers = Counter(q["answer"] for q in qs if q["category"] == cat)
        assert answers == Counter({"yes": 1, "no": 1})


def test_world_statistics_make_categories_differ():
    """On world scenes, popular and adversarial negatives differ from each other and from random ones."""
    items = [(i, sample_scene(np.random.default_rng([5, i]), 3, True), b"") for i in range(60)]
    cols, _ = benchmarks.pope(items, np.random.default_rng(0))
    negs: dict[str, dict[str, set]] = {}
    for src, cat, ans, q in zip(cols["image_source"], cols["category"], cols["answer"], cols["question"], strict=True):
        if ans == "no":
            negs.setdefault(cat, {}).setdefault(src, set()).add(q)
    for cat in ("random", "popular", "adversarial"):
        answers = Counter(a for a, c in zip(cols["answer"], cols["category"], strict=True) if c == cat)
        assert answers["yes"] == answers["no"] == 60 * 3
    differ = sum(negs["popular"][s] != negs["adversarial"][s] for s in negs["popular"])
    assert differ > 30
    assert sum(negs["random"][s] != negs["popular"][s] for s in negs["popular"]) > 30
    # popular negatives concentrate on few shapes; random ones spread over the vocabulary
    pop_shapes = Counter(q for s in negs["popular"].values() for q in s)
    rand_shapes = Counter(q for s in negs["random"].values() for q in s)
    assert len(pop_shapes) < len(rand_shapes) == len(SHAPES)
