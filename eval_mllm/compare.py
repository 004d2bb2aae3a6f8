"""Paired comparisons between evaluated models: an arm vs the baseline, vs the untrained control, vs its blind run.

A `Source` is one evaluation (a runner `results.json` plus its `samples/` folder): an arm, or the same
arm scored with grey images (`eval_mllm.blind`). `paired_delta` recomputes a task's statistic from the
per-sample logs of two sources on the documents both scored and bootstraps the difference (see
`eval_mllm.bootstrap`): b minus a, in the task's reported unit (percent points, or MMBench hit rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from common.io import InputError, read_json

from .bootstrap import TaskStatistic, load_samples, paired_bootstrap_stat


@dataclass(frozen=True)
class Source:
    label: str
    results: dict
    samples_dir: Path
    results_json: Path

    @classmethod
    def load(cls, label: str, results_json, samples_dir) -> Source:
        return cls(label, read_json(results_json), Path(samples_dir), Path(results_json))

    def entry(self, task: str) -> dict | None:
        e = self.results.get("tasks", {}).get(task)
        return e if e and e.get("value_pct") is not None else None


def _paired(records_a: list[dict], records_b: list[dict]) -> tuple[list[dict], list[dict], int, int]:
    by_a = {r["doc_id"]: r for r in records_a}
    by_b = {r["doc_id"]: r for r in records_b}
    common = sorted(set(by_a) & set(by_b), key=lambda d: (str(type(d)), d))
    return [by_a[d] for d in common], [by_b[d] for d in common], len(by_a), len(by_b)


def paired_delta(task: str, a: Source, b: Source, n_resamples: int, seed: int) -> dict | None:
    """{delta, ci_low, ci_high, n, value_a, value_b, n_a, n_b, n_paired} of task for b - a; None if not comparable.

    Not comparable: either source has no value for the task, or the task has no per-sample statistic.
    """
    entry_a, entry_b = a.entry(task), b.entry(task)
    if entry_a is None or entry_b is None or not entry_a.get("statistic"):
        return None
    metric, statistic, agg = entry_a["metric"], entry_a["statistic"], entry_a.get("aggregation")
    if (entry_b["metric"], entry_b["statistic"]) != (metric, statistic):
        raise InputError(f"report: {task}: {a.label} and {b.label} report different metrics "
                         f"({metric} vs {entry_b['metric']})")
    rec_a, rec_b, n_a, n_b = _paired(load_samples(a.samples_dir / f"{task}.jsonl"),
                                     load_samples(b.samples_dir / f"{task}.jsonl"))
    out = {"n_a": n_a, "n_b": n_b, "n_paired": len(rec_a)}
    if not rec_a:
        return {**out, "delta": None, "ci_low": None, "ci_high": None, "n": 0}
    stat_a = TaskStatistic(rec_a, metric, statistic, agg, entry_a["scale"], where=f"{a.samples_dir}/{task}.jsonl")
    stat_b = TaskStatistic(rec_b, metric, statistic, agg, entry_b["scale"], where=f"{b.samples_dir}/{task}.jsonl")
    boot = paired_bootstrap_stat(stat_a, stat_b, stat_a.n, n_resamples, seed)
    return {**out, **boot, "value_a": stat_a(), "value_b": stat_b()}


def excludes_zero(d: dict | None) -> int:
    """+1 / -1 when the 95% CI of `d` lies above / below 0, 0 when it holds 0 (or is missing)."""
    if not d or d.get("ci_low") is None or d.get("ci_high") is None:
        return 0
    low, high = d["ci_low"], d["ci_high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return 0
    return 1 if low > 0 else -1 if high < 0 else 0


def comparisons(tasks: list[str], pairs: list[tuple[str, Source, Source]], n_resamples: int,
                seed: int) -> dict[str, dict[str, dict]]:
    """{task: {name: paired_delta}} for every (name, a, b) in `pairs` that is comparable on the task."""
    out: dict[str, dict[str, dict]] = {}
    for task in tasks:
        for name, a, b in pairs:
            d = paired_delta(task, a, b, n_resamples, seed)
            if d is not None:
                out.setdefault(task, {})[name] = d
    return out
