"""Multi-process, multi-node launch from Python through torchrun's own API (`torch.distributed.launcher`).

`ito-mllm stage1 train --nproc 2` calls `run(fn, args, nproc)`; every worker gets torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and calls `fn(*args)`.
Stage code only reads that environment (see `distributed_env`), so the same entry point also
runs under a cluster's own `torchrun` or Slurm wrapper.

Several nodes (`--nnodes N --node-rank R --master-addr HOST --master-port PORT`, the same command on
every node) use torchrun's static rendezvous, as `torchrun --nnodes N --node-rank R --master-addr
HOST --master-port PORT` does: node R's processes get global ranks R*nproc .. R*nproc+nproc-1 and
meet at HOST:PORT (node 0's address). `scripts/slurm.py` writes the sbatch file that does this.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Nodes:
    """torchrun's multi-node options; the default is one node (a local rendezvous on a free port)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.node_rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) outside a launcher."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launch_config(nproc: int, nodes: Nodes):
    """torchrun's LaunchConfig: one node with a private c10d rendezvous, or static rendezvous across nodes."""
    from torch.distributed.launcher.api import LaunchConfig

    common = dict(nproc_per_node=nproc, max_restarts=0, start_method="spawn", monitor_interval=0.2)
    if nodes.nnodes <= 1:
        return LaunchConfig(min_nodes=1, max_nodes=1, run_id=uuid.uuid4().hex[:8], rdzv_backend="c10d",
                            rdzv_endpoint=f"127.0.0.1:{free_port()}", **common)
    if not 0 <= nodes.node_rank < nodes.nnodes:
        raise ValueError(f"--node-rank {nodes.node_rank} is outside 0..{nodes.nnodes - 1} for --nnodes {nodes.nnodes}")
    # torchrun --nnodes N --node-rank R --master-addr A --master-port P: the static rendezvous with rank R
    return LaunchConfig(min_nodes=nodes.nnodes, max_nodes=nodes.nnodes, run_id="ito-mllm", rdzv_backend="static",
                        rdzv_endpoint=f"{nodes.master_addr}:{nodes.master_port}", rdzv_configs={"rank": nodes.node_rank},
                        **common)


def run(fn: Callable, args: tuple[Any, ...], nproc: int, nodes: Nodes | None = None) -> Any:
    """Run `fn(*args)` in `nproc` processes per node (inline for one process on one node).

    Returns global rank 0's result on node 0, else this node's first process's result."""
    nodes = nodes or Nodes()
    if nproc <= 1 and nodes.nnodes <= 1:
        return fn(*args)
    from torch.distributed.launcher.api import elastic_launch

    results = elastic_launch(launch_config(nproc, nodes), fn)(*args)
    return results[min(results)]
