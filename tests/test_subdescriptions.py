"""Caption splitting and text-view sampling (stage1_pretrain.subdescriptions)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stage1_pretrain.subdescriptions import TextViews, sample_text_views, split_caption, text_views


def _assert_in_order(text, pieces):
    pos = 0
    for p in pieces:
        i = text.find(p, pos)
        assert i >= 0, (text, pieces, p)
        pos = i + len(p)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A dog runs on the grass. A cat sleeps nearby!", ["A dog runs on the grass.", "A cat sleeps nearby!"]),
        ("Is it red? Yes!  It is.", ["Is it red?", "Yes!", "It is."]),
        ("Mr. Smith holds a 3.5 kg fish. Dr. Who waves.", ["Mr. Smith holds a 3.5 kg fish.", "Dr. Who waves."]),
        ("Fruit, e.g. apples. Vegetables, i.e. carrots.", ["Fruit, e.g. apples.", "Vegetables, i.e. carrots."]),
        ("J. R. R. Tolkien wrote books. He was English.", ["J. R. R. Tolkien wrote books.", "He was English."]),
        ("Visit www.example.com today. It costs $1,000.", ["Visit www.example.com today.", "It costs $1,000."]),
        ('He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
        ("first line\nsecond line", ["first line", "second line"]),
        # one sentence: clauses
        ("a dog runs and a cat sleeps", ["a dog runs", "a cat sleeps"]),
        ("a red car, parked near a tree; the sky is blue", ["a red car", "parked near a tree", "the sky is blue"]),
        ("a man reads while his dog sleeps", ["a man reads", "his dog sleeps"]),
        ("a quiet street - two old houses", ["a quiet street", "two old houses"]),
        # too-short clauses stay attached
        ("black and white photo of a man", ["black and white photo of a man"]),
        ("Paris, France", ["Paris, France"]),
        ("a 3,000 m peak at dawn", ["a 3,000 m peak at dawn"]),
        ("dog", ["dog"]),
        ("   ", []),
        ("", []),
    ],
)
def test_split_caption_examples(text, expected):
    assert split_caption(text) == expected


def test_multiple_sentences_are_not_cut_into_clauses():
    assert split_caption("A dog, a cat and a bird. They play.") == ["A dog, a cat and a bird.", "They play."]


_TOKENS = list(" .,;!?\n\t-") + [" and ", " while ", "e.g. ", "Mr. ", "3.5", "\u2026", "\u3002", "A dog", "x"]
_TEXT = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(_TOKENS)), max_size=25).map("".join)


@settings(max_examples=300, deadline=None)
@given(_TEXT)
def test_split_caption_properties(text):
    pieces = split_caption(text)
    assert all(p and p == p.strip() for p in pieces)
    _assert_in_order(text, pieces)  # substrings, in caption order, non-overlapping
    joined = "".join(pieces)
    assert len("".join(joined.split())) <= len("".join(text.split()))
    if text.strip():
        assert pieces, "a non-blank caption keeps at least one piece"


@settings(max_examples=200, deadline=None)
@given(_TEXT, st.integers(1, 4), st.integers(0, 2**32))
def test_sample_text_views_properties(text, W, seed):
    views = sample_text_views(text, W, random.Random(seed))
    assert len(views) == W
    pieces = split_caption(text)
    if len(pieces) <= 1:
        assert views == [text] * W
    else:
        real = [v for v in views[: min(W, len(pieces))]]
        assert all(v in pieces for v in real)
        picked = sorted(pieces.index(v) for v in real if pieces.count(v) == 1)
        assert len(set(picked)) == len(picked)  # without replacement
        assert views[len(pieces) :] == [text] * max(0, W - len(pieces))


def test_sample_text_views_examples():
    cap = "A dog runs. A cat sleeps. A bird sings."
    rng = random.Random(0)
    draws = [tuple(sample_text_views(cap, 2, rng)) for _ in range(50)]
    assert all(a != b and {a, b} <= {"A dog runs.", "A cat sleeps.", "A bird sings."} for a, b in draws)
    assert len(set(draws)) > 3  # the choice varies
    assert sample_text_views(cap, 2, random.Random(7)) == sample_text_views(cap, 2, random.Random(7))
    assert sorted(sample_text_views(cap, 3, random.Random(1))) == sorted(split_caption(cap))
    assert sample_text_views(cap, 4, random.Random(1))[3] == cap
    assert sample_text_views("a lone dog", 2, random.Random(0)) == ["a lone dog", "a lone dog"]
    assert sample_text_views("a lone dog", 1, random.Random(0)) == ["a lone dog"]


def test_text_views_kinds():
    cap = "A dog runs. A cat sleeps."
    assert text_views(cap, 1, "caption", random.Random(0)) == [cap]
    assert text_views(cap, 2, "caption", random.Random(0)) == [cap, cap]
    assert sorted(text_views(cap, 2, "subdescriptions", random.Random(0))) == ["A cat sleeps.", "A dog runs."]
    fn = TextViews("subdescriptions", 2)
    assert fn(cap, random.Random(3)) == text_views(cap, 2, "subdescriptions", random.Random(3))
    with pytest.raises(ValueError, match="kind"):
        text_views(cap, 1, "words", random.Random(0))
    with pytest.raises(ValueError, match="kind"):
        TextViews("words", 1)
    with pytest.raises(ValueError, match="W"):
        sample_text_views(cap, 0, random.Random(0))
