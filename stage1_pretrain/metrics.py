"""Pure stage-1 evaluation metrics on precomputed, L2-normalised embeddings (torch tensors in, floats out).

Zero-shot top-1 and retrieval R@k reuse clip_benchmark's own functions (`accuracy`,
`recall_at_k`, `batchify`) so the numbers follow the protocol of published CLIP tables.
The linear probe and the modality-gap measures use scikit-learn's LogisticRegression:
clip_benchmark's linear probe trains a torch head on CUDA only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from clip_benchmark.metrics.zeroshot_classification import accuracy
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# recall_at_k builds a rows*k*N int64 one-hot tensor; bound it to about this many elements per call.
RETRIEVAL_CHUNK_ELEMENTS = 20_000_000


def zero_shot_accuracy(image_emb: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> float:
    """Top-1 accuracy of `image_emb` [N, D] against a zero-shot `classifier` [D, C] (class embeddings as columns)."""
    if len(labels) == 0:
        raise ValueError("zero_shot_accuracy: no labelled images")
    logits = image_emb.float() @ classifier.float().to(image_emb.device)
    (top1,) = accuracy(logits, labels.to(logits.device), topk=(1,))
    return float(top1)


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    text_to_image: torch.Tensor | Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """Image->text and text->image recall@k as in CLIP papers (a hit if any positive is in the top k).

    `text_to_image[t]` is the index of the image that caption t describes; by default the
    t-th caption belongs to the t-th image. k larger than the candidate count is clamped
    (every candidate is then retrieved, so R@k = 1).
    """
    n_img, n_txt = len(image_emb), len(text_emb)
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError(f"retrieval_recall: {n_img} images and {n_txt} captions need a text_to_image mapping")
        text_to_image = torch.arange(n_txt)
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    if len(text_to_image) != n_txt:
        raise ValueError(f"retrieval_recall: text_to_image has {len(text_to_image)} entries for {n_txt} captions")
    scores = text_emb.float().cpu() @ image_emb.float().cpu().T  # [texts, images]
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(n_txt), text_to_image] = True
    if not bool(positives.any(dim=0).all()):
        raise ValueError("retrieval_recall: some image has no caption")
    out: dict[str, dict[str, float]] = {"image_to_text": {}, "text_to_image": {}}
    for k in ks:
        t2i = batchify(recall_at_k, scores, positives, _rows(k, n_img), "cpu", k=min(k, n_img))
        i2t = batchify(recall_at_k, scores.T, positives.T, _rows(k, n_txt), "cpu", k=min(k, n_txt))
        out["text_to_image"][f"R@{k}"] = float((t2i > 0).double().mean())
        out["image_to_text"][f"R@{k}"] = float((i2t > 0).double().mean())
    return out


def _rows(k: int, n_candidates: int) -> int:
    return max(1, RETRIEVAL_CHUNK_ELEMENTS // (min(k, n_candidates) * n_candidates))


def stratified_split(labels: Sequence, train_fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed per-class split: ceil(fraction * n_c) samples of each class train, the rest test.

    Unlike sklearn's stratified splitters this accepts classes with a single sample (it
    goes to the training half, so the probe never meets a class it could not learn).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(np.ceil(train_fraction * len(idx)))
        train.extend(idx[:n_train])
        test.extend(idx[n_train:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def linear_probe(train_feats, train_labels, test_feats, test_labels, *, C: float = 1.0, seed: int = 0) -> float | None:
    """Top-1 accuracy of a logistic-regression probe trained on frozen features; None without test samples.

    Features are standardised first so one regularisation strength C suits any embedding scale.
    """
    x_tr, y_tr, x_te, y_te = map(_numpy, (train_feats, train_labels, test_feats, test_labels))
    if len(y_te) == 0:
        return None
    classes = np.unique(y_tr)
    if len(classes) < 2:  # LogisticRegression refuses one class; the best probe then predicts it
        return float(np.mean(y_te == classes[0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
    probe.fit(x_tr, y_tr)
    return float(np.mean(probe.predict(x_te) == y_te))


def linear_probe_adamw(train_feats, train_labels, test_feats, test_labels, *, epochs: int = 30, lr: float = 0.1,
                       weight_decay: float = 0.0, batch_size: int = 256, seed: int = 0) -> float | None:
    """Top-1 accuracy of a linear classifier trained on frozen features with AdamW and a cosine schedule.

    The paper's protocol ("a linear classifier on frozen visual features for 30 epochs using AdamW with a
    cosine learning-rate schedule"), with clip_benchmark's linear-probe defaults (lr 0.1, no weight
    decay, no warm-up). None without test samples. Deterministic for a seed.
    """
    x_tr, x_te = (torch.as_tensor(_numpy(x), dtype=torch.float32) for x in (train_feats, test_feats))
    y_tr, y_te = (torch.as_tensor(_numpy(y), dtype=torch.long) for y in (train_labels, test_labels))
    if len(y_te) == 0:
        return None
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(x_tr.shape[1], int(max(y_tr.max(), y_te.max())) + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(y_tr) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        for idx in torch.randperm(len(y_tr), generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(head(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float((head(x_te).argmax(1) == y_te).float().mean())


def modality_gap(image_emb: torch.Tensor, text_emb: torch.Tensor, *, seed: int = 0) -> dict[str, float | None]:
    """Modality-gap measures (Liang et al. 2022, "Mind the Gap").

    centroid_distance: ||mean(image_emb) - mean(text_emb)||.
    linear_separability: held-out accuracy of a logistic regression telling image from text
    embeddings, averaged over the two halves of a stratified 2-fold split (None when a
    modality has fewer than 2 embeddings). 0.5 means the modalities overlap, 1.0 a clean gap.
    """
    img, txt = _numpy(image_emb), _numpy(text_emb)
    gap = float(np.linalg.norm(img.mean(axis=0) - txt.mean(axis=0)))
    if min(len(img), len(txt)) < 2:
        return {"centroid_distance": gap, "linear_separability": None}
    x = np.concatenate([img, txt])
    y = np.concatenate([np.zeros(len(img), dtype=np.int64), np.ones(len(txt), dtype=np.int64)])
    cv = StratifiedKFold(n_splits=2, shuffle=True, random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    acc = cross_val_score(clf, x, y, cv=cv, scoring="accuracy")
    return {"centroid_distance": gap, "linear_separability": float(acc.mean())}
