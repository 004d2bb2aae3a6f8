"""Failpoints for fault injection (scripts/fault_inject.py): named spots where a run may be SIGKILLed.

`failpoint(name)` marks a spot inside a training step or a checkpoint/artifact write. It does
nothing unless the environment asks for it:

- ITO_MLLM_KILL_AT=STEP:NAME:N sends SIGKILL to this process at the Nth hit of NAME while the
  chain step STEP runs: the same uncatchable signal an OOM killer or a preempted node delivers.
- ITO_MLLM_FAILPOINT_TRACE=FILE appends "STEP NAME" for every hit, so an uninterrupted run tells
  the injector where and how often each spot is reached.

The chain step is taken from ITO_MLLM_FAULT_STEP, which the step runner (`pipeline.chain.run_step`) sets around each step (an
environment variable, so launched worker processes inherit it).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


def _kill_spec(text: str) -> tuple[str, str, int] | None:
    if not text:
        return None
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(f"ITO_MLLM_KILL_AT={text!r}: expected STEP:NAME:N, e.g. stage1:ckpt.partial:2")
    return parts[0], parts[1], int(parts[2])


_KILL_AT = _kill_spec(os.environ.get("ITO_MLLM_KILL_AT", ""))
_TRACE = os.environ.get("ITO_MLLM_FAILPOINT_TRACE", "")
_hits: Counter = Counter()


def failpoint(name: str) -> None:
    if not (_KILL_AT or _TRACE):
        return
    step = os.environ.get("ITO_MLLM_FAULT_STEP", "-")
    _hits[step, name] += 1
    if _TRACE:
        with open(_TRACE, "a", encoding="utf-8") as f:
            f.write(f"{step} {name}\n")
    if _KILL_AT and (step, name, _hits[step, name]) == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def set_step(step: str | None) -> None:
    """Name the chain step that the following failpoint hits belong to (None: clear)."""
    if step is None:
        os.environ.pop("ITO_MLLM_FAULT_STEP", None)
    else:
        os.environ["ITO_MLLM_FAULT_STEP"] = step


@contextmanager
def in_step(step: str) -> Iterator[None]:
    """Failpoint hits inside the block belong to chain step `step`; the enclosing step's name comes back after."""
    before = os.environ.get("ITO_MLLM_FAULT_STEP")
    set_step(step)
    try:
        yield
    finally:
        set_step(before)
