"""A/B report over arms (towers): benchmark table, paired-bootstrap deltas, stage-1 metrics, curves.

Every number comes from the inputs: each arm's runner `results.json` and `samples/TASK.jsonl`,
its stage-1 `metrics.json` and its training JSONL logs. Deltas are recomputed from the
per-sample logs (see `eval_mllm.bootstrap`), paired on the documents both arms scored.
Writes report.md, report.json and PNGs (matplotlib, Agg backend) into out_dir.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pipeline.io import InputError, atomic_write_json, atomic_write_text, read_json

from .bootstrap import TaskStatistic, json_finite, load_samples, paired_bootstrap_stat
from .task_sets import TASK_SETS, info

STAGE1_ROWS = [
    ("zero_shot_top1", "zero-shot top-1"),
    ("linear_probe_top1", "linear probe top-1"),
    ("retrieval.image_to_text.R@1", "image→text R@1"),
    ("retrieval.text_to_image.R@1", "text→image R@1"),
    ("modality_gap.centroid_distance", "modality gap: centroid distance"),
    ("modality_gap.linear_separability", "modality gap: image-vs-text linear accuracy"),
]
ARM_KEYS = ("results_json", "samples_dir")


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def _flatten(obj, prefix: str = "") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix[:-1]] = float(obj)
    return out


def _check_arms(arms: dict) -> None:
    if not arms:
        raise InputError("report: no arms given")
    for name, spec in arms.items():
        for key in ARM_KEYS:
            if not spec.get(key):
                raise InputError(f"report: arm {name!r} has no {key!r}")


def _column_order(tasks: list[str], entries: dict) -> list[str]:
    """Paper Table 4 order first (by paper column), then everything else as first seen."""
    paper_cols = [info(t).column for t in TASK_SETS["paper13"]]
    col = {t: entries[t].get("column") or t for t in tasks}
    ranked = sorted(tasks, key=lambda t: (paper_cols.index(col[t]) if col[t] in paper_cols else len(paper_cols),
                                          tasks.index(t)))
    return ranked


def _headers(tasks: list[str], entries: dict) -> dict:
    """Paper column names; a column two tasks share (pope_random and demo_pope_random) gets the task name."""
    cols = {t: entries[t].get("column") or t for t in tasks}
    counts = {c: list(cols.values()).count(c) for c in cols.values()}
    return {t: (c if counts[c] == 1 else f"{c} ({t})") for t, c in cols.items()}


def _paired(records_a: list[dict], records_b: list[dict]) -> tuple[list[dict], list[dict], int, int]:
    by_a = {r["doc_id"]: r for r in records_a}
    by_b = {r["doc_id"]: r for r in records_b}
    common = sorted(set(by_a) & set(by_b), key=lambda d: (str(type(d)), d))
    return [by_a[d] for d in common], [by_b[d] for d in common], len(by_a), len(by_b)


def _delta(task: str, entry_a: dict, entry_b: dict, dir_a: Path, dir_b: Path, n_resamples: int, seed: int) -> dict:
    rec_a, rec_b, n_a, n_b = _paired(load_samples(dir_a / f"{task}.jsonl"), load_samples(dir_b / f"{task}.jsonl"))
    metric, statistic, agg = entry_a["metric"], entry_a["statistic"], entry_a.get("aggregation")
    if (entry_b["metric"], entry_b["statistic"]) != (metric, statistic):
        raise InputError(f"report: {task}: arms report different metrics ({metric} vs {entry_b['metric']})")
    out = {"n_a": n_a, "n_b": n_b, "n_paired": len(rec_a)}
    if not rec_a:
        return {**out, "delta": None, "ci_low": None, "ci_high": None, "n": 0}
    stat_a = TaskStatistic(rec_a, metric, statistic, agg, entry_a["scale"], where=f"{dir_a}/{task}.jsonl")
    stat_b = TaskStatistic(rec_b, metric, statistic, agg, entry_b["scale"], where=f"{dir_b}/{task}.jsonl")
    boot = paired_bootstrap_stat(stat_a, stat_b, stat_a.n, n_resamples, seed)
    return {**out, **boot, "value_a": stat_a(), "value_b": stat_b()}


def _read_jsonl_curve(path: Path, key: str = "loss") -> tuple[list[float], list[float], int]:
    steps, values, bad = [], [], 0
    if not path.is_file():
        raise InputError(f"{path}: training log not found")
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # a line torn by a kill; the logger drops such lines on resume too
            continue
        v, s = rec.get(key), rec.get("step")
        if isinstance(v, (int, float)) and isinstance(s, (int, float)) and math.isfinite(v):
            steps.append(float(s))
            values.append(float(v))
    return steps, values, bad


def _plot_curves(name: str, curves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, (steps, values) in curves.items():
        ax.plot(steps, values, label=arm, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss: {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot_deltas(rows: list[tuple[str, str, dict]], baseline: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2))
    for i, (_label, _arm, d) in enumerate(rows):
        ax.errorbar([d["delta"]], [i], xerr=[[d["delta"] - d["ci_low"]], [d["ci_high"] - d["delta"]]], fmt="o",
                    color="tab:blue", capsize=3)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ vs {baseline} (points, 95% paired-bootstrap CI)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _run_as_note(task: str, entry: dict) -> str:
    reason = entry.get("run_as_reason") or "rule-based scoring"
    return f"{task} ran as {entry['lmms_eval_task']}: {reason}"


def _notes(arms_results: dict, tasks: list[str], entries: dict) -> list[str]:
    notes = []
    for arm, res in arms_results.items():
        for task, reason in sorted(res.get("skipped", {}).items()):
            notes.append(f"{arm}: {task} skipped: {reason}")
        if res.get("limit") is not None:
            notes.append(f"{arm}: at most {res['limit']} samples per task (limit); numbers are not comparable "
                         "to full benchmark runs")
    for task in tasks:
        e = entries[task]
        if e.get("lmms_eval_task") and e["lmms_eval_task"] != task:
            notes.append(_run_as_note(task, e))
        if e.get("judge"):
            notes.append(f"{task} is scored by a GPT judge: its number depends on the judge model and API")
        if e.get("submission_only"):
            notes.append(f"{task} is a test split scored by an external server: only a submission file was written")
    return notes


def _load_arms(arms: dict) -> dict:
    return {name: read_json(spec["results_json"]) for name, spec in arms.items()}


def _benchmarks(arms_results: dict) -> tuple[list[str], dict]:
    """Tasks with results, plus skipped paper13 tasks (their Table-4 column stays, marked skipped)."""
    tasks: list[str] = []
    entries: dict = {}
    for res in arms_results.values():
        for task, entry in res.get("tasks", {}).items():
            if task not in entries:
                tasks.append(task)
                entries[task] = entry
    for res in arms_results.values():
        for task in res.get("skipped", {}):
            if task not in entries and task in TASK_SETS["paper13"]:
                tasks.append(task)
                entries[task] = {"column": info(task).column, "skipped": True}
    return _column_order(tasks, entries), entries


def _cell(res: dict, task: str) -> str:
    if task in res.get("skipped", {}):
        return "skipped"
    return _fmt((res.get("tasks", {}).get(task) or {}).get("value_pct"))


def results_table(res: dict) -> str:
    """One run's results.json as the paper's Table-4 row (percent), skipped tasks marked, then why."""
    tasks, entries = _benchmarks({"run": res})
    headers = _headers(tasks, entries)
    lines = ["| model | " + " | ".join(headers[t] for t in tasks) + " |", "|---|" + "---|" * len(tasks),
             f"| {Path(res.get('model_dir', 'model')).name} | " + " | ".join(_cell(res, t) for t in tasks) + " |", ""]
    notes = [f"{t} skipped: {why}" for t, why in res.get("skipped", {}).items()]
    notes += [_run_as_note(t, e) for t, e in res.get("tasks", {}).items() if e.get("lmms_eval_task", t) != t]
    if "textvqa_val" in res.get("tasks_requested", []) and not res.get("textvqa_ocr", True):
        notes.append("textvqa_val ran without OCR tokens (eval.textvqa_ocr=false, lmms-eval's default prompt); the "
                     "default, true, is LLaVA-1.5's OCR-token prompt")
    if res.get("limit") is not None:
        notes.append(f"at most {res['limit']} samples per task (limit)")
    return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


def _stage1(arms: dict, out_dir: Path) -> tuple[dict, dict]:
    values, umaps = {}, {}
    for arm, spec in arms.items():
        if spec.get("stage1_metrics"):
            values[arm] = _flatten(read_json(spec["stage1_metrics"]))
        if spec.get("umap_png"):
            if not Path(spec["umap_png"]).is_file():
                raise InputError(f"report: arm {arm!r}: umap_png {spec['umap_png']} not found")
            umaps[arm] = os.path.relpath(Path(spec["umap_png"]).resolve(), out_dir.resolve())
    return values, umaps


def _curves(arms: dict, out_dir: Path) -> tuple[dict, dict]:
    by_log: dict[str, dict] = {}
    torn: dict = {}
    for arm, spec in arms.items():
        for log_name, path in (spec.get("train_logs") or {}).items():
            steps, values, bad = _read_jsonl_curve(Path(path))
            by_log.setdefault(log_name, {})[arm] = (steps, values)
            if bad:
                torn[f"{arm}/{log_name}"] = bad
    pngs = {}
    for log_name, curves in by_log.items():
        png = out_dir / f"curve_{log_name}.png"
        _plot_curves(log_name, curves, png)
        pngs[log_name] = png.name
    return pngs, torn


def _markdown(report: dict, tasks: list[str], headers: dict) -> str:
    arms, base = report["arms"], report["baseline"]
    lines = ["# A/B report: vision towers through LLaVA-1.5 and lmms-eval", ""]
    lines += ["## Benchmarks (paper Table 4 layout, percent)", ""]
    lines += ["| tower | " + " | ".join(headers[t] for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for arm in arms:
        row, skipped = report["table"][arm], report["skipped"].get(arm, {})
        lines.append(f"| {arm} | " + " | ".join("skipped" if t in skipped else _fmt(row.get(t)) for t in tasks) + " |")
    lines += ["", f"## Deltas vs {base} (paired bootstrap, {report['n_resamples']} resamples, 95% percentile CI)", ""]
    lines += ["| benchmark | arm | " + base + " | arm value | Δ (points) | 95% CI | n |", "|---|---|---|---|---|---|---|"]
    for task in tasks:
        for arm, d in report["deltas"].get(task, {}).items():
            ci = f"[{_fmt(d.get('ci_low'))}, {_fmt(d.get('ci_high'))}]"
            lines.append(f"| {headers[task]} | {arm} | {_fmt(d.get('value_a'))} | {_fmt(d.get('value_b'))} | "
                         f"{_fmt(d.get('delta'))} | {ci} | {d.get('n')} |")
    if report.get("deltas_png"):
        lines += ["", f"![deltas]({report['deltas_png']})"]
    if report["stage1"]:
        s1_arms = [a for a in arms if a in report["stage1"]]
        lines += ["", "## Stage-1 encoder metrics", "", "| metric | " + " | ".join(s1_arms) + " |",
                  "|---|" + "---|" * len(s1_arms)]
        for key, label in STAGE1_ROWS:
            if any(key in report["stage1"][a] for a in s1_arms):
                lines.append(f"| {label} | " + " | ".join(_fmt(report["stage1"][a].get(key), 4) for a in s1_arms) + " |")
    if report["umap"]:
        lines += ["", "UMAP of image (blue) and text (red) embeddings:", ""]
        lines += [f"- {arm}: ![{arm} UMAP]({path})" for arm, path in report["umap"].items()]
    if report["curves"]:
        lines += ["", "## Training curves", ""]
        lines += [f"![{name}]({png})" for name, png in report["curves"].items()]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def write_report(arms: dict, out_dir, baseline: str | None = None, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Write report.md / report.json / PNGs for `arms` ({name: {"results_json", "samples_dir",
    "stage1_metrics"?, "umap_png"?, "train_logs"?: {log name: JSONL}}}); baseline defaults to the first arm.
    Returns the report.json content."""
    _check_arms(arms)
    baseline = baseline or next(iter(arms))
    if baseline not in arms:
        raise InputError(f"report: baseline {baseline!r} is not one of the arms ({', '.join(arms)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms_results = _load_arms(arms)
    tasks, entries = _benchmarks(arms_results)
    headers = _headers(tasks, entries)
    table = {arm: {t: e.get("value_pct") for t, e in res.get("tasks", {}).items()} for arm, res in arms_results.items()}
    deltas: dict = {}
    rows = []
    no_stat: set[str] = set()
    for task in tasks:
        base_entry = arms_results[baseline].get("tasks", {}).get(task)
        for arm, res in arms_results.items():
            entry = res.get("tasks", {}).get(task)
            if arm == baseline or not base_entry or not entry or base_entry.get("value_pct") is None \
                    or entry.get("value_pct") is None:
                continue
            if not base_entry.get("statistic"):
                no_stat.add(task)
                continue
            d = _delta(task, base_entry, entry, Path(arms[baseline]["samples_dir"]), Path(arms[arm]["samples_dir"]),
                       n_resamples, seed)
            deltas.setdefault(task, {})[arm] = d
            if d.get("ci_low") is not None and math.isfinite(d["ci_low"]):
                rows.append((f"{headers[task]} · {arm}", arm, d))
    stage1, umap = _stage1(arms, out_dir)
    curves, torn = _curves(arms, out_dir)
    notes = _notes(arms_results, tasks, entries)
    notes += [f"{k}: {n} unreadable log line(s) ignored" for k, n in torn.items()]
    notes += [f"{t}: no per-sample statistic known (not in eval_mllm.task_sets.TASK_INFO), no delta CI"
              for t in sorted(no_stat)]
    for task, per_arm in deltas.items():
        for arm, d in per_arm.items():
            if d["n_a"] != d["n_b"] or d["n_paired"] != d["n_a"]:
                notes.append(f"{task}: {baseline} has {d['n_a']} samples, {arm} {d['n_b']}; "
                             f"deltas use the {d['n_paired']} documents both scored")
    report = {
        "arms": list(arms), "baseline": baseline, "n_resamples": n_resamples, "seed": seed,
        "benchmarks": tasks, "columns": headers, "metrics": {t: entries[t].get("metric") for t in tasks},
        "table": table, "deltas": deltas,
        "all_metrics": {arm: {t: e.get("metrics", {}) for t, e in res.get("tasks", {}).items()}
                        for arm, res in arms_results.items()}, "stage1": stage1, "umap": umap, "curves": curves, "notes": notes,
        "skipped": {arm: res.get("skipped", {}) for arm, res in arms_results.items()},
    }
    if rows:
        _plot_deltas(rows, baseline, out_dir / "deltas.png")
        report["deltas_png"] = "deltas.png"
    atomic_write_json(out_dir / "report.json", json_finite(report))
    atomic_write_text(out_dir / "report.md", _markdown(report, tasks, headers))
    return report

