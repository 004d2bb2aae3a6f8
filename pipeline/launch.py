"""Multi-process launch from Python through torchrun's own API (`torch.distributed.launcher`).

`ito-mllm stage1 train --nproc 2` calls `run(fn, args, nproc)`; every worker gets torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and calls `fn(*args)`.
Stage code only reads that environment (see `distributed_env`), so the same entry point also
runs under a cluster's own `torchrun` or Slurm wrapper.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) outside a launcher."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run(fn: Callable, args: tuple[Any, ...], nproc: int) -> Any:
    """Run `fn(*args)` in `nproc` processes (or inline for 1); returns rank 0's result."""
    if nproc <= 1:
        return fn(*args)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        start_method="spawn",
        monitor_interval=0.2,
    )
    results = elastic_launch(config, fn)(*args)
    return results[0]
