"""Training metrics to JSONL (one object per logged step, appended and flushed) and TensorBoard.

The JSONL file is the source of truth for reports; on resume, lines past the resumed step
are dropped so a killed-and-resumed run's log equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricLogger:
    def __init__(self, log_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._f = open(self.jsonl, "a", encoding="utf-8")  # noqa: SIM115  (kept open for the whole run)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                self._tb = None

    def _truncate_after(self, step: int) -> None:
        if not self.jsonl.exists():
            return
        keep = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        self.jsonl.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        rec = {"step": step}
        for k, v in metrics.items():
            if hasattr(v, "item"):
                v = v.item()
            rec[k] = v
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl_counted(path: str | Path) -> tuple[list[dict], int]:
    """The records of a JSONL log and how many lines could not be read (torn by a kill)."""
    out, torn = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return out, torn


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL log; lines torn by a kill are skipped."""
    return read_jsonl_counted(path)[0]
