"""Progress lines on stdout, the same prefix for the chain and the stages: `[ito-mllm HH:MM:SS] message`."""

from __future__ import annotations

import time


def log(msg: str) -> None:
    print(f"[ito-mllm {time.strftime('%H:%M:%S')}] {msg}", flush=True)
