"""Loader and validator for LLaVA-format JSON (LLaVA-Pretrain 558k, llava_v1_5_mix665k).

The file is a JSON list of ``{"id", "image"?, "conversations": [{"from", "value"}, ...]}``. Every
record is checked up front so that a bad record fails the run at load time with one line
``FILE: record ID (index I): <problem>, expected <what>`` (common.io.InputError), or, with
skip_bad=True, is skipped, counted and logged (at most `max_warnings` lines).

Rules (LLaVA-1.5's data and its `preprocess_*` functions, made explicit):
- `id` is a string or an integer (kept as a string); other keys besides id/image/conversations are ignored.
- `conversations` is a non-empty list of turns alternating "human"/"gpt", starting with human and
  ending with gpt; each turn an object with string `from` and `value`. Only "human" and "gpt" are
  accepted ("user"/"assistant" are refused), since LLaVA's preprocess maps only those two.
- an image sample has exactly one "<image>" in its first human turn (LLaVA-1.5 data puts it at the
  start or the end; preprocessing moves it to the start) and none elsewhere; a text-only sample
  (no `image`, or null) has none.
- `image` is a relative path string that stays inside the image folder after normalising "." and
  ".." (checked lexically, so symlinked sub-folders are allowed) and names an existing file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from common.io import InputError, path_escape, read_json
from stage2_llava.conversation import DEFAULT_IMAGE_TOKEN, GPT, HUMAN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    id: str
    image: str | None  # relative to the image folder; None for text-only samples
    conversations: list[dict]  # [{"from": "human"|"gpt", "value": str}, ...]

    @property
    def has_image(self) -> bool:
        return self.image is not None


class _Bad(Exception):
    def __init__(self, problem: str, expected: str):
        super().__init__(f"{problem}, expected {expected}")


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_JSON_TYPES = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"), (list, "a list"),
               (dict, "an object"))


def _type(value) -> str:
    """The JSON type of a parsed value, with its article ("a number", "an object", "null")."""
    return "null" if value is None else next((n for t, n in _JSON_TYPES if isinstance(value, t)), type(value).__name__)


def _record_id(rec) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        return "<no id>" if rid is None else _show(rid)
    text = str(rid)
    return text if text.isprintable() and len(text) <= 80 else _show(text)


def _check_id(rec: dict) -> str:
    if "id" not in rec:
        raise _Bad("missing key 'id'", "a string or integer id")
    rid = rec["id"]
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise _Bad(f"'id' is {_type(rid)}", "a string or integer")
    return str(rid)


def _check_turns(rec: dict) -> list[dict]:
    if "conversations" not in rec:
        raise _Bad("missing key 'conversations'", "a list of human/gpt turns")
    convs = rec["conversations"]
    if not isinstance(convs, list):
        raise _Bad(f"'conversations' is {_type(convs)}", "a list of human/gpt turns")
    if not convs:
        raise _Bad("'conversations' is empty", "at least one human turn and one gpt turn")
    turns = []
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise _Bad(f"turn {j} is {_type(turn)}", 'an object {"from", "value"}')
        for key in ("from", "value"):
            if key not in turn:
                raise _Bad(f"turn {j} has no {key!r}", 'an object {"from", "value"}')
            if not isinstance(turn[key], str):
                raise _Bad(f"turn {j} {key!r} is {_type(turn[key])}", "a string")
        who = turn["from"]
        if who not in (HUMAN, GPT):
            raise _Bad(f"turn {j} is from {_show(who)}", '"human" or "gpt"')
        want = HUMAN if j % 2 == 0 else GPT
        if who != want:
            raise _Bad(f"turn {j} is from {who!r}", f"{want!r} (turns alternate human/gpt, starting with human)")
        turns.append({"from": who, "value": turn["value"]})
    if turns[-1]["from"] != GPT:
        raise _Bad(f"the last turn ({len(turns) - 1}) is from 'human'", "the conversation to end with a gpt turn")
    return turns


def _check_image_tokens(turns: list[dict], has_image: bool) -> None:
    counts = [t["value"].count(DEFAULT_IMAGE_TOKEN) for t in turns]
    if has_image and counts[0] != 1:
        raise _Bad(f"the first human turn has {counts[0]} '<image>' tokens", "exactly one in an image sample")
    for j, n in enumerate(counts):
        if n and (j > 0 or not has_image):
            where = "a sample without 'image'" if not has_image else "turns after the first"
            raise _Bad(f"turn {j} contains '<image>'", f"none in {where}")


def _check_image(rec: dict, image_folder: str | None) -> str | None:
    image = rec.get("image")
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        raise _Bad(f"'image' is {_show(image) if isinstance(image, str) else _type(image)}",
                   "a relative path string (one image per sample)")
    if image_folder is None:
        raise _Bad("the sample has an image but no image folder was given", "an image folder")
    escape = path_escape(image)
    if escape:
        raise _Bad(f"'image' {_show(image)} {escape}", "a path inside the image folder")
    if not os.path.isfile(os.path.join(image_folder, os.path.normpath(image))):
        raise _Bad(f"image file {_show(image)} not found in {image_folder}", "an existing file")
    return image


def _check_record(rec, image_folder: str | None) -> Record:
    """One validated Record, or _Bad describing the first problem."""
    if not isinstance(rec, dict):
        raise _Bad(f"is {_type(rec)}", 'an object {"id", "image"?, "conversations"}')
    rid = _check_id(rec)
    turns = _check_turns(rec)
    image = _check_image(rec, image_folder)
    _check_image_tokens(turns, image is not None)
    return Record(id=rid, image=image, conversations=turns)


def load_llava_json(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None,
    *,
    skip_bad: bool = False,
    max_warnings: int = 20,
) -> tuple[list[Record], int]:
    """Read and validate a LLaVA JSON file; returns (records, number of skipped bad records).

    image_folder None allows only text-only samples. With skip_bad=False the first bad record raises
    InputError; with skip_bad=True bad records are dropped, counted and logged (first `max_warnings`).
    """
    path = str(path)
    folder = None if image_folder is None else str(image_folder)
    if folder is not None and not os.path.isdir(folder):
        raise InputError(f"{folder}: image folder not found (for {path})")
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: top level is {_type(data)}, expected a list of records")
    records, skipped = [], 0
    for i, rec in enumerate(data):
        try:
            records.append(_check_record(rec, folder))
        except _Bad as e:
            line = f"{path}: record {_record_id(rec)} (index {i}): {e}"
            if not skip_bad:
                raise InputError(line) from None
            skipped += 1
            if skipped <= max_warnings:
                log.warning("skipped %s", line)
    if skipped > max_warnings:
        log.warning("%s: %d more bad records skipped without a message", path, skipped - max_warnings)
    return records, skipped


def modality_lengths(records: Sequence[Record]) -> list[int]:
    """LLaVA's modality lengths for its length-grouped sampler: word count of all turns, negative if text-only.

    A text-only sample with no words gets -1 rather than LLaVA's 0, which its sampler rejects.
    """
    out = []
    for rec in records:
        n = sum(len(t["value"].split()) for t in rec.conversations)
        out.append(n if rec.has_image else -max(n, 1))
    return out
