"""A/B report over arms (towers): verdict, benchmark table with blind floors, paired-bootstrap deltas
(vs the baseline arm, vs the untrained control arm, vs each arm's own blind run), each arm's vision tower
(source, family, parameters, image tokens), stage-1 metrics, curves.

Every number comes from the inputs: each arm's runner `results.json` and `samples/TASK.jsonl` (and
those of its grey-image run), its stage-1 `metrics.json` and its training JSONL logs; the report lists
them under "Sources". Deltas are recomputed from the per-sample logs (`eval_mllm.compare`), paired on
the documents both sides scored; the verdict paragraph is written from those deltas (`eval_mllm.verdict`).
Writes report.md, report.json and PNGs (matplotlib, Agg backend) into out_dir.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from common.io import InputError, atomic_write_json, atomic_write_text, json_finite, read_json

from .compare import Source, comparisons
from .plots import plot_curves, plot_deltas, read_curve
from .task_sets import TASK_SETS, info
from .verdict import count, verdict

STAGE1_ROWS = [
    ("zero_shot_top1", "zero-shot top-1"),
    ("linear_probe_top1", "linear probe top-1"),
    ("retrieval.image_to_text.R@1", "image→text R@1"),
    ("retrieval.text_to_image.R@1", "text→image R@1"),
    ("modality_gap.centroid_distance", "modality gap: centroid distance"),
    ("modality_gap.linear_separability", "modality gap: image-vs-text linear accuracy"),
]
ARM_KEYS = ("results_json", "samples_dir")
# Stage 1 logs the method's total too (ITO: alignment + lambda * fusion); curves across methods compare the shared term.
CURVE_KEYS = {"stage1": "contrastive_loss"}


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


def _check_arms(arms: dict, baseline: str | None, control: str | None) -> None:
    if not arms:
        raise InputError("report: no arms given")
    for name, spec in arms.items():
        for key in ARM_KEYS:
            if not spec.get(key):
                raise InputError(f"report: arm {name!r} has no {key!r}")
    for role, name in (("baseline", baseline), ("control", control)):
        if name and name not in arms:
            raise InputError(f"report: {role} {name!r} is not one of the arms ({', '.join(arms)})")


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
    """One figure per training log, every arm in it; stage 1 plots the alignment term all methods share."""
    by_log: dict[str, dict] = {}
    torn: dict = {}
    for arm, spec in arms.items():
        for log_name, path in (spec.get("train_logs") or {}).items():
            key = CURVE_KEYS.get(log_name, "loss")
            steps, values, bad = read_curve(Path(path), key)
            if steps:
                by_log.setdefault(log_name, {})[arm] = (steps, values)
            if bad:
                torn[f"{arm}/{log_name}"] = bad
    pngs = {}
    for log_name, curves in by_log.items():
        png = out_dir / f"curve_{log_name}.png"
        key = CURVE_KEYS.get(log_name, "loss")
        plot_curves(f"{log_name}: {key}", curves, png, ylabel=key)
        pngs[log_name] = png.name
    return pngs, torn


def _table_rows(report: dict, tasks: list[str]) -> list[str]:
    lines = []
    for arm in report["arms"]:
        skipped = report["skipped"].get(arm, {})
        for label, row in ((arm, report["table"][arm]), (f"{arm} (blind)", report["blind_table"].get(arm))):
            if row is not None:
                lines.append(f"| {label} | " + " | ".join("skipped" if t in skipped else _fmt(row.get(t)) for t in tasks)
                             + " |")
    return lines


def _delta_section(title: str, per_task: dict, tasks: list[str], headers: dict, ref) -> list[str]:
    """A table of paired deltas; `ref(arm)` names what each arm is compared with."""
    if not per_task:
        return []
    lines = ["", title, "", "| benchmark | arm | reference | reference value | arm value | Δ | 95% CI | n |",
             "|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for arm, d in per_task.get(task, {}).items():
            ci = f"[{_fmt(d.get('ci_low'))}, {_fmt(d.get('ci_high'))}]"
            lines.append(f"| {headers[task]} | {arm} | {ref(arm)} | {_fmt(d.get('value_a'))} | {_fmt(d.get('value_b'))} | "
                         f"{_fmt(d.get('delta'))} | {ci} | {d.get('n')} |")
    return lines


def _stage1_section(report: dict) -> list[str]:
    s1_arms = [a for a in report["arms"] if a in report["stage1"]]
    if not s1_arms:
        return []
    lines = ["", "## Stage-1 encoder metrics", "", "| metric | " + " | ".join(s1_arms) + " |",
             "|---|" + "---|" * len(s1_arms)]
    info_rows = [("method", "method"), ("augment", "augmentation policy"), ("steps", "training steps")]
    for key, label in info_rows:
        vals = [str(report["stage1_info"].get(a, {}).get(key, "—")) for a in s1_arms]
        if any(v != "—" for v in vals):
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
    for key, label in STAGE1_ROWS:
        if any(key in report["stage1"][a] for a in s1_arms):
            lines.append(f"| {label} | " + " | ".join(_fmt(report["stage1"][a].get(key), 4) for a in s1_arms) + " |")
    if report["umap"]:
        lines += ["", "UMAP of image (blue) and text (red) embeddings:", ""]
        lines += [f"- {arm}: ![{arm} UMAP]({path})" for arm, path in report["umap"].items()]
    return lines


def _towers_section(report: dict) -> list[str]:
    """Which tower each arm used, its size and image-token count (they confound a comparison across towers)."""
    towers = report.get("towers") or {}
    if not towers:
        return []
    lines = ["", "## Vision towers", "", "| arm | tower | family | parameters | input px | image tokens | feature layer | "
             "leading tokens kept |", "|---|---|---|---|---|---|---|---|"]
    for arm, t in towers.items():
        lines.append(f"| {arm} | `{t.get('spec', '—')}` | {t.get('family', '—')} | {count(t.get('params'))} | "
                     f"{t.get('image_size', '—')} | {t.get('image_tokens', '—')} | {t.get('feature_layer', '—')} | "
                     f"{t.get('leading_tokens_kept', '—')} |")
    return lines


def _markdown(report: dict, tasks: list[str], headers: dict) -> str:
    base, control = report["baseline"], report.get("control")
    lines = ["# A/B report: vision towers through LLaVA-1.5 and lmms-eval", "", "## Verdict", ""]
    lines += [p + "\n" for p in report["verdict"]]
    lines += ["## Benchmarks (paper Table 4 layout, percent; `(blind)`: every image replaced by a grey one)", ""]
    lines += ["| tower | " + " | ".join(headers[t] for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += _table_rows(report, tasks)
    lines += _towers_section(report)
    boot = f"paired bootstrap over test documents, {report['n_resamples']} resamples, 95% percentile CI"
    if control:
        lines += _delta_section(f"## Sensitivity: each arm vs the untrained `{control}` tower ({boot})",
                                report["vs_control"], tasks, headers, lambda arm: control)
    lines += _delta_section(f"## Image use: each arm vs its own blind score ({boot})", report["vs_blind"], tasks,
                            headers, lambda arm: f"{arm} (blind)")
    lines += _delta_section(f"## Deltas vs {base} ({boot})", report["deltas"], tasks, headers, lambda arm: base)
    if report.get("deltas_png"):
        lines += ["", f"![deltas]({report['deltas_png']})"]
    lines += _stage1_section(report)
    if report["curves"]:
        lines += ["", "## Training curves", ""] + [f"![{name}]({png})" for name, png in report["curves"].items()]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "## Sources", ""] + [f"- {k}: `{v}`" for k, v in report["sources"].items()]
    return "\n".join(lines) + "\n"


def _sources(arms: dict, out_dir: Path) -> tuple[dict[str, Source], dict[str, Source], dict[str, str]]:
    """The arms' and their blind runs' evaluations, and every input file relative to the report directory."""
    rel = {}

    def note(key: str, path) -> None:
        if path:
            rel[key] = os.path.relpath(Path(path).resolve(), out_dir.resolve())

    evals, blind = {}, {}
    for arm, spec in arms.items():
        evals[arm] = Source.load(arm, spec["results_json"], spec["samples_dir"])
        note(f"{arm}: benchmark results", spec["results_json"])
        if spec.get("blind_results_json"):
            blind[arm] = Source.load(f"{arm} (blind)", spec["blind_results_json"], spec["blind_samples_dir"])
            note(f"{arm}: blind (grey-image) results", spec["blind_results_json"])
        note(f"{arm}: stage-1 metrics", spec.get("stage1_metrics"))
        for log_name, path in (spec.get("train_logs") or {}).items():
            note(f"{arm}: {log_name} training log", path)
    return evals, blind, rel


def _compare_all(tasks, evals, blind, baseline, control, n_resamples, seed) -> dict:
    trained = [a for a in evals if a != control]
    return {
        "deltas": comparisons(tasks, [(a, evals[baseline], evals[a]) for a in evals if a != baseline], n_resamples, seed),
        "vs_control": comparisons(tasks, [(a, evals[control], evals[a]) for a in trained], n_resamples, seed)
        if control else {},
        "vs_blind": comparisons(tasks, [(a, blind[a], evals[a]) for a in evals if a in blind], n_resamples, seed),
    }


def _report_notes(arms_results, tasks, entries, torn, cmp, baseline) -> list[str]:
    notes = _notes(arms_results, tasks, entries)
    notes += [f"{k}: {n} unreadable log line(s) ignored" for k, n in torn.items()]
    notes += [f"{t}: no per-sample statistic known (not in eval_mllm.task_sets.TASK_INFO), no delta CI"
              for t in tasks if entries[t].get("value_pct") is not None and not entries[t].get("statistic")]
    for task, per_arm in cmp["deltas"].items():
        for arm, d in per_arm.items():
            if d["n_a"] != d["n_b"] or d["n_paired"] != d["n_a"]:
                notes.append(f"{task}: {baseline} has {d['n_a']} samples, {arm} {d['n_b']}; "
                             f"deltas use the {d['n_paired']} documents both scored")
    return notes


def write_report(arms: dict, out_dir, baseline: str | None = None, control: str | None = None, *,
                 n_resamples: int = 1000, seed: int = 0, seeds_note: str = "one seed per arm") -> dict:
    """Write report.md / report.json / PNGs for `arms` ({name: {"results_json", "samples_dir",
    "blind_results_json"?, "blind_samples_dir"?, "stage1_metrics"?, "stage1_info"?: {method, augment, steps},
    "umap_png"?, "train_logs"?: {log name: JSONL}, "tower"?: {spec, family, params, image_size, image_tokens, ...}}}). `baseline` (default: the first arm) is what the A/B deltas
    are taken against; `control` (optional) is the untrained-tower arm the sensitivity check uses.
    Returns the report.json content."""
    _check_arms(arms, baseline, control)
    baseline = baseline or next(iter(arms))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evals, blind, sources = _sources(arms, out_dir)
    arms_results = {arm: src.results for arm, src in evals.items()}
    tasks, entries = _benchmarks(arms_results)
    headers = _headers(tasks, entries)
    cmp = _compare_all(tasks, evals, blind, baseline, control, n_resamples, seed)
    stage1, umap = _stage1(arms, out_dir)
    curves, torn = _curves(arms, out_dir)
    report = {
        "arms": list(arms), "baseline": baseline, "control": control, "n_resamples": n_resamples, "seed": seed,
        "seeds_note": seeds_note, "benchmarks": tasks, "columns": headers,
        "metrics": {t: entries[t].get("metric") for t in tasks},
        "table": {arm: {t: e.get("value_pct") for t, e in res.get("tasks", {}).items()} for arm, res in arms_results.items()},
        "blind_table": {arm: {t: e.get("value_pct") for t, e in src.results.get("tasks", {}).items()}
                        for arm, src in blind.items()},
        **cmp,
        "all_metrics": {arm: {t: e.get("metrics", {}) for t, e in res.get("tasks", {}).items()}
                        for arm, res in arms_results.items()},
        "stage1": stage1, "stage1_info": {a: s.get("stage1_info") or {} for a, s in arms.items()}, "umap": umap,
        "towers": {a: s["tower"] for a, s in arms.items() if s.get("tower")},
        "curves": curves, "notes": _report_notes(arms_results, tasks, entries, torn, cmp, baseline),
        "skipped": {arm: res.get("skipped", {}) for arm, res in arms_results.items()}, "sources": sources,
    }
    report["verdict"] = verdict(report)
    rows = [(f"{headers[t]} · {a}", d) for t in tasks for a, d in cmp["deltas"].get(t, {}).items()
            if d.get("ci_low") is not None and math.isfinite(d["ci_low"])]
    if rows:
        plot_deltas(rows, f"Δ vs {baseline} (points, 95% paired-bootstrap CI)", out_dir / "deltas.png")
        report["deltas_png"] = "deltas.png"
    atomic_write_json(out_dir / "report.json", json_finite(report))
    atomic_write_text(out_dir / "report.md", _markdown(report, tasks, headers))
    return report
