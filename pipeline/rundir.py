"""Run directories: the resolved `config.yaml` plus `manifest.json`, the contract between stages.

manifest.json: {"stages": {NAME: {"status": "done|running|failed", "config_hash": str,
"inputs": {...}, "outputs": {KEY: "relative/path"}, ...}}}. Output paths are relative to
the run directory so a run directory can be moved or copied as a whole.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from common.io import InputError, atomic_write_json, atomic_write_text, read_json

STAGES = ("data", "stage1", "stage2_pretrain", "stage2_finetune", "eval", "eval_blind", "report")
STATUSES = ("done", "running", "failed")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.manifest_path.exists():
            atomic_write_json(self.manifest_path, {"stages": {}})
        return self

    def save_config(self, yaml_text: str) -> None:
        self.create()
        atomic_write_text(self.config_path, yaml_text)

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"stages": {}}
        data = read_json(self.manifest_path)
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise InputError(f"{self.manifest_path}: expected an object with a 'stages' mapping")
        return data

    def stage(self, name: str) -> dict:
        return self.manifest()["stages"].get(name, {})

    def _update(self, name: str, **fields: Any) -> dict:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        self.create()
        data = self.manifest()
        entry = data["stages"].setdefault(name, {})
        entry.update(fields)
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.manifest_path, data)
        return entry

    def mark_running(self, name: str, config_hash: str, inputs: dict[str, Any] | None = None) -> dict:
        return self._update(name, status="running", config_hash=config_hash, inputs=inputs or {}, outputs={})

    def mark_done(self, name: str, outputs: dict[str, str | Path], **extra: Any) -> dict:
        rel = {k: self.relative(v) for k, v in outputs.items()}
        return self._update(name, status="done", outputs=rel, **extra)

    def add_outputs(self, name: str, outputs: dict[str, str | Path], **extra: Any) -> dict:
        """Merge outputs into a stage entry (stage 1's train, export and eval each add theirs)."""
        merged = dict(self.stage(name).get("outputs", {}))
        merged.update({k: self.relative(v) for k, v in outputs.items()})
        return self._update(name, status="done", outputs=merged, **extra)

    def mark_failed(self, name: str, error: str) -> dict:
        return self._update(name, status="failed", error=error)

    def relative(self, path: str | Path) -> str:
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.path.resolve()))
        except ValueError:
            return str(p.resolve())

    def output(self, stage: str, key: str) -> Path | None:
        """Absolute path of a recorded output, or None when the stage has not produced it."""
        entry = self.stage(stage)
        if entry.get("status") != "done" or key not in entry.get("outputs", {}):
            return None
        p = Path(entry["outputs"][key])
        return p if p.is_absolute() else self.path / p

    def require_output(self, stage: str, key: str) -> Path:
        p = self.output(stage, key)
        if p is None:
            raise InputError(
                f"{self.manifest_path}: stage '{stage}' has no finished output '{key}'; run that stage first"
            )
        return p
