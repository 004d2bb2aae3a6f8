"""Paired bootstrap arithmetic (hand-checked), per-task statistics recomputed through lmms-eval's
aggregations, and report generation (md/json/png) from fixed per-sample logs of two arms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.io import InputError
from eval_mllm.bootstrap import TaskStatistic, load_samples, paired_bootstrap, paired_bootstrap_indices
from eval_mllm.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mean(x):
    x = np.asarray(x, dtype=float)
    return lambda idx: float(x[idx].mean())


# ---------------------------------------------------------------- bootstrap arithmetic


def test_paired_bootstrap_explicit_resamples_match_hand_calculation():
    a, b = [1, 0, 1, 0], [1, 1, 1, 0]
    resamples = [[0, 1, 2, 3], [0, 0, 0, 0], [1, 1, 1, 1], [3, 3, 1, 1]]
    # deltas by hand: 0.75-0.5=0.25; 1-1=0; 1-0=1; (0+0+1+1)/4-(0+0+0+0)/4=0.5 -> sorted [0, .25, .5, 1]
    # percentile (linear): 2.5% at position 3*0.025=0.075 -> 0.075*0.25; 97.5% at 2.925 -> 0.5+0.925*0.5
    out = paired_bootstrap_indices(_mean(a), _mean(b), resamples, 4)
    assert out["delta"] == pytest.approx(0.25)
    assert out["ci_low"] == pytest.approx(0.075 * 0.25)
    assert out["ci_high"] == pytest.approx(0.5 + 0.925 * 0.5)
    assert out["n"] == 4


def test_identical_arms_give_zero_interval():
    scores = np.random.default_rng(1).random(50)
    out = paired_bootstrap(scores, scores.copy(), n_resamples=200, seed=3)
    assert out == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 50}


def test_constant_difference_gives_interval_on_that_value():
    a = np.random.default_rng(2).random(40)
    out = paired_bootstrap(a, a + 0.125, n_resamples=300, seed=0)
    assert out["delta"] == pytest.approx(0.125)
    assert out["ci_low"] == pytest.approx(0.125) and out["ci_high"] == pytest.approx(0.125)


def test_bootstrap_interval_brackets_delta_and_is_seeded():
    rng = np.random.default_rng(5)
    a = (rng.random(200) < 0.5).astype(float)
    b = (rng.random(200) < 0.7).astype(float)
    one = paired_bootstrap(a, b, n_resamples=500, seed=7)
    assert one == paired_bootstrap(a, b, n_resamples=500, seed=7)
    assert one["ci_low"] < one["delta"] < one["ci_high"]
    assert one["delta"] == pytest.approx(b.mean() - a.mean())
    with pytest.raises(InputError, match="same documents"):
        paired_bootstrap(a, b[:-1])


# ---------------------------------------------------------------- statistics through lmms-eval


def _pope_rec(doc_id, pred, gt):
    m = {"question_id": str(doc_id), "score": float(pred == gt), "prediction": pred, "ground_truth": gt}
    return {"doc_id": doc_id, "target": gt, "response": pred,
            "metrics": {"pope_f1_score": m, "pope_accuracy": m}}


POPE_F1 = "lmms_eval.tasks.pope.utils.pope_aggregate_f1_score"


def test_pope_f1_statistic_recomputed_on_each_resample():
    recs = [_pope_rec(0, "yes", "yes"), _pope_rec(1, "yes", "no"), _pope_rec(2, "no", "yes"), _pope_rec(3, "yes", "yes")]
    stat = TaskStatistic(recs, "pope_f1_score", "aggregate", POPE_F1, 100.0)
    # TP=2, FP=1, FN=1: precision = recall = 2/3, F1 = 2/3
    assert stat() == pytest.approx(200 / 3)
    assert stat(np.array([0, 0, 3, 3])) == pytest.approx(100.0)  # TP only
    assert stat(np.array([2, 2, 1, 1])) == pytest.approx(0.0)  # no TP: precision = recall = 0
    acc = TaskStatistic(recs, "pope_accuracy", "mean", None, 100.0)  # dict values: their "score" is averaged
    assert acc() == pytest.approx(50.0)


def test_mmstar_average_is_mean_of_l2_category_means():
    def rec(i, l2, score):
        return {"doc_id": i, "metrics": {"average": {"question_id": i, "l2_category": l2, "score": score}}}

    recs = [rec(0, "geometry", 1.0), rec(1, "geometry", 0.0), rec(2, "geometry", 0.0), rec(3, "recognition", 1.0)]
    stat = TaskStatistic(recs, "average", "aggregate", "lmms_eval.tasks.mmstar.utils.mmstar_aggregate_results", 100.0)
    assert stat() == pytest.approx(100 * (1 / 3 + 1) / 2)  # not the per-sample mean (50)


def test_mmbench_hits_use_static_matching_and_circular_groups():
    def rec(i, index, pred, answer):
        m = {"index": index, "question": "q", "answer": answer, "prediction": pred, "hint": None, "source": "s",
             "split": "dev", "category": "c", "L2-category": "l2", "A": "cat", "B": "dog", "C": "car", "D": "tree"}
        return {"doc_id": i, "metrics": {"gpt_eval_score": m}}

    # question 0 right; question 1 right in its main row but wrong in its circular variant 1000001 -> miss;
    # question 2 answered by option text "dog" (static text matching) -> right
    recs = [rec(0, 0, "A", "A"), rec(1, 1, "B", "B"), rec(2, 1000001, "C", "D"), rec(3, 2, "dog", "B")]
    stat = TaskStatistic(recs, "gpt_eval_score", "mmbench", None, 1.0)
    assert stat.n == 3
    assert stat() == pytest.approx(100 * 2 / 3)


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no per-sample metric 'f1'"):
        TaskStatistic([{"doc_id": 0, "metrics": {}}], "f1", "mean", None, 100.0)
    with pytest.raises(InputError, match="numeric"):
        TaskStatistic([{"doc_id": 0, "metrics": {"m": "x"}}], "m", "mean", None, 100.0)
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"doc_id": 0, "metrics": {}}\n{"doc_id": 1,\n')
    with pytest.raises(InputError, match=r"s.jsonl:2: not valid JSON"):
        load_samples(bad)


# ---------------------------------------------------------------- report from fixed logs


def _write_arm(root, name, pope, vqa, skipped=None):
    """pope: list of (pred, gt); vqa: list of per-sample exact_match values."""
    arm = root / name
    (arm / "samples").mkdir(parents=True)
    pope_recs = [_pope_rec(i, p, g) for i, (p, g) in enumerate(pope)]
    vqa_recs = [{"doc_id": i, "target": "red", "response": "red", "metrics": {"exact_match": v}} for i, v in enumerate(vqa)]
    for task, recs in (("demo_pope_random", pope_recs), ("demo_vqav2", vqa_recs)):
        (arm / "samples" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    f1 = TaskStatistic(pope_recs, "pope_f1_score", "aggregate", POPE_F1, 1.0)()
    em = float(np.mean(vqa))
    results = {
        "limit": None, "skipped": skipped or {},
        "tasks": {
            "demo_pope_random": {"column": "POPE-r", "metric": "pope_f1_score", "value": f1, "value_pct": 100 * f1,
                                 "metrics": {"pope_f1_score": f1, "pope_accuracy": float(np.mean([p == g for p, g in pope]))},
                                 "scale": 100.0, "statistic": "aggregate", "aggregation": POPE_F1,
                                 "lmms_eval_task": "demo_pope_random", "judge": False, "submission_only": False},
            "demo_vqav2": {"column": "VQAv2", "metric": "exact_match", "value": em, "value_pct": 100 * em,
                           "scale": 100.0, "statistic": "mean", "aggregation": None, "lmms_eval_task": "demo_vqav2",
                           "judge": False, "submission_only": False},
            # a task outside TASK_INFO: the runner reports its number but no per-sample statistic
            "ok_vqa": {"column": "ok_vqa", "metric": "exact_match", "value": 0.5, "value_pct": 50.0, "scale": 100.0,
                       "statistic": None, "lmms_eval_task": "ok_vqa"},
        },
    }
    (arm / "results.json").write_text(json.dumps(results))
    (arm / "metrics.json").write_text(json.dumps({
        "zero_shot_top1": 0.25 if name == "clip" else 0.5, "linear_probe_top1": 0.4,
        "retrieval": {"image_to_text": {"R@1": 0.1, "R@5": 0.3}, "text_to_image": {"R@1": 0.2}},
        "modality_gap": {"centroid_distance": 0.8 if name == "clip" else 0.6, "linear_separability": 1.0}}))
    log = arm / "train.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3}) + "\n" for s in range(10))
                   + '{"step": 10, "lo')  # a torn last line, as after a kill
    return {"results_json": arm / "results.json", "samples_dir": arm / "samples", "stage1_metrics": arm / "metrics.json",
            "umap_png": None, "train_logs": {"stage2_finetune": log}}


def test_report_from_two_arms(tmp_path):
    clip_pope = [("yes", "yes"), ("no", "yes"), ("yes", "no"), ("no", "no"), ("no", "yes"), ("yes", "yes")]
    ito_pope = [("yes", "yes"), ("yes", "yes"), ("yes", "no"), ("no", "no"), ("no", "yes"), ("yes", "yes")]
    arms = {
        "clip": _write_arm(tmp_path, "clip", clip_pope, [1.0, 0.0, 0.0, 1 / 3], skipped={"mmvet": "mmvet: no key"}),
        "ito": _write_arm(tmp_path, "ito", ito_pope, [1.0, 1.0, 0.0, 1 / 3]),
    }
    arms["ito"]["umap_png"] = tmp_path / "ito" / "umap.png"
    (tmp_path / "ito" / "umap.png").write_bytes(PNG_MAGIC)
    arms["ito"]["tower"] = {"spec": "/models/siglip", "family": "siglip", "params": 92_884_224, "image_size": 224,
                            "image_tokens": 196, "feature_layer": -2, "leading_tokens_kept": 0}
    out = tmp_path / "report"
    rep = write_report(arms, out, n_resamples=200, seed=0)

    # clip POPE: TP=2 FP=1 FN=2 -> P=2/3 R=1/2 F1=4/7; ito: TP=3 FP=1 FN=1 -> F1=3/4
    assert rep["table"]["clip"]["demo_pope_random"] == pytest.approx(100 * 4 / 7)
    assert rep["table"]["ito"]["demo_pope_random"] == pytest.approx(75.0)
    pope = rep["deltas"]["demo_pope_random"]["ito"]
    assert pope["delta"] == pytest.approx(75.0 - 400 / 7)
    assert pope["value_a"] == pytest.approx(400 / 7) and pope["n"] == 6
    assert pope["ci_low"] <= pope["delta"] <= pope["ci_high"]
    vqa = rep["deltas"]["demo_vqav2"]["ito"]
    assert vqa["delta"] == pytest.approx(25.0) and vqa["n"] == 4
    # ito is never worse on a VQA document: every resample has delta >= 0
    assert vqa["ci_low"] >= 0.0 and vqa["ci_high"] <= 100.0
    # paper column order, then others; a skipped paper13 task keeps its Table-4 column
    assert rep["benchmarks"] == ["demo_vqav2", "mmvet", "demo_pope_random", "ok_vqa"]
    assert "ok_vqa" not in rep["deltas"] and any(n.startswith("ok_vqa: no per-sample statistic") for n in rep["notes"])
    assert rep["all_metrics"]["clip"]["demo_pope_random"]["pope_accuracy"] == 0.5
    assert rep["stage1"]["ito"]["zero_shot_top1"] == 0.5
    assert rep["stage1"]["clip"]["modality_gap.centroid_distance"] == 0.8
    assert any("mmvet skipped: mmvet: no key" in n for n in rep["notes"])
    assert any("1 unreadable log line" in n for n in rep["notes"])

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["deltas"]["demo_vqav2"]["ito"]["delta"] == pytest.approx(25.0)
    md = (out / "report.md").read_text()
    assert "| tower | VQAv2 | MMVet | POPE-r | ok_vqa |" in md
    assert f"| clip | {50 * (1 + 1 / 3) / 2:.2f} | skipped | {400 / 7:.2f} | 50.00 |" in md
    assert f"| ito | {100 * (7 / 3) / 4:.2f} | — | 75.00 | 50.00 |" in md
    assert "| zero-shot top-1 | 0.2500 | 0.5000 |" in md
    assert "![ito UMAP](../ito/umap.png)" in md
    assert rep["towers"] == {"ito": arms["ito"]["tower"]}
    assert "| ito | `/models/siglip` | siglip | 92.9M | 224 | 196 | -2 | 0 |" in md
    for png in ("deltas.png", "curve_stage2_finetune.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in md


def test_report_rejects_bad_arms(tmp_path):
    with pytest.raises(InputError, match="no 'samples_dir'"):
        write_report({"clip": {"results_json": tmp_path / "r.json"}}, tmp_path / "out")
    arms = {"clip": {"results_json": tmp_path / "r.json", "samples_dir": tmp_path}}
    with pytest.raises(InputError, match="baseline 'ito'"):
        write_report(arms, tmp_path / "out", baseline="ito")
    with pytest.raises(InputError, match="r.json: file not found"):
        write_report(arms, tmp_path / "out")
    (tmp_path / "r.json").write_text('{"tasks": {}}')
    arms["clip"]["umap_png"] = tmp_path / "missing.png"
    with pytest.raises(InputError, match="umap_png .*missing.png not found"):
        write_report(arms, tmp_path / "out")
