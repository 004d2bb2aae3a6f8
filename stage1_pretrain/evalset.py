"""Stage-1 eval sets: read and validate a JSONL of {image, caption, label?} records (the readers of
`stage1_pretrain.evaluate`).

Input: a JSONL file of records {"image": path relative to (and inside) the JSONL folder, "caption": str,
"label": str (optional)}; next to it, optionally, `classnames.json` (list of str) and
`templates.json` (list of prompt templates with "{}" or "{c}" for the class name). Without
them the class names are the sorted set of labels and the templates open_clip's
SIMPLE_IMAGENET_TEMPLATES. Several records may share one image (several captions per
image); the image is encoded once and retrieval counts a hit for any of its captions.
Images are decoded as stage-1 training decodes them (`common.images`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from open_clip import SIMPLE_IMAGENET_TEMPLATES
from PIL import Image, UnidentifiedImageError

from common.images import ImageDecodeError, decode_image
from common.io import InputError, path_escape, read_json


@dataclass(frozen=True)
class EvalRecord:
    line: int
    image: Path
    caption: str
    label: str | None


@dataclass
class EvalSet:
    """Validated eval records plus the derived image list (unique images, first-seen order)."""

    path: Path
    records: list[EvalRecord]
    classnames: list[str]
    templates: list[str]
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    images: list[Path] = field(init=False)
    image_lines: list[int] = field(init=False)
    image_labels: list[str | None] = field(init=False)
    text_to_image: list[int] = field(init=False)

    def __post_init__(self) -> None:
        index: dict[Path, int] = {}
        self.images, self.image_lines, self.image_labels, self.text_to_image = [], [], [], []
        for r in self.records:
            if r.image not in index:
                index[r.image] = len(self.images)
                self.images.append(r.image)
                self.image_lines.append(r.line)
                self.image_labels.append(r.label)
            self.text_to_image.append(index[r.image])

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]

    @property
    def has_labels(self) -> bool:
        return bool(self.records) and self.records[0].label is not None

    def label_ids(self) -> torch.Tensor:
        """Class index of each image (order of `images`)."""
        if not self.has_labels:
            raise InputError(f"{self.path}: records have no 'label' field; zero-shot and linear probe need one")
        lookup = {c: i for i, c in enumerate(self.classnames)}
        return torch.tensor([lookup[lab] for lab in self.image_labels], dtype=torch.long)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _default_templates() -> list[str]:
    # open_clip ships the templates as lambdas; calling them with "{}" gives format strings.
    return [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]


def _read_side_list(path: Path, what: str, need_placeholder: bool = False) -> list[str] | None:
    if not path.exists():
        return None
    items = read_json(path)
    if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
        raise InputError(f"{path}: expected a non-empty JSON list of non-empty strings ({what})")
    if need_placeholder:
        for i, t in enumerate(items):
            if "{}" not in t and "{c}" not in t:
                raise InputError(f"{path}: item {i} {t!r}: expected a '{{}}' or '{{c}}' class-name placeholder")
    if not need_placeholder and len(set(items)) != len(items):
        raise InputError(f"{path}: class names must be unique")
    return items


def _parse_line(text: str, jsonl: Path, line: int, classnames: list[str] | None) -> EvalRecord:
    where = f"{jsonl}:{line}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object {{image, caption, label?}}, got {type(obj).__name__}")
    image, caption, label = obj.get("image"), obj.get("caption"), obj.get("label")
    if not isinstance(image, str) or not image.strip():
        raise InputError(f"{where}: field 'image': expected a non-empty path string")
    if not isinstance(caption, str) or not caption.strip():
        raise InputError(f"{where}: field 'caption': expected a non-empty string")
    if label is not None and (not isinstance(label, str) or not label):
        raise InputError(f"{where}: field 'label': expected a non-empty string, got {label!r}")
    if label is not None and classnames is not None and label not in classnames:
        raise InputError(f"{where}: field 'label': {label!r} is not in classnames.json")
    escape = path_escape(image)
    if escape:
        raise InputError(f"{where}: field 'image': {image!r} {escape}, expected a path inside {jsonl.parent}")
    path = (jsonl.parent / image).resolve()
    if not path.is_file():
        raise InputError(f"{where}: field 'image': file {path} not found")
    try:
        with Image.open(path) as im:
            im.verify()  # cheap header/CRC check; a full decode happens once, in encode_images
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{where}: field 'image': {path} is not a readable image ({_one_line(e)})") from None
    return EvalRecord(line=line, image=path, caption=caption, label=label)


def _iter_lines(jsonl: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(jsonl, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    yield line, text
    except FileNotFoundError:
        raise InputError(f"{jsonl}: file not found") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{jsonl}: not UTF-8 text ({_one_line(e)})") from None


def _cross_check(records: list[EvalRecord], jsonl: Path) -> Iterator[tuple[EvalRecord, str]]:
    """Yield (record, reason) for records inconsistent with the others (label presence, label per image)."""
    labelled = sum(r.label is not None for r in records)
    mixed = 0 < labelled < len(records)
    seen: dict[Path, str | None] = {}
    for r in records:
        if mixed and r.label is None:
            yield r, f"{jsonl}:{r.line}: field 'label': missing while other records have one"
        elif r.image in seen and seen[r.image] != r.label:
            yield r, f"{jsonl}:{r.line}: field 'label': {r.label!r} differs from {seen[r.image]!r} for the same image"
        else:
            seen.setdefault(r.image, r.label)


def load_eval_records(jsonl_path: str | Path, *, skip_bad: bool = False) -> EvalSet:
    """Read and validate an eval JSONL (see the module docstring).

    A bad record raises a one-line InputError naming file and line, or with skip_bad=True
    is skipped and counted (`EvalSet.skipped`, reasons in `EvalSet.problems`).
    """
    jsonl = Path(jsonl_path).resolve()
    classnames = _read_side_list(jsonl.parent / "classnames.json", "class names")
    templates = _read_side_list(jsonl.parent / "templates.json", "prompt templates", need_placeholder=True)
    records, problems = [], []
    for line, text in _iter_lines(jsonl):
        try:
            records.append(_parse_line(text, jsonl, line, classnames))
        except InputError as e:
            if not skip_bad:
                raise
            problems.append(str(e))
    bad = list(_cross_check(records, jsonl))
    if bad and not skip_bad:
        raise InputError(bad[0][1])
    dropped = {id(r) for r, _ in bad}
    records = [r for r in records if id(r) not in dropped]
    problems += [reason for _, reason in bad]
    if not records:
        raise InputError(f"{jsonl}: no usable records" + (f" ({len(problems)} skipped)" if problems else ""))
    if classnames is None and records[0].label is not None:
        classnames = sorted({r.label for r in records})
    return EvalSet(
        path=jsonl,
        records=records,
        classnames=classnames or [],
        templates=templates or _default_templates(),
        skipped=len(problems),
        problems=problems,
    )


def as_evalset(evalset: EvalSet | str | Path, skip_bad: bool = False) -> EvalSet:
    return evalset if isinstance(evalset, EvalSet) else load_eval_records(evalset, skip_bad=skip_bad)


def load_image(path: Path, where: str) -> Image.Image:
    """Decoded as stage-1 training decodes (common.images: alpha over white, 16-bit rescaled, size limit)."""
    try:
        return decode_image(path)
    except (OSError, ImageDecodeError) as e:
        raise InputError(f"{where}: field 'image': {path} could not be decoded ({_one_line(e)})") from None
