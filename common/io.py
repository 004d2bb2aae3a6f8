"""Small helpers every stage shares: atomic writes, safetensors/JSON save and load.

Part of `common`, the ground floor: stage-free helpers that import none of the other packages
(ARCHITECTURE.md; tests/test_layout.py checks it from the import graph).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.faults import failpoint


class InputError(ValueError):
    """Bad user input (file, record or field); the CLI prints it as one line and exits 1."""


class RunStopped(RuntimeError):
    """A long run stopped on purpose (non-finite loss, too many bad samples); the CLI prints one line."""


class NonFiniteLoss(RunStopped):
    """The loss became NaN/inf; the run stops and the last good checkpoint is kept."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same directory and a rename.

    A reader (or a resumed run after SIGKILL) sees either the old file or the new one,
    never a torn write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        failpoint("file.before_rename")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


@contextmanager
def staged_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to `out_dir`; on success it replaces `out_dir` by rename.

    For whole-directory artifacts (exports, HF model dirs): readers see the old directory or
    the complete new one, never a half-written one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
        failpoint("dir.before_rename")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old)
            failpoint("dir.mid_swap")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_partial_writes(root: str | os.PathLike) -> list[Path]:
    """Delete the temp files and directories (`.NAME.*.tmp`, `.NAME.*.old`) that writes killed mid-way left
    under `root`; returns them. Only for trees no other process is writing."""
    found = sorted(p for p in Path(root).rglob(".*") if p.name.endswith((".tmp", ".old")))
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_finite(obj: Any) -> Any:
    """NaN/inf to None, in nested dicts and lists: JSON has no such numbers (a statistic of an empty set,
    a degenerate embedding)."""
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, turning a parse error into a one-line InputError naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid UTF-8 JSON ({e})") from None


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Atomically save a flat dict of torch tensors as safetensors.

    Tensors are made contiguous and shared storage is cloned, since safetensors refuses
    aliasing tensors (tied weights)."""
    import torch
    from safetensors.torch import save

    seen: set[int] = set()
    flat = {}
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        flat[k] = t
    del torch
    return atomic_write_bytes(path, save(flat, metadata=metadata))


def load_safetensors(path: str | os.PathLike) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def path_escape(rel: str) -> str | None:
    """Why the data-file path `rel` would leave the folder it is relative to, or None when it stays inside.

    By path text only (absolute, a drive, `..` above the root after normalisation); a symlink inside the
    folder is the dataset owner's choice and is followed."""
    if os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
        return "is an absolute path"
    norm = os.path.normpath(rel)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return "leaves the image folder"
    return None


def require_safetensors(model_dir: str | os.PathLike) -> None:
    """A Hugging Face model directory must hold safetensors weights: pickled .bin/.pt files are never loaded."""
    d = Path(model_dir)
    if any((d / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in d.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    raise InputError(f"{d}: no model.safetensors (or model.safetensors.index.json), expected safetensors weights"
                     + (f"; {', '.join(pickles)} may hold pickled code and are not loaded" if pickles else ""))
