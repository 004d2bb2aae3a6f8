"""Stage-3 task sets, per-task reporting metadata, local-task materialisation and offline checks.

`TASK_SETS["paper13"]` are the real lmms-eval task names of the paper's Table 4;
`TASK_SETS["demo"]` are local tasks (YAML templates under `eval_mllm/tasks/`) on the demo
world's parquet files. `TASK_INFO` says, per task, which lmms-eval metric is the paper's
number, how to turn it into a percentage, how to bootstrap it from per-sample logs, and
whether it needs a judge or only produces a submission file.

A demo task is declared once, in `DEMO_TASKS` (name, reporting, parquet file; its lmms-eval YAML
template is `tasks/demo/<name>.yaml`); its `TASK_INFO` and `LOCAL_TASKS` entries and the `demo` set
are derived from that list. To add one: write the YAML template, add a `DemoTask`, and have the demo
world (demo_world.benchmarks) write its parquet file.

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
- TextVQA: `textvqa_val` runs as our `textvqa_val_ocr` (lmms-eval's textvqa_val with its `ocr`
  prompt switch on: LLaVA-1.5's "Reference OCR token: ..." prompt) unless eval.textvqa_ocr=false.

Offline availability: `datasets` 5.2 loads a hub dataset offline only from its prepared Arrow
cache (`<cache>/<ns>___<name>/<config>/<version>/<hash>/dataset_info.json`); a hub snapshot of
parquet files is not read (see demo_world.paper13). `check_task_available` checks exactly that.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common.io import InputError, atomic_write_text

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

@dataclass(frozen=True)
class DemoTask:
    """One demo-world task, declared once: reporting (TaskInfo), the parquet file under DATA/eval/ it reads,
    and (by its name) the YAML template tasks/demo/<name>.yaml."""

    name: str
    info: TaskInfo
    data_file: str

    def local(self) -> LocalTask:
        return LocalTask(f"demo/{self.name}.yaml", self.data_file)


# The demo world's benchmarks (local parquet), scored with the metrics of the tasks they mimic; in `demo` set order.
DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("demo_vqav2", TaskInfo("VQAv2", "exact_match"), "vqav2.parquet"),
    DemoTask("demo_gqa", TaskInfo("GQA", "exact_match"), "gqa.parquet"),
    DemoTask("demo_mmbench", TaskInfo("MMB-en", "gpt_eval_score", "mmbench", scale=1.0), "mmbench.parquet"),
    DemoTask("demo_pope_random", TaskInfo("POPE-r", "pope_f1_score", "aggregate", _POPE_F1), "pope.parquet"),
    DemoTask("demo_pope_pop", TaskInfo("POPE-p", "pope_f1_score", "aggregate", _POPE_F1), "pope.parquet"),
    DemoTask("demo_pope_adv", TaskInfo("POPE-a", "pope_f1_score", "aggregate", _POPE_F1), "pope.parquet"),
    DemoTask("demo_mmstar", TaskInfo("MMStar", "average", "aggregate", _MMSTAR_AGG), "mmstar.parquet"),
)

TASK_INFO: dict[str, TaskInfo] = {
    "vqav2_val": TaskInfo("VQAv2", "exact_match"),
    "gqa": TaskInfo("GQA", "exact_match"),
    "textvqa_val": TaskInfo("T-VQA", "exact_match"),
    "textvqa_val_ocr": TaskInfo("T-VQA", "exact_match"),
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
    **{t.name: t.info for t in DEMO_TASKS},
}

TASK_SETS: dict[str, list[str]] = {
    "paper13": ["vqav2_val", "gqa", "textvqa_val", "scienceqa_img", "vizwiz_vqa_val", "mmbench_en_dev",
                "mmbench_cn_dev", "mmvet", "pope_random", "pope_pop", "pope_adv", "mmmu_val", "mmstar"],
    "demo": [t.name for t in DEMO_TASKS],
}

LOCAL_TASKS: dict[str, LocalTask] = {
    **{t.name: t.local() for t in DEMO_TASKS},
    "mmbench_cn_dev_static": LocalTask("variants/mmbench_cn_dev_static.yaml",
                                       lmms_include="mmbench/_default_template_mmbench_cn_yaml"),
    "textvqa_val_ocr": LocalTask("variants/textvqa_val_ocr.yaml", lmms_include="textvqa/textvqa_val.yaml"),
}

# Why a requested task runs under another lmms-eval name (reported next to the table).
RUN_AS_REASONS: dict[str, str] = {
    "mmbench_en_dev_static": "rule-based option matching (lmms-eval's mmbench_en_dev asks a GPT matcher)",
    "mmbench_cn_dev_static": "rule-based option matching (lmms-eval's mmbench_cn_dev asks a GPT matcher)",
    "textvqa_val_ocr": ("LLaVA-1.5's OCR-token prompt (\"Reference OCR token: ...\"); eval.textvqa_ocr=true, the "
                        "default; lmms-eval's own textvqa_val has no OCR tokens"),
}
TEXTVQA_OCR_TASK = "textvqa_val_ocr"

# Datasets a task's utils load besides its YAML's dataset_path (lmms_eval.tasks.gqa.utils.gqa_process_docs).
EXTRA_DATASETS: dict[str, list[tuple[str, str]]] = {
    "gqa": [("lmms-lab-encoder/GQA", "testdev_balanced_images")],
}


def info(task: str) -> TaskInfo:
    """Reporting metadata; a task we have no entry for reports lmms-eval's first metric under its own name."""
    return TASK_INFO.get(task) or TaskInfo(column=task, metric="")


def lmms_task_name(task: str, textvqa_ocr: bool = False) -> str:
    """The lmms-eval task that runs for the requested `task` (`textvqa_ocr`: eval.textvqa_ocr)."""
    if textvqa_ocr and task == "textvqa_val":
        return TEXTVQA_OCR_TASK
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


def hf_datasets_cache() -> Path:
    """The cache lmms-eval hands to load_dataset: same choice as lmms_eval.api.task._resolve_hf_datasets_cache_dir."""
    hf_home = os.path.expanduser(os.getenv("HF_HOME", "~/.cache/huggingface"))
    cache = os.getenv("LMMS_EVAL_DATASETS_CACHE") or os.getenv("HF_DATASETS_CACHE") or os.path.join(hf_home, "datasets")
    return Path(os.path.expanduser(cache))


def _hf_dataset_cached(repo_id: str, config: str | None = None) -> bool:
    """True when `datasets` can load `repo_id` (config `config`, any if None) offline: a prepared Arrow cache.

    A hub snapshot (`hub/datasets--*/snapshots/`) does not count: datasets 5.2 never reads it offline.
    """
    from datasets.naming import camelcase_to_snakecase

    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = hf_datasets_cache() / "___".join(parts)
    return any(root.glob(f"{config or '*'}/*/*/dataset_info.json"))


def _hub_dataset(task: str, task_manager) -> tuple[str, str | None] | None:
    from lmms_eval.utils import load_yaml_config

    entry = task_manager.task_index.get(task) if task_manager is not None else None
    if entry is None or entry.get("yaml_path", -1) == -1:
        return None
    cfg = load_yaml_config(entry["yaml_path"], mode="simple")
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or path in ("parquet", "json", "csv", "arrow", "text", "pandas") or os.path.exists(path):
        return None
    return path, cfg.get("dataset_name")


def check_task_available(task: str, data_root: str | os.PathLike | None = None, task_manager=None,
                         run_as: str | None = None) -> str | None:
    """None when `task` can run here, else a one-line reason (the runner skips it and reports why).

    Judge tasks need OPENAI_API_KEY; demo tasks need their parquet under DATA/eval/; hub
    tasks need their dataset (and config) in the local prepared HF cache (no hub access here).
    Hub tasks are only checked when a `task_manager` (lmms_eval TaskManager) is given or the
    task is one of our variants. `run_as` is the lmms-eval name when it is not lmms_task_name(task).
    """
    meta = info(task)
    if meta.judge and not os.environ.get("OPENAI_API_KEY"):
        return f"{task}: scored by a GPT judge and OPENAI_API_KEY is not set; skipped"
    name = run_as or lmms_task_name(task)
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

        cfg = load_yaml_config(str(_lmms_tasks_dir() / local.lmms_include), mode="simple")
        hub = (cfg.get("dataset_path"), cfg.get("dataset_name"))
    else:
        hub = _hub_dataset(name, task_manager)
    needed = ([hub] if hub and hub[0] else []) + EXTRA_DATASETS.get(name, [])
    for repo, config in needed:
        if not _hf_dataset_cached(repo, config):
            what = f"{repo} ({config})" if config else repo
            return (f"{task}: dataset {what} is not in the offline HF cache {hf_datasets_cache()} (no prepared "
                    "Arrow cache); run on a machine with the dataset cached, use HF_HOME=DIR from `ito-mllm data "
                    "paper13-fixtures --out DIR`, or drop it from eval.tasks")
    return None
