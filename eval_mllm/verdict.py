"""The report's opening paragraph, written from its numbers (never by hand).

Four questions, in the order a reviewer asks them: is the instrument sensitive (trained towers vs
the untrained control tower), do the models look at the image (each arm vs its own grey-image
score), which deltas of the A/B exclude 0 and by how much, and what stage 1 and the blind floors
were. A claim is made only where a 95% paired-bootstrap interval lies entirely on one side of 0.
"""

from __future__ import annotations

from .compare import excludes_zero


def _pts(d: dict) -> str:
    return f"{d['delta']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"


def _where(per_task: dict[str, dict[str, dict]], arm: str, headers: dict, sign: int) -> list[str]:
    return [f"{headers[t]} {_pts(d[arm])}" for t, d in per_task.items() if arm in d and excludes_zero(d[arm]) == sign]


def _n_compared(per_task: dict, arm: str) -> int:
    return sum(arm in d for d in per_task.values())


def sensitivity(report: dict) -> str | None:
    control, headers = report.get("control"), report["columns"]
    if not control or not report["vs_control"]:
        return None
    parts, any_up = [], False
    for arm in report["arms"]:
        if arm == control:
            continue
        up = _where(report["vs_control"], arm, headers, +1)
        any_up |= bool(up)
        parts.append(f"{arm} on {len(up)} of {_n_compared(report['vs_control'], arm)}"
                     + (f" ({'; '.join(up)})" if up else ""))
    head = (f"**Sensitive.** The trained towers beat the untrained `{control}` tower (same architecture, its init seed, "
            "the same stage 2) with 95% CIs above 0: ") if any_up else (
        f"**Not sensitive.** No trained tower beats the untrained `{control}` tower with a CI above 0 on any benchmark, so "
        "no benchmark difference below can be attributed to the towers: ")
    return head + ", ".join(parts) + "."


def looks_at_images(report: dict) -> str | None:
    if not report["vs_blind"]:
        return None
    headers, parts = report["columns"], []
    for arm in report["arms"]:
        n = _n_compared(report["vs_blind"], arm)
        if not n:
            continue
        below = [headers[t] for t, d in report["vs_blind"].items() if arm in d and excludes_zero(d[arm]) != +1]
        text = f"{arm} on {n - len(below)} of {n}"
        parts.append(text + (f" (not on {', '.join(below)})" if below and len(below) < n else ""))
    return ("**Image use.** Benchmarks on which an arm beats its own blind score (every image replaced by a grey one, "
            "same model and task code; CI above 0): " + "; ".join(parts) + ". Where an arm does not, its answers "
            "come from language priors.")


def ab_deltas(report: dict) -> list[str]:
    base, headers, out = report["baseline"], report["columns"], []
    for arm in report["arms"]:
        if arm in (base, report.get("control")):
            continue
        n = _n_compared(report["deltas"], arm)
        up, down = _where(report["deltas"], arm, headers, +1), _where(report["deltas"], arm, headers, -1)
        text = f"**{arm} vs {base}.** "
        text += f"Higher on {'; '.join(up)}. " if up else ""
        text += f"Lower on {'; '.join(down)}. " if down else ""
        rest = n - len(up) - len(down)
        text += (f"Not distinguishable from 0 on {'the other ' if up or down else ''}{rest} of {n} benchmarks "
                 "(95% CI holds 0).") if rest else ""
        out.append(text.strip())
    if out:
        out.append(f"These intervals resample test documents of one training run per arm ({report.get('seeds_note')}); "
                   "they do not include the variance between training seeds.")
    return out


def stage1_line(report: dict) -> str | None:
    s1 = report.get("stage1") or {}
    if not s1:
        return None
    keys = (("zero_shot_top1", "zero-shot top-1"), ("retrieval.text_to_image.R@1", "text→image R@1"),
            ("linear_probe_top1", "linear probe"))
    parts = []
    for key, label in keys:
        vals = [f"{arm} {100 * s1[arm][key]:.1f}%" for arm in report["arms"] if key in s1.get(arm, {})]
        if vals:
            parts.append(f"{label}: " + ", ".join(vals))
    chance = next((v["zero_shot_chance"] for v in s1.values() if "zero_shot_chance" in v), None)
    tail = f" (zero-shot chance {100 * chance:.1f}%)" if chance else ""
    augments = {arm: info.get("augment") for arm, info in (report.get("stage1_info") or {}).items() if info.get("augment")}
    policy = ""
    if augments:
        names = set(augments.values())
        policy = (f" Every arm pretrained with the `{names.pop()}` augmentation policy." if len(names) == 1 else
                  " Augmentation policies differ between arms (" + ", ".join(f"{a}: `{p}`" for a, p in augments.items())
                  + "): the A/B mixes two changes.")
    return "**Stage 1.** " + "; ".join(parts) + tail + "." + policy


def count(n) -> str:
    """A parameter count as 86.2M / 1.3B / 67.2k."""
    if not isinstance(n, (int, float)):
        return "—"
    return next((f"{n / d:.1f}{u}" for u, d in (("B", 1e9), ("M", 1e6), ("k", 1e3)) if n >= d), str(int(n)))


def towers_line(report: dict) -> str | None:
    """Arms on towers of different size or image-token count compare more than their pretraining."""
    towers = report.get("towers") or {}
    differ = [key for key in ("family", "params", "image_tokens") if len({str(t.get(key)) for t in towers.values()}) > 1]
    if len(towers) < 2 or not differ:
        return None
    parts = [f"{arm}: {t.get('family')}, {count(t.get('params'))} parameters, {t.get('image_tokens')} image tokens"
             for arm, t in towers.items()]
    return ("**Towers differ** (" + ", ".join(differ).replace("params", "parameters").replace("_", " ") + "): "
            + "; ".join(parts) + ". Deltas between these arms mix the towers' size and token budget with their "
            "pretraining.")


def blind_floors(report: dict) -> str | None:
    table, headers = report.get("blind_table") or {}, report["columns"]
    cells = []
    for task in report["benchmarks"]:
        vals = [row[task] for row in table.values() if row.get(task) is not None]
        if vals:
            lo, hi = min(vals), max(vals)
            cells.append(f"{headers[task]} {lo:.1f}" if abs(hi - lo) < 0.05 else f"{headers[task]} {lo:.1f}–{hi:.1f}")
    return ("**Blind floors** (grey images, range over arms): " + ", ".join(cells) + ".") if cells else None


def verdict(report: dict) -> list[str]:
    """The verdict paragraphs, each a sentence group computed from `report` (see write_report's report.json)."""
    lines = [sensitivity(report), looks_at_images(report), *ab_deltas(report), towers_line(report),
             stage1_line(report), blind_floors(report)]
    return [line for line in lines if line]
