"""Per-task statistics recomputed from per-sample logs, and the paired bootstrap over documents.

A task's reported number is rebuilt from the samples the runner wrote (`samples/TASK.jsonl`),
so the bootstrap resamples exactly what lmms-eval aggregated:
- "mean": the mean of a numeric per-sample metric (exact_match, VQA soft accuracy);
- "aggregate": lmms-eval's own aggregation function (e.g. `pope_aggregate_f1_score`,
  `mmstar_aggregate_results`) called on the resampled per-sample metric dicts, because F1 or
  a mean of per-category means is not a mean of per-sample scores;
- "mmbench": one hit per question from lmms-eval's `MMBench_Evaluator.eval_sub_data`
  (static option matching, circular variants of a question count as one unit, as in
  `eval_result`), then the mean.

The paired bootstrap draws document indices with replacement, uses the same indices for both
arms, and reports the percentile 95% interval of stat(b) - stat(a) (numpy's default linear
interpolation between order statistics). The point estimate is the difference on all documents.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from common.io import InputError

MMBENCH_CIRCULAR = int(1e6)  # lmms-eval's MMBench: index >= 1e6 marks a circular variant of index % 1e6


def load_samples(path: str | Path) -> list[dict]:
    """Read a samples JSONL written by the runner; one-line InputError on a bad line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or "doc_id" not in rec or not isinstance(rec.get("metrics"), dict):
            raise InputError(f"{path}:{i}: expected an object with 'doc_id' and 'metrics'")
        out.append(rec)
    return out


def import_dotted(path: str) -> Callable:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise InputError(f"aggregation {path!r} cannot be imported ({e})") from None


@contextlib.contextmanager
def _quiet():
    """lmms-eval aggregations print and log per call; a bootstrap calls them a thousand times."""
    from loguru import logger

    logger.disable("lmms_eval")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.enable("lmms_eval")


def _numeric(value, where: str) -> float:
    if isinstance(value, dict) and "score" in value:
        value = value["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: expected a numeric per-sample value, got {type(value).__name__}")
    return float(value)


def mmbench_hits(items: Sequence[dict]) -> list[float]:
    """Per-question hits of MMBench per-sample dicts (the `gpt_eval_score` values), static matching.

    Returns one hit per main question (index < 1e6), in the order the main questions appear.
    """
    import pandas as pd
    from lmms_eval.tasks.mmbench.en_utils import mmbench_evaluator

    frame = pd.DataFrame(list(items))
    frame["prediction"] = [str(x) for x in frame["prediction"]]
    frame = frame.rename(columns={k: k.lower() for k in frame.columns if k not in "ABCD"})
    answer_map = dict(zip(frame["index"], frame["answer"], strict=True))
    hits = []
    for idx in frame["index"]:
        if idx >= MMBENCH_CIRCULAR:
            continue
        group = frame[frame["index"] % MMBENCH_CIRCULAR == idx]
        hits.append(float(mmbench_evaluator.eval_sub_data(group, answer_map, static_only=True)))
    return hits


class TaskStatistic:
    """The reported number of one task as a function of resampled unit indices (in percent).

    `records` are runner sample records in a fixed order (the pairing order); `n` is the
    number of resampling units (documents, or main questions for MMBench).
    """

    def __init__(self, records: Sequence[dict], metric: str, statistic: str, aggregation: str | None, scale: float,
                 where: str = "samples"):
        self.scale = scale
        self._agg = None
        items = []
        for rec in records:
            if metric not in rec["metrics"]:
                raise InputError(f"{where}: doc {rec.get('doc_id')} has no per-sample metric {metric!r}")
            items.append(rec["metrics"][metric])
        if statistic == "mean":
            self._scores = np.array([_numeric(v, f"{where}: doc {r['doc_id']}") for v, r in zip(items, records, strict=True)])
        elif statistic == "mmbench":
            self._scores = np.array(mmbench_hits(items))
            self.scale = 100.0  # hits are 0/1; lmms-eval's MMBench aggregate is already the hit rate x 100
        elif statistic == "aggregate":
            if not aggregation:
                raise InputError(f"{where}: statistic 'aggregate' needs an aggregation function")
            self._agg = import_dotted(aggregation)
            self._items = items
        else:
            raise InputError(f"{where}: unknown statistic {statistic!r} (expected mean, aggregate or mmbench)")
        self.n = len(self._items) if self._agg is not None else len(self._scores)

    def __call__(self, idx: np.ndarray | None = None) -> float:
        if self._agg is None:
            scores = self._scores if idx is None else self._scores[idx]
            return float(scores.mean()) * self.scale if len(scores) else math.nan
        chosen = self._items if idx is None else [self._items[i] for i in idx]
        if not chosen:
            return math.nan
        with _quiet():
            return float(self._agg(chosen)) * self.scale


def paired_bootstrap_indices(stat_a: Callable, stat_b: Callable, resamples: Sequence[Sequence[int]], n: int) -> dict:
    """Delta and percentile 95% CI of stat_b - stat_a over the given resamples of unit indices."""
    deltas = np.array([stat_b(np.asarray(r)) - stat_a(np.asarray(r)) for r in resamples], dtype=float)
    full = np.arange(n)
    delta = stat_b(full) - stat_a(full)
    if len(deltas) == 0:
        return {"delta": float(delta), "ci_low": math.nan, "ci_high": math.nan, "n": n}
    low, high = np.percentile(deltas, [2.5, 97.5])
    return {"delta": float(delta), "ci_low": float(low), "ci_high": float(high), "n": n}


def paired_bootstrap_stat(stat_a: Callable, stat_b: Callable, n: int, n_resamples: int, seed: int) -> dict:
    """Paired bootstrap with `n_resamples` draws of n indices with replacement (numpy default_rng(seed))."""
    if n == 0:
        return {"delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    # Drawn one resample at a time: n can be 200k documents (VQAv2 val), R x n would not fit.
    resamples = (rng.integers(0, n, n) for _ in range(n_resamples))
    return paired_bootstrap_indices(stat_a, stat_b, resamples, n)


def paired_bootstrap(a_scores: Sequence[float], b_scores: Sequence[float], n_resamples: int = 1000,
                     seed: int = 0) -> dict:
    """Paired bootstrap of mean(b) - mean(a) over per-document scores (same documents, same order)."""
    a = np.asarray(a_scores, dtype=float)
    b = np.asarray(b_scores, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"paired bootstrap: arms must score the same documents (got {a.shape} and {b.shape})")
    return paired_bootstrap_stat(lambda i: float(a[i].mean()), lambda i: float(b[i].mean()), len(a), n_resamples, seed)
