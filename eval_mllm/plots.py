"""Report pictures (matplotlib, Agg backend): training curves per arm and delta intervals."""

from __future__ import annotations

import math
from pathlib import Path

from common.io import InputError
from common.metrics_log import read_jsonl_counted


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_curve(path: Path, key: str = "loss") -> tuple[list[float], list[float], int]:
    """(steps, values, unreadable lines) of `key` in a training JSONL log."""
    if not path.is_file():
        raise InputError(f"{path}: training log not found")
    records, torn = read_jsonl_counted(path)  # torn lines: a kill mid-write; the logger drops them on resume too
    steps, values = [], []
    for rec in records:
        v, s = rec.get(key), rec.get("step")
        if isinstance(v, (int, float)) and isinstance(s, (int, float)) and math.isfinite(v):
            steps.append(float(s))
            values.append(float(v))
    return steps, values, torn


def plot_curves(name: str, curves: dict, out: Path, ylabel: str = "loss") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, (steps, values) in curves.items():
        ax.plot(steps, values, label=arm, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_deltas(rows: list[tuple[str, dict]], xlabel: str, out: Path) -> None:
    """One point with its 95% interval per (label, delta dict) row."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2))
    for i, (_label, d) in enumerate(rows):
        ax.errorbar([d["delta"]], [i], xerr=[[d["delta"] - d["ci_low"]], [d["ci_high"] - d["delta"]]], fmt="o",
                    color="tab:blue", capsize=3)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
