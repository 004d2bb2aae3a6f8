"""Text views for stage 1: the whole caption, or sampled sub-descriptions (ITO_sub2).

`split_caption` cuts a caption into sentences; a single sentence is cut into clauses
(at ",", ";", spaced dashes and the conjunctions and/while/but/whereas). Every piece is an
exact substring of the caption, stripped of surrounding whitespace and of the clause
delimiter, and pieces come in caption order without overlapping. A clause cut is kept only
when both sides have at least two words, so "black and white photo" or "Paris, France"
stay whole. `sample_text_views` draws W distinct pieces and falls back to the whole caption
when there are fewer than W.
"""

from __future__ import annotations

import random
import re

# Lower-cased tokens that end in "." without ending a sentence. "etc." is deliberately
# absent: it usually does end one.
ABBREVIATIONS = frozenset(
    {
        "mr.",
        "mrs.",
        "ms.",
        "dr.",
        "prof.",
        "sr.",
        "jr.",
        "st.",
        "vs.",
        "v.",
        "cf.",
        "fig.",
        "figs.",
        "no.",
        "nos.",
        "approx.",
        "inc.",
        "ltd.",
        "co.",
        "corp.",
        "mt.",
        "ft.",
        "dept.",
        "est.",
        "jan.",
        "feb.",
        "mar.",
        "apr.",
        "jun.",
        "jul.",
        "aug.",
        "sep.",
        "sept.",
        "oct.",
        "nov.",
        "dec.",
        "e.g.",
        "i.e.",
        "a.m.",
        "p.m.",
        "u.s.",
        "u.k.",
    }
)
# Sentence end: terminal punctuation, optional closing quotes/brackets, then whitespace or
# the end. Requiring whitespace keeps "3.5", "www.x.com" and "e.g.," intact.
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_NEWLINES = re.compile(r"\s*\n\s*")
_CLAUSE_DELIM = re.compile(
    r"\s*[,;\uff0c\uff1b]\s+|\s+[-\u2013\u2014]+\s+|\s+(?:and|while|but|whereas)\s+", re.IGNORECASE
)
_DOTTED_INITIALS = re.compile(r"^(?:[a-z]\.){2,}$", re.IGNORECASE)
_MIN_CLAUSE_WORDS = 2
TEXT_VIEW_KINDS = ("caption", "subdescriptions")


def _is_abbreviation(text: str, end: int) -> bool:
    """Whether the single "." at text[end - 1] closes an abbreviation or an initial."""
    start = end - 1
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    token = text[start:end].lstrip("\"'(\u201c\u2018[")
    if token.lower() in ABBREVIATIONS or _DOTTED_INITIALS.match(token):
        return True
    return len(token) == 2 and token[0].isalpha() and token[0].isupper()  # "J. Smith"


def _spans(text: str, cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Stripped, non-empty spans of `text` between the delimiter spans `cuts`."""
    out, pos = [], 0
    for a, b in [*cuts, (len(text), len(text))]:
        lo, hi = pos, a
        while lo < hi and text[lo].isspace():
            lo += 1
        while hi > lo and text[hi - 1].isspace():
            hi -= 1
        if lo < hi:
            out.append((lo, hi))
        pos = b
    return out


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    cuts = [(m.start(), m.end()) for m in _NEWLINES.finditer(text)]
    for m in _SENTENCE_END.finditer(text):
        if m.group() == "." and _is_abbreviation(text, m.end()):
            continue
        cuts.append((m.end(), m.end()))  # the punctuation stays with its sentence
    cuts.sort()
    return _spans(text, cuts)


def _n_words(text: str, span: tuple[int, int]) -> int:
    return len(text[span[0] : span[1]].split())


def _clause_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    sub = text[start:end]
    cuts = [(m.start(), m.end()) for m in _CLAUSE_DELIM.finditer(sub)]
    pieces = _spans(sub, cuts)
    # Merge a too-short piece into its left neighbour (the first into the right one):
    # the merged span re-takes the original text, delimiter included.
    merged: list[tuple[int, int]] = []
    for span in pieces:
        if merged and (_n_words(sub, span) < _MIN_CLAUSE_WORDS or _n_words(sub, merged[-1]) < _MIN_CLAUSE_WORDS):
            merged[-1] = (merged[-1][0], span[1])
        else:
            merged.append(span)
    return [(start + a, start + b) for a, b in merged]


def split_caption(text: str) -> list[str]:
    """Sentences of `text`, or its clauses when it has a single sentence; never empty strings."""
    sentences = _sentence_spans(text)
    if len(sentences) == 1:
        sentences = _clause_spans(text, *sentences[0])
    return [text[a:b] for a, b in sentences]


def sample_text_views(text: str, W: int, rng: random.Random) -> list[str]:
    """W distinct sub-descriptions in random order; the whole caption fills missing views."""
    if W < 1:
        raise ValueError(f"W must be >= 1, got {W}")
    pieces = split_caption(text)
    if len(pieces) <= 1:
        return [text] * W
    if len(pieces) >= W:
        return rng.sample(pieces, W)
    return rng.sample(pieces, len(pieces)) + [text] * (W - len(pieces))


def text_views(text: str, W: int, kind: str, rng: random.Random) -> list[str]:
    """W text views: the caption repeated ("caption") or sampled sub-descriptions."""
    if kind == "caption":
        return [text] * W
    if kind == "subdescriptions":
        return sample_text_views(text, W, rng)
    raise ValueError(f"text view kind must be one of {TEXT_VIEW_KINDS}, got {kind!r}")


class TextViews:
    """Picklable `text_view_fn(text, rng) -> list[str]` for the data loader."""

    def __init__(self, kind: str, W: int):
        if kind not in TEXT_VIEW_KINDS:
            raise ValueError(f"text view kind must be one of {TEXT_VIEW_KINDS}, got {kind!r}")
        if W < 1:
            raise ValueError(f"W must be >= 1, got {W}")
        self.kind, self.W = kind, W

    def __call__(self, text: str, rng: random.Random) -> list[str]:
        return text_views(text, self.W, self.kind, rng)

    def __repr__(self) -> str:
        return f"TextViews(kind={self.kind!r}, W={self.W})"
