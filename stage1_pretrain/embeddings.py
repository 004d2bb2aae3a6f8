"""Stage-1 embeddings of an eval set: L2-normalised image and text embeddings of a dual encoder (an
open_clip model), the zero-shot classifier (clip_benchmark's, CLIP prompt protocol) and the zero-shot
top-1 the training loop checks at every epoch end."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

from common.io import InputError

from .evalset import EvalSet, as_evalset, load_image
from .metrics import zero_shot_accuracy


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


def encode_images(model, preprocess, evalset: EvalSet, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """L2-normalised image embeddings [num images, D] (float32, CPU), one per unique image."""
    out, dtype = [], _param_dtype(model)
    with _eval_mode(model):
        for start in range(0, len(evalset.images), batch_size):
            paths = evalset.images[start : start + batch_size]
            lines = evalset.image_lines[start : start + batch_size]
            batch = torch.stack(
                [preprocess(load_image(p, f"{evalset.path}:{ln}")) for p, ln in zip(paths, lines, strict=True)]
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
    evalset = as_evalset(evalset, skip_bad)
    image_emb = encode_images(model, preprocess, evalset, batch_size, device)
    text_emb = encode_texts(model, tokenizer, evalset.captions, batch_size, device)
    return image_emb, text_emb


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
    evalset = as_evalset(evalset, skip_bad)
    labels = evalset.label_ids()
    classifier = build_zero_shot_classifier(model, tokenizer, evalset.classnames, evalset.templates, device)
    image_emb = encode_images(model, preprocess, evalset, batch_size, device)
    return zero_shot_accuracy(image_emb, labels, classifier)
