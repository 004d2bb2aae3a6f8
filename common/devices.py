"""Device and precision resolution shared by the stages, the planner and the GPU smoke script.

`auto` means: CUDA when torch sees a GPU (`torch.cuda.is_available()`), else the CPU; bf16 on
a GPU, fp32 on the CPU. Everything else is explicit: `cpu`, `cuda`, `cuda:N`; `fp32`, `bf16`,
`fp16`. A request the machine cannot serve (cuda without a GPU, more processes than GPUs, fp16
on the CPU) is an InputError naming the key, never a silent fallback to the CPU.
"""

from __future__ import annotations

import os
import re

from common.io import InputError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(spec: str, key: str = "device") -> str:
    """`auto` -> "cuda" or "cpu"; an explicit CUDA device is checked against what torch sees."""
    if not DEVICE_PATTERN.fullmatch(spec):
        raise InputError(f"{key}: {spec!r} is not a device, expected auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return "cuda" if cuda_available() else "cpu"
    if spec.startswith("cuda") and not cuda_available():
        raise InputError(f"{key}: {spec} requested but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return spec


def resolve_precision(spec: str, device: str, key: str = "precision") -> str:
    """`auto` -> bf16 on a GPU, fp32 on the CPU; fp16 is refused on the CPU (slow and lossy there)."""
    if spec not in PRECISIONS:
        raise InputError(f"{key}: {spec!r} is not one of {', '.join(PRECISIONS)}")
    if spec == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if spec == "fp16" and not device.startswith("cuda"):
        raise InputError(f"{key}: fp16 needs a CUDA device, got device {device}; use fp32 or bf16 on the CPU")
    return spec


def check_nproc(nproc: int, device: str, key: str = "nproc") -> None:
    """One GPU per process: refuse more CUDA processes than visible GPUs."""
    if device.startswith("cuda") and nproc > 1:
        import torch

        if ":" in device:
            raise InputError(f"{key}: {nproc} processes need one GPU each; device {device} names a single GPU, "
                             "expected device cuda or auto")
        n = torch.cuda.device_count()
        if nproc > n:
            raise InputError(f"{key}: {nproc} processes but torch sees {n} CUDA device(s), expected at most {n}")


def process_device(device: str, nproc: int) -> str:
    """The device of this process: with several CUDA processes, `cuda:LOCAL_RANK` (torchrun's environment)."""
    if device == "cuda" and nproc > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def resolve(device: str, precision: str, nproc: int = 1, prefix: str = "") -> tuple[str, str]:
    """(device, precision) for config values `device`/`precision`/`nproc` under `prefix` (e.g. "eval")."""
    p = f"{prefix}." if prefix else ""
    dev = resolve_device(device, f"{p}device")
    check_nproc(nproc, dev, f"{p}nproc")
    return dev, resolve_precision(precision, dev, f"{p}precision")
