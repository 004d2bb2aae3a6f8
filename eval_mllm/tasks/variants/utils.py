"""Aggregations of the rule-scored task variants; they call lmms-eval's own evaluators."""

from __future__ import annotations

import json

from lmms_eval.tasks._task_utils.file_utils import generate_submission_file
from lmms_eval.tasks.mmbench import cn_utils


def mmbench_cn_aggregate_dev_results_static(results, args):
    """MMBench-CN dev accuracy with lmms-eval's static (regex/substring) option matching.

    Same body as lmms_eval.tasks.mmbench.en_utils.mmbench_aggregate_dev_results_static, on
    the Chinese evaluator instance, so no OpenAI key is needed.
    """
    overall_acc, category_acc, l2_category_acc = cn_utils.mmbench_evaluator.eval_result(results, eval_method="static")
    path = generate_submission_file("mmbench_cn_dev_static_results.json", args)
    with open(path, "w") as f:
        json.dump({"overall_acc": overall_acc, "category_acc": category_acc, "l2_category_acc": l2_category_acc}, f)
    return overall_acc * 100
