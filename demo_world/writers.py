"""Deterministic, atomic writers for the demo world: webdataset shards, JSON(L), parquet, hashes.

Every writer builds the file in memory and hands it to `common.io.atomic_write_bytes`,
so a killed run leaves either no file or a complete one. Byte-identical output for the
same input: tar members carry mtime 0 and fixed owner names; JSON keys are sorted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from common.io import atomic_write_bytes, sha256_file

TAR_OWNER = "ito"


def json_bytes(obj, indent: int | None = 2) -> bytes:
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False)
    return (text + "\n").encode("utf-8")


def write_json(path: Path, obj) -> Path:
    return atomic_write_bytes(path, json_bytes(obj))


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records]
    return atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def write_file_nosync(path: Path, data: bytes) -> Path:
    """Temp file + rename without fsync, for the thousands of small images.

    fsync costs ~10 ms a file here; a killed process still never leaves a torn file, and
    `generate` calls os.sync() once before the manifest is written."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def write_shard(path: Path, samples: Sequence[dict]) -> Path:
    """One webdataset tar; each sample is {"__key__": str, EXT: bytes, ...}."""
    import webdataset as wds

    buf = io.BytesIO()
    # encoder=False: every field is already bytes; mtime=0 and fixed owners make the tar reproducible
    with wds.TarWriter(buf, user=TAR_OWNER, group=TAR_OWNER, encoder=False, mtime=0.0) as sink:
        for sample in samples:
            sink.write(sample)
    return atomic_write_bytes(path, buf.getvalue())


def write_parquet(path: Path, columns: dict[str, list], features: dict) -> Path:
    """A Hugging Face `datasets` parquet file; `features` maps column -> datasets feature type."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        buf = io.BytesIO()
        ds.to_parquet(buf)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    return atomic_write_bytes(path, buf.getvalue())


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def folder_entry(folder: Path, names: Sequence[str]) -> dict:
    """Summary of an image folder: count, total bytes and one hash over sorted (name, file hash) lines."""
    h = hashlib.sha256()
    total = 0
    for name in sorted(names):
        p = folder / name
        total += p.stat().st_size
        h.update(f"{name} {sha256_file(p)}\n".encode())
    return {"count": len(names), "bytes": total, "sha256": h.hexdigest()}
