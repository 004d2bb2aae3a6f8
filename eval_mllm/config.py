"""Stage-3 (lmms-eval) configuration: which tasks, how many samples, generation settings."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.schema import option


@dataclass
class EvalConfig:
    tasks: list[str] = option(["demo"], help="task names or task sets (paper13, demo); comma-separated on the CLI")
    limit: int | None = option(None, min=1, help="evaluate at most this many samples per task")
    batch_size: int = option(1, min=1)
    max_new_tokens: int = option(16, min=1)
    bootstrap_samples: int = option(1000, min=10, help="paired bootstrap resamples for A/B confidence intervals")
    seed: int = option(0, min=0)
    textvqa_ocr: bool = option(True, help="run textvqa_val with LLaVA-1.5's OCR-token prompt (task textvqa_val_ocr); "
                                          "false: lmms-eval's textvqa_val without OCR tokens")
    blind: bool = option(True, help="also score every model with each image replaced by a uniform grey one (the "
                                    "language-prior floor, step eval_blind)")
