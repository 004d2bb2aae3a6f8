"""Stage 3's public entry points: `evaluate` (lmms-eval on one LLaVA directory) and `report` (the A/B report
over arms). The chain (`pipeline.chain`) calls only these.

Each takes the eval config section and plain paths and returns the outputs it wrote ({key: path}); nothing
here knows about manifests or run directories.
"""

from __future__ import annotations

from pathlib import Path

from .config import EvalConfig


def uses_demo_world(cfg: EvalConfig) -> bool:
    """Whether the requested tasks include the demo world's (they read its parquet files: pass `data_root`)."""
    return any(t.startswith("demo") for t in cfg.tasks)


def evaluate(cfg: EvalConfig, model_dir: str | Path, out_dir: str | Path, *, data_root: str | Path | None = None,
             blind: bool = False) -> dict[str, Path]:
    """lmms-eval on `model_dir` (a LlavaForConditionalGeneration directory) into `out_dir`: results.json,
    samples/TASK.jsonl, table.md, prompts.md. `blind`: every image replaced by a grey one (the language-prior
    floor). Returns {"results_json", "samples_dir"}."""
    from .runner import run_lmms_eval

    out = Path(out_dir)
    run_lmms_eval(model_dir, cfg.tasks, out, data_root=data_root, limit=cfg.limit,
                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, textvqa_ocr=cfg.textvqa_ocr, blind=blind,
                  device=cfg.device, precision=cfg.precision, nproc=cfg.nproc)
    return {"results_json": out / "results.json", "samples_dir": out / "samples"}


def report(cfg: EvalConfig, arms: dict[str, dict], out_dir: str | Path, *, baseline: str | None = None,
           control: str | None = None) -> dict[str, Path]:
    """The A/B report over `arms` ({arm: its result files}, see eval_mllm.report.write_report) into `out_dir`:
    report.md, report.json and pictures. Returns {"markdown", "json"}."""
    from .report import write_report

    out = Path(out_dir)
    write_report(arms, out, baseline, control, n_resamples=cfg.bootstrap_samples, seed=cfg.seed)
    return {"markdown": out / "report.md", "json": out / "report.json"}
