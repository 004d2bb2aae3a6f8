"""Disk guard: a training step refuses to start when the free space is below its estimated need.

Estimates count what the step will hold on disk at its peak: `keep + 1` checkpoints (the new one
is complete before the oldest rotates out), the final weights and exports, and caches. Bytes the
step already wrote (an interrupted run's checkpoints) are subtracted, so a resume on a nearly full
disk is not refused for space it already has. ITO_MLLM_SKIP_DISK_CHECK=1 turns the refusal into a
warning (for filesystems whose free-space report is wrong, e.g. some FUSE mounts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from common.io import InputError

log = logging.getLogger(__name__)


class DiskSpaceError(InputError):
    """Free disk is below a step's estimated need."""


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of the regular files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # rotated away while we walked
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def require_free(where: str | os.PathLike, what: str, need: dict[str, int], present: int = 0) -> dict:
    """Raise DiskSpaceError unless `where` has room for sum(need) - present bytes; returns the estimate."""
    total = sum(need.values())
    remaining = max(0, total - present)
    free = free_bytes(where)
    parts = ", ".join(f"{k} {human(v)}" for k, v in need.items())
    estimate = {"need_bytes": total, "present_bytes": present, "remaining_bytes": remaining, "free_bytes": free,
                "parts": need}
    msg = (f"{where}: {what} needs about {human(remaining)} more disk ({parts}; {human(present)} already "
           f"written), {human(free)} free")
    if free >= remaining:
        log.info("%s", msg)
    elif os.environ.get("ITO_MLLM_SKIP_DISK_CHECK") == "1":
        log.warning("%s (ITO_MLLM_SKIP_DISK_CHECK=1: starting anyway)", msg)
    else:
        raise DiskSpaceError(f"{msg}; free some space or lower keep_checkpoints")
    return estimate
