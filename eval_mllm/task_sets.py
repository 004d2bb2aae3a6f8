"""Stage-3 task sets, per-task reporting metadata, local-task materialisation and offline checks.

`TASK_SETS["paper13"]` are the real lmms-eval task names of the paper's Table 4;
`TASK_SETS["demo"]` are local tasks (YAML templates under `eval_mllm/tasks/`) on the demo
world's parquet files. `TASK_INFO` says, per task, which lmms-eval metric is the paper's
number, how to turn it into a percentage, how to bootstrap it from per-sample logs, and
whether it needs a judge or only produces a submission file.

Metric choices (checked against lmms-eval 0.7.3's task YAMLs):
- POPE: `pope_f1_score`. The ITO paper follows "the official LLaVA-1.5 evaluation protocol",
  whose POPE number is F1 (LLaVA-1.5-7B: 85.9). Accuracy, precision, recall and yes-ratio
  are kept in results.json. F1 is not a mean of per-sample scores, so the bootstrap
  recomputes it with lmms-eval's `pope_aggregate_f1_score` on every resample.
- MMStar: `average` (mean over L2 categories of per-category accuracy), recomputed with
  `mmstar_aggregate_results`; MMMU: `mmmu_acc` with `mmmu_aggregate_results`.
- VQAv2 / GQA / TextVQA / ScienceQA-IMG / VizWiz: `exact_match`, a mean of per-sample
  scores (VQA soft accuracy for VQAv2, TextVQA, VizWiz).
- MMBench: lmms-eval's `mmbench_*_dev` aggregate with a GPT matcher (it falls back to the
  API whenever the answer letter cannot be parsed; without a key each such item waits on
  retries and is then scored by a random letter). `mmbench_en_dev` therefore runs as
  lmms-eval's rule-scored `mmbench_en_dev_static`; lmms-eval has no Chinese twin, so
  `mmbench_cn_dev` runs as our local `mmbench_cn_dev_static` (same static MMBench_Evaluator).
- MMVet: `gpt_eval_score`, GPT-judged; skipped with a note when OPENAI_API_KEY is unset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.io import InputError, atomic_write_text

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@dataclass(frozen=True)
class TaskInfo:
    """How one requested task is run and reported.

    statistic: "mean" (mean of the numeric per-sample metric value), "aggregate" (call the
    lmms-eval aggregation `aggregation` on the per-sample metric dicts) or "mmbench"
    (per-question hit from lmms-eval's MMBench_Evaluator, then the mean).
    scale: multiply lmms-eval's value by this to get the paper's percentage.
    """

    column: str
    metric: str
    statistic: str = "mean"
    aggregation: str | None = None
    scale: float = 100.0
    run_as: str | None = None
    judge: bool = False
    submission_only: bool = False


@dataclass(frozen=True)
class LocalTask:
    """A task whose YAML the runner writes: a template of ours, optionally an lmms-eval
    template included after it, and optionally a demo parquet file under DATA/eval/."""

    template: str
    data_file: str | None = None
    lmms_include: str | None = None


_POPE_F1 = "lmms_eval.tasks.pope.utils.pope_aggregate_f1_score"
_MMSTAR_AGG = "lmms_eval.tasks.mmstar.utils.mmstar_aggregate_results"

TASK_INFO: dict[str, TaskInfo] = {
    "vqav2_val": TaskInfo("VQAv2", "exact_match"),
    "gqa": TaskInfo("GQA", "exact_match"),
    "textvqa_val": TaskInfo("T-VQA", "exact_match"),
    "scienceqa_img": TaskInfo("SciQA-I", "exact_match"),
    "vizwiz_vqa_val": TaskInfo("VizWiz", "exact_match"),
    "mmbench_en_dev": TaskInfo("MMB-en", "gpt_eval_score", "mmbench", scale=1.0, run_as="mmbench_en_dev_static"),
    "mmbench_cn_dev": TaskInfo("MMB-cn", "gpt_eval_score", "mmbench", scale=1.0, run_as="mmbench_cn_dev_static"),
    "mmvet": TaskInfo("MMVet", "gpt_eval_score", "aggregate", "lmms_eval.tasks.mmvet.utils.mmvet_aggregate_results",
                      scale=1.0, judge=True),
    "pope_random": TaskInfo("POPE-r", "pope_f1_score", "aggregate", _POPE_F1),
    "pope_pop": TaskInfo("POPE-p", "pope_f1_score", "aggregate", _POPE_F1),
    "pope_adv": TaskInfo("POPE-a", "pope_f1_score", "aggregate", _POPE_F1),
    "mmmu_val": TaskInfo("MMMU", "mmmu_acc", "aggregate", "lmms_eval.tasks.mmmu.utils.mmmu_aggregate_results"),
    "mmstar": TaskInfo("MMStar", "average", "aggregate", _MMSTAR_AGG),
    # Test splits scored by external servers: they run and write a submission file, no number.
    "vqav2_test": TaskInfo("VQAv2 (test)", "submission", submission_only=True),
    "vizwiz_vqa_test": TaskInfo("VizWiz (test)", "submission", submission_only=True),
    # Demo world (local parquet), same metrics as the tasks they mimic.
    "demo_pope_random": TaskInfo("POPE-r", "pope_f1_score", "aggregate", _POPE_F1),
    "demo_pope_pop": TaskInfo("POPE-p", "pope_f1_score", "aggregate", _POPE_F1),
    "demo_pope_adv": TaskInfo("POPE-a", "pope_f1_score", "aggregate", _POPE_F1),
    "demo_vqav2": TaskInfo("VQAv2", "exact_match"),
    "demo_gqa": TaskInfo("GQA", "exact_match"),
    "demo_mmstar": TaskInfo("MMStar", "average", "aggregate", _MMSTAR_AGG),
    "demo_mmbench": TaskInfo("MMB-en", "gpt_eval_score", "mmbench", scale=1.0),
}

TASK_SETS: dict[str, list[str]] = {
    "paper13": ["vqav2_val", "gqa", "textvqa_val", "scienceqa_img", "vizwiz_vqa_val", "mmbench_en_dev",
                "mmbench_cn_dev", "mmvet", "pope_random", "pope_pop", "pope_adv", "mmmu_val", "mmstar"],
    "demo": ["demo_vqav2", "demo_gqa", "demo_mmbench", "demo_pope_random", "demo_pope_pop", "demo_pope_adv",
             "demo_mmstar"],
}

LOCAL_TASKS: dict[str, LocalTask] = {
    "demo_pope_random": LocalTask("demo/demo_pope_random.yaml", "pope.parquet"),
    "demo_pope_pop": LocalTask("demo/demo_pope_pop.yaml", "pope.parquet"),
    "demo_pope_adv": LocalTask("demo/demo_pope_adv.yaml", "pope.parquet"),
    "demo_vqav2": LocalTask("demo/demo_vqav2.yaml", "vqav2.parquet"),
    "demo_gqa": LocalTask("demo/demo_gqa.yaml", "gqa.parquet"),
    "demo_mmstar": LocalTask("demo/demo_mmstar.yaml", "mmstar.parquet"),
    "demo_mmbench": LocalTask("demo/demo_mmbench.yaml", "mmbench.parquet"),
    "mmbench_cn_dev_static": LocalTask("variants/mmbench_cn_dev_static.yaml",
                                       lmms_include="mmbench/_default_template_mmbench_cn_yaml"),
}


def info(task: str) -> TaskInfo:
    """Reporting metadata; a task we have no entry for reports lmms-eval's first metric under its own name."""
    return TASK_INFO.get(task) or TaskInfo(column=task, metric="")


def lmms_task_name(task: str) -> str:
    return info(task).run_as or task


def expand_tasks(names: Iterable[str] | str) -> list[str]:
    """Task-set names and comma-separated lists to a de-duplicated list of task names, in order."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for entry in names:
        for name in (n.strip() for n in str(entry).split(",")):
            if not name:
                continue
            for task in TASK_SETS.get(name, [name]):
                if task not in out:
                    out.append(task)
    if not out:
        raise InputError("eval.tasks: no task names given (expected task names or sets: " + ", ".join(TASK_SETS) + ")")
    return out


def data_path(task: str, data_root: str | os.PathLike | None) -> Path | None:
    local = LOCAL_TASKS.get(lmms_task_name(task))
    if local is None or local.data_file is None or data_root is None:
        return None
    return Path(data_root) / "eval" / local.data_file


def _lmms_tasks_dir() -> Path:
    import lmms_eval.tasks

    return Path(lmms_eval.tasks.__file__).resolve().parent


def _yaml_line(key: str, value) -> str:
    # JSON strings and lists are valid YAML flow scalars, so paths need no YAML escaping.
    return f"{key}: {json.dumps(value, ensure_ascii=False)}\n"


def materialise_tasks(tasks: Iterable[str], out_dir: str | os.PathLike, data_root: str | os.PathLike | None) -> Path:
    """Write the YAML files of the local tasks among `tasks` (lmms-eval names) into `out_dir`.

    Each file includes our template (and an lmms-eval template after it, for variants) and
    adds the task name and the absolute parquet path, which static YAML cannot know. A group
    `demo` lists the demo tasks written. Returns `out_dir`, to pass as TaskManager's include_path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    demo = []
    for name in tasks:
        local = LOCAL_TASKS.get(name)
        if local is None:
            continue
        includes = [str(TASKS_DIR / local.template)]
        if local.lmms_include:
            includes.append(str(_lmms_tasks_dir() / local.lmms_include))
        text = "# Written by eval_mllm.task_sets.materialise_tasks; regenerated on every run.\n"
        text += _yaml_line("include", includes) + _yaml_line("task", name)
        if local.data_file is not None:
            if data_root is None:
                raise InputError(f"{name}: needs a data root holding eval/{local.data_file} (data_root is not set)")
            parquet = (Path(data_root) / "eval" / local.data_file).resolve()
            text += "dataset_kwargs:\n  data_files:\n    " + _yaml_line("test", str(parquet))
            demo.append(name)
        atomic_write_text(out / f"{name}.yaml", text)
    if demo:
        atomic_write_text(out / "demo.yaml", _yaml_line("group", "demo") + _yaml_line("task", demo))
    return out


def _hf_dataset_cached(repo_id: str) -> bool:
    """True when `datasets` could load `repo_id` offline: a hub snapshot or a prepared Arrow cache."""
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    # Same directory choice as lmms_eval.api.task._resolve_hf_datasets_cache_dir.
    hf_home = os.path.expanduser(os.getenv("HF_HOME", "~/.cache/huggingface"))
    cache = os.getenv("LMMS_EVAL_DATASETS_CACHE") or os.getenv("HF_DATASETS_CACHE") or os.path.join(hf_home, "datasets")
    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    return any(p.is_dir() for p in (Path(os.path.expanduser(cache)) / "___".join(parts)).glob("*/*/*"))


def _hub_dataset(task: str, task_manager) -> str | None:
    from lmms_eval.utils import load_yaml_config

    entry = task_manager.task_index.get(task) if task_manager is not None else None
    if entry is None or entry.get("yaml_path", -1) == -1:
        return None
    path = load_yaml_config(entry["yaml_path"], mode="simple").get("dataset_path")
    if not isinstance(path, str) or path in ("parquet", "json", "csv", "arrow", "text", "pandas") or os.path.exists(path):
        return None
    return path


def check_task_available(task: str, data_root: str | os.PathLike | None = None, task_manager=None) -> str | None:
    """None when `task` can run here, else a one-line reason (the runner skips it and reports why).

    Judge tasks need OPENAI_API_KEY; demo tasks need their parquet under DATA/eval/; hub
    tasks need their dataset in the local HF cache (this machine has no hub access).
    Hub tasks are only checked when a `task_manager` (lmms_eval TaskManager) is given.
    """
    meta = info(task)
    if meta.judge and not os.environ.get("OPENAI_API_KEY"):
        return f"{task}: scored by a GPT judge and OPENAI_API_KEY is not set; skipped"
    name = lmms_task_name(task)
    local = LOCAL_TASKS.get(name)
    if local is not None and local.data_file is not None:
        path = data_path(task, data_root)
        if path is None:
            return f"{task}: needs DATA/eval/{local.data_file} but no data root was given"
        if not path.is_file():
            return f"{task}: {path} not found (expected the demo world's eval/{local.data_file}; generate the data first)"
        return None
    if local is not None and local.lmms_include:
        from lmms_eval.utils import load_yaml_config

        repo = load_yaml_config(str(_lmms_tasks_dir() / local.lmms_include), mode="simple").get("dataset_path")
    else:
        repo = _hub_dataset(name, task_manager)
    if repo and not _hf_dataset_cached(repo):
        return (f"{task}: dataset {repo} is not available offline (HF cache empty); run on a machine with the "
                "dataset cached or drop it from eval.tasks")
    return None
