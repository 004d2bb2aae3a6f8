"""Resumable training checkpoints without pickle: safetensors for tensors, JSON for the rest.

Layout: CKPT_DIR/step_00000123/{model.safetensors, optimizer.safetensors, state.json, [extra files]} and
CKPT_DIR/latest (the name of the newest complete checkpoint). A checkpoint is written into
a temporary directory and renamed into place, then `latest` is replaced atomically, so a
SIGKILL at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.faults import failpoint
from common.io import InputError, atomic_write_text, load_safetensors, read_json, save_safetensors

# Per checkpoint besides the tensors: RNG states (torch CPU and CUDA tensors, Python and NumPy Mersenne
# states as JSON) and metadata, ~27 KB measured on the CPU; disk estimates add it.
OVERHEAD_BYTES = 28 * 1024


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and plain JSON metadata."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # every visible GPU's generator (dropout, random ops on the device)
        tensors.update({f"rng.cuda.{i}": torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())})
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        for i, t in cuda[: torch.cuda.device_count()]:
            torch.cuda.set_rng_state(t, i)
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep: int = 2,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a complete checkpoint for `step`, point `latest` at it, keep the newest `keep`.

    extra: more safetensors files of the same checkpoint, {file name: tensors} (e.g. DeepSpeed's fp32 state)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir, prefix=f".{name}."))
    try:
        save_safetensors(model_state, tmp / "model.safetensors")
        failpoint("ckpt.partial")
        rng_tensors, rng_meta = rng_state()
        opt_tensors, opt_meta = optimizer_to_flat(optimizer) if optimizer is not None else ({}, None)
        save_safetensors({**opt_tensors, **rng_tensors}, tmp / "optimizer.safetensors")
        for file_name, tensors in (extra or {}).items():
            save_safetensors(tensors, tmp / file_name)
        full = {"step": step, "optimizer": opt_meta, "rng": rng_meta, **state}
        atomic_write_text(tmp / "state.json", json.dumps(full, indent=1, sort_keys=True))
        final = ckpt_dir / name
        failpoint("ckpt.before_rename")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    failpoint("ckpt.before_latest")
    atomic_write_text(ckpt_dir / "latest", name + "\n")
    _rotate(ckpt_dir, keep)
    return final


def _complete(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("step_*") if (p / "state.json").is_file())


def _rotate(ckpt_dir: Path, keep: int) -> None:
    for old in _complete(ckpt_dir)[:-keep]:
        # Hide before deleting: a kill mid-delete then leaves a hidden leftover, never a torn step dir.
        hidden = old.with_name(f".{old.name}.del")
        old.rename(hidden)
        failpoint("ckpt.rotate")
        shutil.rmtree(hidden, ignore_errors=True)
    sweep_partial(ckpt_dir)


def sweep_partial(ckpt_dir: str | Path) -> None:
    """Delete what a write or delete killed mid-way left behind; complete checkpoints are untouched.

    Call it where no checkpoint is being written (after a save; on the main rank at resume)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    for tmp in ckpt_dir.glob(".step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in ckpt_dir.glob(".latest.*.tmp"):
        tmp.unlink(missing_ok=True)
    for torn in ckpt_dir.glob("step_*"):  # complete checkpoints appear by rename, so these are garbage
        if not (torn / "state.json").is_file():
            shutil.rmtree(torn, ignore_errors=True)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        p = ckpt_dir / pointer.read_text().strip()
        if (p / "state.json").is_file():
            return p
    done = _complete(ckpt_dir) if ckpt_dir.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(
    path: str | Path, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (model_state, state_json); restore optimizer and RNG in place when given."""
    path = Path(path)
    state = read_json(path / "state.json")
    if not isinstance(state, dict) or "step" not in state:
        raise InputError(f"{path / 'state.json'}: expected a checkpoint state with a 'step' field")
    model_state = load_safetensors(path / "model.safetensors")
    extra = load_safetensors(path / "optimizer.safetensors")
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer_from_flat(optimizer, {k: v for k, v in extra.items() if not k.startswith("rng.")}, state["optimizer"])
    if restore_rng:
        set_rng_state(extra, state["rng"])
    return model_state, state
