"""Stage-1 evaluation of a dual encoder (an open_clip model): zero-shot top-1, retrieval R@1/5/10,
linear probe, modality gap, and a UMAP picture, from a JSONL eval set.

Input: a JSONL file of records {"image": path relative to (and inside) the JSONL folder, "caption": str,
"label": str (optional)}; next to it, optionally, `classnames.json` (list of str) and
`templates.json` (list of prompt templates with "{}" or "{c}" for the class name). Without
them the class names are the sorted set of labels and the templates open_clip's
SIMPLE_IMAGENET_TEMPLATES. Several records may share one image (several captions per
image); the image is encoded once and retrieval counts a hit for any of its captions.

Embeddings are computed once per call and every metric reads them; the pure metric
functions live in stage1_pretrain.metrics (re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier
from open_clip import SIMPLE_IMAGENET_TEMPLATES
from PIL import Image, UnidentifiedImageError

from common.images import ImageDecodeError, decode_image
from common.io import InputError, atomic_write_bytes, atomic_write_json, atomic_write_text, path_escape, read_json
from stage1_pretrain.metrics import (
    linear_probe,
    linear_probe_adamw,
    modality_gap,
    retrieval_recall,
    stratified_split,
    zero_shot_accuracy,
)

__all__ = [
    "EvalRecord",
    "EvalSet",
    "build_zero_shot_classifier",
    "encode",
    "encode_images",
    "encode_texts",
    "evaluate",
    "linear_probe",
    "load_eval_records",
    "modality_gap",
    "retrieval_recall",
    "stratified_split",
    "umap_plot",
    "zero_shot_accuracy",
    "zero_shot_top1",
]

log = logging.getLogger(__name__)

RETRIEVAL_KS = (1, 5, 10)


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


# ---------------------------------------------------------------- loading


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


def _as_evalset(evalset: EvalSet | str | Path, skip_bad: bool = False) -> EvalSet:
    return evalset if isinstance(evalset, EvalSet) else load_eval_records(evalset, skip_bad=skip_bad)


# ---------------------------------------------------------------- encoding


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # Called from the training loop at epoch end: put the model back in train mode after.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _load_image(path: Path, where: str) -> Image.Image:
    """Decoded as stage-1 training decodes (common.images: alpha over white, 16-bit rescaled, size limit)."""
    try:
        return decode_image(path)
    except (OSError, ImageDecodeError) as e:
        raise InputError(f"{where}: field 'image': {path} could not be decoded ({_one_line(e)})") from None


def encode_images(model, preprocess, evalset: EvalSet, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """L2-normalised image embeddings [num images, D] (float32, CPU), one per unique image."""
    out, dtype = [], _param_dtype(model)
    with _eval_mode(model):
        for start in range(0, len(evalset.images), batch_size):
            paths = evalset.images[start : start + batch_size]
            lines = evalset.image_lines[start : start + batch_size]
            batch = torch.stack(
                [preprocess(_load_image(p, f"{evalset.path}:{ln}")) for p, ln in zip(paths, lines, strict=True)]
            )
            emb = model.encode_image(batch.to(device=device, dtype=dtype))
            out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """L2-normalised text embeddings [len(texts), D] (float32, CPU)."""
    out = []
    with _eval_mode(model):
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
            out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


def encode(
    model,
    preprocess,
    tokenizer,
    evalset: EvalSet | str | Path,
    batch_size: int = 256,
    device: str = "cpu",
    *,
    skip_bad: bool = False,
):
    """(image_emb [num images, D], text_emb [num captions, D]), normalised; caption t describes image
    `evalset.text_to_image[t]` (the identity with one caption per image)."""
    evalset = _as_evalset(evalset, skip_bad)
    image_emb = encode_images(model, preprocess, evalset, batch_size, device)
    text_emb = encode_texts(model, tokenizer, evalset.captions, batch_size, device)
    return image_emb, text_emb


# ---------------------------------------------------------------- zero-shot


def _fill(template: str, classname: str) -> str:
    # str.replace, not str.format: a template may contain other braces.
    return template.replace("{c}", classname).replace("{}", classname)


def build_zero_shot_classifier(
    model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device: str = "cpu"
):
    """Zero-shot weights [D, C] by the CLIP protocol (mean of normalised prompt embeddings, renormalised),
    computed by clip_benchmark's `zero_shot_classifier`; prompts are expanded here so both "{}"
    and "{c}" placeholders work."""
    if not classnames:
        raise InputError("zero-shot classifier: no class names (records have no 'label' and no classnames.json)")
    prompts = {c: [_fill(t, c) for t in templates] for c in classnames}
    with _eval_mode(model):
        weights = zero_shot_classifier(
            model, tokenizer, list(classnames), prompts, torch.device(device).type, amp=False
        )
    return weights.float()


def zero_shot_top1(
    model,
    preprocess,
    tokenizer,
    evalset: EvalSet | str | Path,
    batch_size: int = 256,
    device: str = "cpu",
    *,
    skip_bad: bool = False,
) -> float:
    """Zero-shot top-1 alone (images and class prompts only): the per-epoch check of the training loop.
    Pass a loaded EvalSet to avoid re-reading the JSONL at every epoch."""
    evalset = _as_evalset(evalset, skip_bad)
    labels = evalset.label_ids()
    classifier = build_zero_shot_classifier(model, tokenizer, evalset.classnames, evalset.templates, device)
    image_emb = encode_images(model, preprocess, evalset, batch_size, device)
    return zero_shot_accuracy(image_emb, labels, classifier)


# ---------------------------------------------------------------- UMAP picture


def umap_plot(image_emb, text_emb, out_png: str | Path, seed: int = 0, title: str | None = None) -> Path:
    """2-D UMAP (cosine metric, random_state=seed) of image (blue) and text (red) embeddings, saved as PNG."""
    import io
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import umap

    img, txt = (x.detach().float().cpu().numpy() for x in (image_emb, text_emb))
    x = np.concatenate([img, txt])
    if len(x) < 3:
        raise ValueError(f"umap_plot: needs at least 3 embeddings, got {len(x)}")
    reducer = umap.UMAP(n_neighbors=max(2, min(15, len(x) - 1)), n_components=2, metric="cosine", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs forced to 1 by random_state; spectral-init fallbacks on tiny sets
        xy = reducer.fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.scatter(xy[: len(img), 0], xy[: len(img), 1], s=8, c="tab:blue", alpha=0.7, label=f"image ({len(img)})")
    ax.scatter(xy[len(img) :, 0], xy[len(img) :, 1], s=8, c="tab:red", alpha=0.7, label=f"text ({len(txt)})")
    ax.legend(loc="best")
    ax.set_title(title or "UMAP of image and text embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(out_png, buf.getvalue())


# ---------------------------------------------------------------- full evaluation


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def metrics_markdown(m: dict, title: str = "Stage-1 evaluation") -> str:
    r, g = m["retrieval"], m["modality_gap"]
    rows = [
        ("images / captions", f"{m['n']} / {m['n_texts']}"),
        ("skipped records", m["skipped"]),
        (f"zero-shot top-1 ({m['num_classes']} classes)", m["zero_shot_top1"]),
        ("zero-shot chance", m["zero_shot_chance"]),
        ("linear probe top-1", m["linear_probe_top1"]),
    ]
    for direction, name in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
        rows += [(f"{name} {k}", v) for k, v in r[direction].items()]
    rows += [
        ("retrieval chance R@1", r["chance_R@1"]),
        ("modality gap: centroid distance", g["centroid_distance"]),
        ("modality gap: linear separability", g["linear_separability"]),
    ]
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def compute_metrics(evalset: EvalSet, image_emb, text_emb, classifier=None, seed: int = 0) -> dict:
    """All stage-1 metrics from precomputed embeddings (classifier None: no zero-shot)."""
    n = len(image_emb)
    m: dict = {"n": n, "n_texts": len(text_emb), "skipped": evalset.skipped, "num_classes": len(evalset.classnames)}
    m["zero_shot_top1"] = m["zero_shot_chance"] = m["linear_probe_top1"] = None
    if evalset.has_labels:
        labels = evalset.label_ids()
        m["zero_shot_chance"] = 1.0 / len(evalset.classnames)
        if classifier is not None:
            m["zero_shot_top1"] = zero_shot_accuracy(image_emb, labels, classifier)
        tr, te = stratified_split(labels.numpy(), 0.5, seed)
        m["linear_probe_top1"] = linear_probe(image_emb[tr], labels[tr], image_emb[te], labels[te], seed=seed)
        m["linear_probe"] = {"protocol": "logistic regression, stratified half of the eval set -> the other half",
                             "train": len(tr), "test": len(te)}
    m["retrieval"] = retrieval_recall(image_emb, text_emb, RETRIEVAL_KS, evalset.text_to_image)
    m["retrieval"]["chance_R@1"] = 1.0 / n
    m["modality_gap"] = modality_gap(image_emb, text_emb, seed=seed)
    return m


def probe_on_splits(model, preprocess, train_jsonl, test_jsonl, *, batch_size: int = 256, device: str = "cpu",
                    seed: int = 0) -> tuple[float | None, dict]:
    """The paper's linear probe: AdamW + cosine for 30 epochs on the train split's image embeddings, top-1 on test."""
    train, test = load_eval_records(train_jsonl), load_eval_records(test_jsonl)
    if train.classnames != test.classnames:
        raise InputError(f"{test_jsonl}: probe test classes differ from {train_jsonl}'s, expected one classnames.json")
    x_tr = encode_images(model, preprocess, train, batch_size, device)
    x_te = encode_images(model, preprocess, test, batch_size, device)
    acc = linear_probe_adamw(x_tr, train.label_ids(), x_te, test.label_ids(), seed=seed)
    return acc, {"protocol": "AdamW + cosine, 30 epochs, lr 0.1 (paper; clip_benchmark defaults), train split -> test split",
                 "train": len(train.records), "test": len(test.records), "classes": len(train.classnames)}


def evaluate(
    model,
    preprocess,
    tokenizer,
    jsonl_path: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    umap: bool = True,
    skip_bad: bool = False,
    seed: int = 0,
    probe_train: str | Path | None = None,
    probe_test: str | Path | None = None,
) -> dict:
    """Run every stage-1 metric on one eval JSONL; write metrics.json, metrics.md and umap.png to out_dir.

    With `probe_train` and `probe_test` (labelled JSONLs sharing one classnames.json) the linear probe follows
    the paper (AdamW, cosine, 30 epochs, train split -> test split); without them it is the quick fallback, a
    logistic regression on half of the eval set scored on the other half. `linear_probe.protocol` says which.
    """
    out_dir = Path(out_dir)
    evalset = load_eval_records(jsonl_path, skip_bad=skip_bad)
    for p in evalset.problems[:20]:
        log.warning("skipped: %s", p)
    image_emb, text_emb = encode(model, preprocess, tokenizer, evalset, batch_size, device)
    classifier = None
    if evalset.has_labels:
        classifier = build_zero_shot_classifier(model, tokenizer, evalset.classnames, evalset.templates, device)
    metrics = compute_metrics(evalset, image_emb, text_emb, classifier, seed)
    if probe_train and probe_test:
        metrics["linear_probe_top1"], metrics["linear_probe"] = probe_on_splits(
            model, preprocess, probe_train, probe_test, batch_size=batch_size, device=device, seed=seed)
    if umap and len(image_emb) + len(text_emb) >= 3:
        gap = metrics["modality_gap"]["centroid_distance"]
        umap_plot(image_emb, text_emb, out_dir / "umap.png", seed, title=f"{evalset.path.name}: gap {gap:.3f}")
    atomic_write_json(out_dir / "metrics.json", _finite(metrics))
    atomic_write_text(out_dir / "metrics.md", metrics_markdown(metrics, f"Stage-1 evaluation: {evalset.path.name}"))
    return metrics


def _finite(obj):
    # JSON has no NaN/Infinity; a degenerate embedding could produce one.
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
