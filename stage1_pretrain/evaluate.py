"""Stage-1 evaluation of a dual encoder (an open_clip model) on a JSONL eval set: zero-shot top-1, retrieval
R@1/5/10, linear probe, modality gap and a UMAP picture, written as metrics.json, metrics.md and umap.png.

This module is the command; the parts live beside it: `evalset` reads and validates the JSONL (format in
its docstring), `embeddings` encodes it once, `metrics` holds the pure metric functions every number comes
from, `pictures` draws the UMAP.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.io import InputError, atomic_write_json, atomic_write_text, json_finite

from .embeddings import build_zero_shot_classifier, encode, encode_images
from .evalset import EvalSet, load_eval_records
from .metrics import (
    linear_probe,
    linear_probe_adamw,
    modality_gap,
    retrieval_recall,
    stratified_split,
    zero_shot_accuracy,
)
from .pictures import umap_plot

log = logging.getLogger(__name__)

RETRIEVAL_KS = (1, 5, 10)


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
    atomic_write_json(out_dir / "metrics.json", json_finite(metrics))
    atomic_write_text(out_dir / "metrics.md", metrics_markdown(metrics, f"Stage-1 evaluation: {evalset.path.name}"))
    return metrics
