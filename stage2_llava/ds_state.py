"""Exact DeepSpeed resume without pickles: fp32 master weights and Adam moments, per parameter, in safetensors.

DeepSpeed keeps the optimizer state (and, in bf16, the fp32 master copy of the weights) in flat
partitions spread over the ranks, and its own checkpoints store them with torch.save (pickle), which
this project never loads. Instead, at every stage-2 checkpoint each trainable parameter's full fp32
master value and its AdamW moments are assembled through DeepSpeed's public per-parameter API
(`deepspeed.utils.safe_get_full_fp32_param` / `safe_get_full_optimizer_state`: collectives, so every
rank calls them in the same order) and rank 0 writes them to `deepspeed_state.safetensors` (keys
`NAME::fp32`, `NAME::exp_avg`, `NAME::exp_avg_sq`) plus AdamW's step count in the checkpoint's JSON.

Restore, after `accelerator.prepare`: AdamW creates its state at its first step, so the state is
first created in torch's own format (step, exp_avg, exp_avg_sq per flat fp32 partition); under
ZeRO-1/2 each parameter's fragment is then linked to that state (`_link`: DeepSpeed's own linking
method, which it runs after its first step); then the values go in through the setters (`safe_set_full_fp32_param`,
`safe_set_full_optimizer_state`), each rank keeping its own partition. The trained (low-precision)
weights come back from the checkpoint's model.safetensors before `prepare`, as before.

Memory: rank 0 holds 12 bytes per trainable parameter on the CPU while writing (~81 GB for a 7B
finetune), the price of one file readable without DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from common.io import InputError

FILE = "deepspeed_state.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_step(base_optimizer: torch.optim.Optimizer) -> int:
    """AdamW's step count (the same for every partition: DeepSpeed steps them together)."""
    steps = {int(st["step"]) for st in base_optimizer.state.values() if "step" in st}
    if len(steps) != 1:
        raise RuntimeError(f"expected one AdamW step count across the DeepSpeed partitions, found {sorted(steps)}")
    return steps.pop()


def _link(ds_optimizer) -> None:
    """ZeRO-1/2: point every parameter's fragment at the current AdamW state (views into its flat tensors).

    DeepSpeed links them once, right after the first param group's first step, before the other groups
    have any state (a 2-group AdamW, decay / no decay, leaves the second group unlinked); relinking is
    idempotent, so it is done before every read and after a restore. ZeRO-3 reads the state directly."""
    link = getattr(ds_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        ds_optimizer._hp_optimizer_states_linked = False
        link()


def gather(named_params: Iterable[tuple[str, torch.nn.Parameter]], ds_optimizer, keep: bool) -> tuple[dict, dict]:
    """({NAME::fp32|exp_avg|exp_avg_sq: CPU tensor} on the rank that `keep`s them, else {}; JSON meta).

    Every rank must call it (the getters are collectives)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link(ds_optimizer)
    tensors = {}
    for name, p in named_params:
        values = {"fp32": safe_get_full_fp32_param(p)}
        values.update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
        if any(v is None for v in values.values()):
            raise RuntimeError(f"{name}: DeepSpeed returned no fp32/optimizer state (not a ZeRO-managed parameter?)")
        if keep:
            tensors.update({f"{name}::{k}": v.detach().float().cpu() for k, v in values.items()})
    return tensors, {"adam_step": adam_step(ds_optimizer.optimizer), "keys": ["fp32", *MOMENTS]}


def _flat_partitions(ds_optimizer) -> list[torch.Tensor]:
    """The fp32 flat partitions AdamW steps: ZeRO-3 lists them itself (it empties AdamW's param groups between
    steps); ZeRO-1/2 leaves them in AdamW's param groups."""
    z3 = getattr(ds_optimizer, "fp32_partitioned_groups_flat", None)
    if z3 is not None:
        return list(z3)
    return [p for group in ds_optimizer.optimizer.param_groups for p in group["params"]]


def _prime(ds_optimizer, step: int) -> None:
    """Create AdamW's state as torch does at its first step (zeros), with the saved step count."""
    base = ds_optimizer.optimizer
    for p in _flat_partitions(ds_optimizer):
        base.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32),
                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def restore(named_params: Iterable[tuple[str, torch.nn.Parameter]], ds_optimizer, tensors: dict, meta: dict,
            where: str) -> None:
    """Put the saved fp32 masters and moments back into DeepSpeed's partitions (every rank calls it)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = ds_optimizer.optimizer
    if not isinstance(base, torch.optim.AdamW):
        raise InputError(f"{where}: exact DeepSpeed resume restores AdamW state, the optimizer is {type(base).__name__}")
    _prime(ds_optimizer, int(meta["adam_step"]))
    _link(ds_optimizer)
    named = list(named_params)
    missing = [f"{n}::{k}" for n, _ in named for k in ("fp32", *MOMENTS) if f"{n}::{k}" not in tensors]
    if missing:
        raise InputError(f"{where}: {len(missing)} DeepSpeed state tensor(s) missing, first {missing[0]}; expected "
                         "a checkpoint of the same phase and model")
    for name, p in named:
        device = p.device if p.device.type != "meta" else torch.device("cpu")
        safe_set_full_fp32_param(p, tensors[f"{name}::fp32"].to(device))
        for k in MOMENTS:
            safe_set_full_optimizer_state(p, tensors[f"{name}::{k}"].to(device), k)
