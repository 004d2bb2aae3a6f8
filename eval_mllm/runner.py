"""Run lmms-eval on a stage-2 LLaVA directory and write results.json plus per-sample logs.

The model goes through lmms-eval's own `llava_hf` adapter (in 0.7.3 the name resolves to
its chat variant, `lmms_eval.models.chat.llava_hf.LlavaHf`): it renders each request with the
processor's chat template (stage 2 saves LLaVA's vicuna_v1 one), so the prompt is
"<system> USER: <image>\\n<question> ASSISTANT:" with no adapter of ours in between. Its
limits: batch size 1, and `until` stop strings are ignored (generation stops at EOS or
max_new_tokens), which changes nothing for greedy single-answer benchmarks.

Tasks that cannot run here (judge without OPENAI_API_KEY, dataset not in the offline HF
cache, demo parquet missing) are skipped before the model loads and listed with the reason.
Besides results.json and samples/, the run writes table.md (the paper's Table-4 layout, skipped
tasks marked) and prompts.md/.json: for every task, the prompt the model received for its first
document, rendered by the same path as llava_hf, next to LLaVA-1.5's (`eval_mllm.prompts`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common.devices import resolve as resolve_devices
from common.io import InputError, atomic_write_json, atomic_write_text, json_finite, require_safetensors

from . import task_sets
from .bootstrap import TaskStatistic
from .parallel import EvalJob, merge_records, run_job, setup_process
from .task_sets import (
    LOCAL_TASKS,
    RUN_AS_REASONS,
    check_task_available,
    expand_tasks,
    info,
    lmms_task_name,
    materialise_tasks,
)

LMMS_MODEL = "llava_hf"
BATCH_SIZE = 1  # lmms-eval 0.7.3's llava_hf generates one request at a time (it asserts batch size 1)


def force_offline() -> None:
    """No hub access on these machines: make `datasets` and `huggingface_hub` fail fast instead of retrying.

    Also forgets lmms-eval's memoised datasets-cache choice, so HF_HOME / HF_DATASETS_CACHE /
    LMMS_EVAL_DATASETS_CACHE as set now decide where this run's datasets load from.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # Both libraries read the variables at import; patch the constants if they were imported first.
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        import datasets.config as ds_config

        ds_config.HF_HUB_OFFLINE = True
        if hasattr(ds_config, "HF_DATASETS_OFFLINE"):
            ds_config.HF_DATASETS_OFFLINE = True
    except ImportError:
        pass
    from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

    _resolve_hf_datasets_cache_dir.cache_clear()


def prompt_example(model_dir: Path) -> str:
    """What llava_hf will feed the model for one image and the text "QUESTION" (processor chat template)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    if not getattr(processor, "chat_template", None):
        raise InputError(f"{model_dir}: the processor has no chat template (stage 2 must save LLaVA's vicuna_v1 one)")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "QUESTION"}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: not a Hugging Face model directory (config.json missing)")
    require_safetensors(model_dir)  # lmms-eval's from_pretrained would otherwise unpickle a .bin
    if "," in str(model_dir) or "=" in str(model_dir):
        raise InputError(f"{model_dir}: lmms-eval model_args cannot carry a path containing ',' or '='")


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _metrics_of(task_results: dict) -> dict:
    """lmms-eval's 'metric,filter' keys to {metric: value}, without stderr entries."""
    out = {}
    for key, value in task_results.items():
        metric, _, _ = key.partition(",")
        if key == "alias" or "_stderr" in metric or not isinstance(value, (int, float)):
            continue
        out[metric] = float(value)
    return out


def _sample_record(sample: dict, metric_names: list[str]) -> dict:
    resp = sample.get("filtered_resps") or sample.get("resps") or [""]
    while isinstance(resp, list) and resp:
        resp = resp[0]
    rec = {
        "doc_id": sample["doc_id"],
        "target": sample.get("target"),
        "response": resp if isinstance(resp, str) else str(resp),
        "metrics": {m: sample[m] for m in metric_names if m in sample},
        "doc": sample.get("doc"),
    }
    return _json_safe(rec)


def _task_entry(task: str, lmms_name: str, results: dict, records: list[dict]) -> dict:
    meta = info(task)
    known = task in task_sets.TASK_INFO
    metrics = _metrics_of(results["results"].get(lmms_name, {}))
    metric = meta.metric or next(iter(metrics), "")
    value = metrics.get(metric)
    entry = {
        "lmms_eval_task": lmms_name,
        "column": meta.column,
        "metric": metric,
        "value": value,
        "value_pct": None if value is None else value * meta.scale,
        "scale": meta.scale,
        # A task we have no TASK_INFO entry for reports lmms-eval's number but gets no bootstrap:
        # how its metric aggregates per-sample values is unknown here.
        "statistic": meta.statistic if known else None,
        "aggregation": meta.aggregation,
        "metrics": metrics,
        "n_samples": len(records),
        "n_docs": results.get("n-samples", {}).get(lmms_name, {}).get("original"),
        "judge": meta.judge,
        "submission_only": meta.submission_only,
        "samples": f"samples/{task}.jsonl",
    }
    if lmms_name != task and lmms_name in RUN_AS_REASONS:
        entry["run_as_reason"] = RUN_AS_REASONS[lmms_name]
    if meta.submission_only:
        entry["value_pct"] = None
    elif known and value is not None and records and metric in records[0]["metrics"]:
        # The report bootstraps this recomputation; record that it reproduces lmms-eval's number.
        stat = TaskStatistic(records, metric, meta.statistic, meta.aggregation, meta.scale, where=f"{task} samples")
        entry["recomputed_pct"] = stat()
    return entry


def _plan(requested: list[str], run_as: dict[str, str], data_root, out_dir: Path):
    """Skip what cannot run here; returns (TaskManager over defaults + our local YAMLs, skipped, runnable)."""
    skipped: dict[str, str] = {}
    local_ok = []
    for task in requested:
        if run_as[task] in LOCAL_TASKS:
            reason = check_task_available(task, data_root, run_as=run_as[task])
            if reason:
                skipped[task] = reason
            else:
                local_ok.append(run_as[task])
    include = materialise_tasks(local_ok, out_dir / "tasks", data_root)

    from lmms_eval.tasks import TaskManager

    needs_defaults = any(run_as[t] not in LOCAL_TASKS for t in requested)
    manager = TaskManager(include_path=str(include), include_defaults=needs_defaults)
    unknown = [t for t in requested if t not in skipped and run_as[t] not in manager.all_tasks]
    if unknown:
        raise InputError(f"eval.tasks: not lmms-eval tasks or task sets: {', '.join(unknown)} "
                         f"(sets: {', '.join(task_sets.TASK_SETS)})")
    for task in requested:
        if task not in skipped and run_as[task] not in LOCAL_TASKS:
            reason = check_task_available(task, data_root, manager, run_as=run_as[task])
            if reason:
                skipped[task] = reason
    return manager, skipped, [t for t in requested if t not in skipped]


def _evaluate(job: EvalJob, task_objs: list, manager) -> dict:
    from lmms_eval.evaluator import simple_evaluate

    model = LMMS_MODEL
    if job.blind:  # the same adapter, built here (in every process) so its requests can be rewritten to grey images
        from lmms_eval import models

        from .blind import blind as make_blind

        model = make_blind(models.get_model(LMMS_MODEL).create_from_arg_string(
            job.model_args(), {"batch_size": BATCH_SIZE, "max_batch_size": None, "device": None}))
    return simple_evaluate(
        model=model,
        model_args=job.model_args(),
        tasks=task_objs,  # built once per process, so prompts.md renders from the very task objects that ran
        task_manager=manager,
        batch_size=BATCH_SIZE,
        limit=job.limit,
        log_samples=True,
        gen_kwargs=job.gen_kwargs(),
        bootstrap_iters=0,  # our paired bootstrap replaces lmms-eval's per-arm stderr
        random_seed=job.seed,
        numpy_random_seed=job.seed,
        torch_random_seed=job.seed,
        fewshot_random_seed=job.seed,
        cli_args=argparse.Namespace(output_path=str(job.out_dir / "lmms_eval"), process_with_media=False),
    )


def _run_tasks(job: EvalJob, manager=None) -> dict | None:
    """One evaluation process: lmms-eval on `job.lmms_tasks`; on rank 0 the results, records and prompt entries."""
    from lmms_eval.tasks import TaskManager, get_task_dict
    from transformers import AutoProcessor

    from .prompts import compare_task

    setup_process(job)
    force_offline()
    if manager is None:
        manager = TaskManager(include_path=str(job.include_path), include_defaults=job.include_defaults)
    task_dict = get_task_dict(list(job.lmms_tasks), manager, "chat")
    results = _evaluate(job, list(task_dict.values()), manager)
    if results is None:  # ranks other than 0: lmms-eval gathered everything on rank 0
        return None
    records = {}
    for name in job.lmms_tasks:
        metric_names = list(_metrics_of(results["results"].get(name, {})))
        records[name] = merge_records([_sample_record(s, metric_names) for s in results.get("samples", {}).get(name, [])])
    processor = AutoProcessor.from_pretrained(str(job.model_dir))
    return {"results": _json_safe(results["results"]), "n-samples": _json_safe(results.get("n-samples", {})),
            "records": records, "prompts": [compare_task(n, task_dict[n], processor) for n in job.lmms_tasks],
            "model_args": job.model_args(), "gen_kwargs": job.gen_kwargs()}


def _write_prompts(model_dir: Path, entries: list[dict], out_dir: Path):
    from .prompts import write_prompts

    header = f"Model directory: `{model_dir}` (its processor's chat template renders both prompts)."
    return write_prompts(entries, out_dir, header)


def run_lmms_eval(
    model_dir,
    tasks: list[str],
    out_dir,
    *,
    data_root=None,
    limit: int | None = None,
    device: str = "cpu",
    max_new_tokens: int | None = 16,
    seed: int = 0,
    textvqa_ocr: bool = True,
    blind: bool = False,
    precision: str = "auto",
    nproc: int = 1,
) -> dict:
    """Evaluate `model_dir` (a LlavaForConditionalGeneration dir) on `tasks` (names or sets).

    Writes out_dir/results.json, out_dir/samples/TASK.jsonl, table.md, prompts.md/.json, the
    materialised local task YAMLs in out_dir/tasks/ and lmms-eval's submission files in
    out_dir/lmms_eval/. max_new_tokens None keeps each task's own generation length.
    `textvqa_ocr` runs textvqa_val with LLaVA-1.5's OCR-token prompt (eval.textvqa_ocr).
    `blind` replaces every image by a uniform grey one of the same size (eval_mllm.blind): the
    language-prior floor of the same model, scored by the same task code.
    device/precision: `auto` or explicit (common.devices); nproc: data-parallel processes (eval_mllm.parallel).
    """
    force_offline()
    model_dir = Path(model_dir).resolve()
    out_dir = Path(out_dir)
    _check_model_dir(model_dir)
    device, precision = resolve_devices(device, precision, nproc, "eval")
    requested = expand_tasks(tasks)
    run_as = {t: lmms_task_name(t, textvqa_ocr) for t in requested}
    started = time.time()
    manager, skipped, runnable = _plan(requested, run_as, data_root, out_dir)
    summary = {
        "lmms_eval_version": _lmms_version(),
        "model": LMMS_MODEL,
        "model_dir": str(model_dir),
        "prompt_example": prompt_example(model_dir),
        "tasks_requested": requested,
        "tasks_run": runnable,
        "skipped": skipped,
        "run_as": {t: n for t, n in run_as.items() if n != t},
        "textvqa_ocr": textvqa_ocr,
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "blind": blind,
        "device": device,
        "precision": precision,
        "nproc": nproc,
        "data_root": None if data_root is None else str(Path(data_root).resolve()),
        "hf_datasets_cache": str(task_sets.hf_datasets_cache()),
        "tasks": {},
    }
    if runnable:
        job = EvalJob(model_dir, tuple(run_as[t] for t in runnable), out_dir / "tasks",
                      any(run_as[t] not in LOCAL_TASKS for t in runnable), out_dir, device, precision, nproc, limit,
                      max_new_tokens, seed, blind)
        raw = _run_tasks(job, manager) if nproc <= 1 else run_job(_run_tasks, job)
        summary["model_args"], summary["gen_kwargs"] = raw["model_args"], raw["gen_kwargs"]
        for task in runnable:
            records = raw["records"][run_as[task]]
            text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
            atomic_write_text(out_dir / "samples" / f"{task}.jsonl", text)
            summary["tasks"][task] = _task_entry(task, run_as[task], raw, records)
        summary["prompts"] = _write_prompts(model_dir, raw["prompts"], out_dir).name
    summary["seconds"] = round(time.time() - started, 3)
    from .report import results_table

    atomic_write_text(out_dir / "table.md", results_table(summary))
    atomic_write_json(out_dir / "results.json", json_finite(summary))
    return summary


def _lmms_version() -> str:
    from importlib.metadata import version

    return version("lmms_eval")

