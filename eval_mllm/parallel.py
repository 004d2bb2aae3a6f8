"""Where stage 3 runs: device, dtype and data-parallel processes for lmms-eval's `llava_hf`.

`EvalJob` is everything one evaluation process needs (picklable, so torchrun's launcher can hand
it to N spawned processes). With `nproc > 1` every process runs lmms-eval's `simple_evaluate` on
the same task list; lmms-eval shards each task's documents by rank (doc i goes to rank
i % world_size), pads the shorter ranks' request lists, and gathers the per-sample logs and
metrics on rank 0 through its accelerate backend, which is the only rank that returns results.
The merged per-sample records are sorted by doc_id, so N processes write what 1 process writes.

llava_hf would pick `cuda:{local_rank}` by itself with several processes only when `device_map`
is empty, and then wraps the model in DDP; we always pass this process's own device
(`cuda:LOCAL_RANK`, or `cpu`) as both `device` and `device_map`, so each rank holds a plain
model on its GPU. On the CPU, accelerate ignores torchrun's environment unless told to use the
CPU (`ACCELERATE_USE_CPU`), so lmms-eval's gathers would see one process; the job sets it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.devices import TORCH_DTYPE_NAMES, process_device


@dataclass(frozen=True)
class EvalJob:
    model_dir: Path
    lmms_tasks: tuple[str, ...]  # lmms-eval task names, in the order of the requested tasks
    include_path: Path  # our materialised local task YAMLs
    include_defaults: bool  # whether lmms-eval's own task index is needed too
    out_dir: Path
    device: str  # resolved: cpu, cuda or cuda:N
    precision: str  # resolved: fp32, bf16 or fp16
    nproc: int
    limit: int | None
    max_new_tokens: int | None
    seed: int
    blind: bool = False  # every image replaced by a grey one (eval_mllm.blind)

    @property
    def dtype(self) -> str:
        return TORCH_DTYPE_NAMES[self.precision]

    def model_args(self) -> str:
        device = process_device(self.device, self.nproc)
        return f"pretrained={self.model_dir},device={device},device_map={device},dtype={self.dtype}"

    def gen_kwargs(self) -> str:
        return "temperature=0" if self.max_new_tokens is None else f"max_new_tokens={self.max_new_tokens},temperature=0"


def setup_process(job: EvalJob) -> None:
    """Per-process settings before lmms-eval builds its Accelerator (see module docstring)."""
    if job.nproc <= 1:
        return  # one process: lmms-eval's Accelerator sees one process whatever the device
    if job.device == "cpu":
        # Set in the spawned process only: it would force later accelerate users of this process onto the CPU.
        os.environ["ACCELERATE_USE_CPU"] = "1"
        import torch

        # N processes share the cores: without this each would start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.nproc))
    else:
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def run_job(entry: Callable[[EvalJob], dict | None], job: EvalJob) -> dict:
    """`entry(job)` in this process (nproc 1) or in `job.nproc` torchrun processes; rank 0's result."""
    if job.nproc <= 1:
        return entry(job)
    from common import launch

    out = launch.run(entry, (job,), job.nproc)
    if out is None:
        raise RuntimeError("lmms-eval returned no results on rank 0")
    return out


def merge_records(records: list[dict]) -> list[dict]:
    """Per-sample records in document order, whichever rank produced them (duplicates are a bug: refused)."""
    out = sorted(records, key=lambda r: r["doc_id"])
    ids = [r["doc_id"] for r in out]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"lmms-eval returned duplicated documents: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    return out
