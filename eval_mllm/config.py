"""Stage-3 (lmms-eval) configuration: which tasks, how many samples, generation settings, where it runs."""

from __future__ import annotations

from common.schema import ConfigError, Section, option


class EvalConfig(Section):
    tasks: list[str] = option(["demo"], help="task names or task sets (paper13, demo); comma-separated on the CLI")
    limit: int | None = option(None, min=1, help="evaluate at most this many samples per task")
    max_new_tokens: int | None = option(None, min=1, help="generation length for every task; null: each task's own "
                                                          "generation_kwargs (lmms-eval's YAML)")
    bootstrap_samples: int = option(1000, min=10, help="paired bootstrap resamples for A/B confidence intervals")
    seed: int = option(0, min=0)
    textvqa_ocr: bool = option(True, help="run textvqa_val with LLaVA-1.5's OCR-token prompt (task textvqa_val_ocr); "
                                          "false: lmms-eval's textvqa_val without OCR tokens")
    blind: bool = option(True, help="also score every model with each image replaced by a uniform grey one (the "
                                    "language-prior floor, step eval_blind)")
    device: str = option("auto", help="auto: cuda when torch sees a GPU, else cpu; or cpu, cuda, cuda:N")
    precision: str = option("auto", choices=("auto", "fp32", "bf16", "fp16"), help="model dtype; auto: bf16 on a GPU, "
                                                                                    "fp32 on the CPU")
    nproc: int = option(1, min=1, help="data-parallel processes (one GPU each); lmms-eval shards every task's "
                                       "documents over them and gathers the results on rank 0")

    def check(self, prefix: str = "eval") -> None:
        from common.devices import DEVICE_PATTERN

        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"{prefix}.device: {self.device!r} is not a device, expected auto, cpu, cuda or cuda:N")
