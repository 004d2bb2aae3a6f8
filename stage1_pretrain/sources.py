"""Stage-1 training sources with random access: local webdataset shards (tar) or a CSV/TSV.

- Shards (img2dataset layout: KEY.jpg|jpeg|png|webp + KEY.txt [+ KEY.json]): the pattern is
  expanded by webdataset's `expand_urls` (braces, "::" lists); each tar is indexed once per
  process by scanning its headers (Python `tarfile`: member offsets, no data read) with
  webdataset's key rule (`base_plus_ext`, lower-cased extensions, consecutive members with
  one key form a sample, `__meta__` members skipped). webdataset 0.2.86's own indexed reader
  (`wids`) is not used: it copies shards into /tmp/_wids_cache, prints on every construction,
  pickles index files next to the shards and does not notice truncation.
- CSV/TSV with `filepath` and `caption` columns (open_clip's CsvDataset layout): image paths are
  relative to `image_root` (default: the CSV's folder) and must stay inside it; an absolute path
  is accepted only inside the image root. A path outside counts as a bad sample.
- `read(ref)` returns (key, image bytes, caption) or raises BadSample with the reason.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.io import InputError, path_escape

log = logging.getLogger(__name__)

FIELD = "stage1.train_data"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
_META = re.compile(r"__[^/]*__($|/)")


class BadSample(Exception):
    """A sample that cannot be used; the message is the reason, in a few words."""


@dataclass
class ShardIndex:
    """Compact (numpy, fork-friendly) index of one tar: per sample its key and member spans."""

    path: str
    keys: np.ndarray  # bytes (UTF-8, surrogateescape) [n]
    image: np.ndarray  # int64 [n, 2]: offset, size of the preferred image member; -1 if none
    caption: np.ndarray  # int64 [n, 2]: offset, size of KEY.txt; -1 if none
    bad: dict[int, str]  # sample -> why it is unusable (cut, duplicate member, lost tail)
    problem: str | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return bytes(self.keys[i]).decode("utf-8", "surrogateescape")


_INDEX_CACHE: dict[tuple, ShardIndex] = {}


def _tar_members(path: str, size: int) -> tuple[list[tuple[str, int, int]], str | None]:
    members, problem = [], None
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isreg():
                    members.append((m.name, m.offset_data, m.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        problem = f"truncated or corrupt tar ({e})"
    if problem is None:
        end = 0
        if members:
            end = members[-1][1] + (members[-1][2] + 511) // 512 * 512
        if end > size:
            problem = "truncated tar"
        else:  # a complete tar has a zero (end-of-archive) block after its last member
            with open(path, "rb") as f:
                f.seek(end)
                block = f.read(512)
            if len(block) < 512 or block.count(0) != 512:
                problem = "truncated tar (no end-of-archive block)"
    return members, problem


def index_shard(path: str) -> ShardIndex:
    """Index one tar (cached per path, size and mtime)."""
    st = os.stat(path)
    cache_key = (path, st.st_size, st.st_mtime_ns)
    if cache_key in _INDEX_CACHE:
        return _INDEX_CACHE[cache_key]
    from webdataset.tariterators import base_plus_ext

    members, problem = _tar_members(path, st.st_size)
    keys, image, caption, bad, rank, exts = [], [], [], {}, [], set()
    for name, off, n in members:
        if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
            continue
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        ext = ext.lower()
        if not keys or keys[-1] != key:
            keys.append(key)
            image.append((-1, -1))
            caption.append((-1, -1))
            rank.append(len(IMAGE_EXTS))
            exts = set()
        i = len(keys) - 1
        if ext in exts:
            bad.setdefault(i, f"duplicate member {name}")
        exts.add(ext)
        if off + n > st.st_size:
            bad[i] = "truncated tar (member cut)"
        if ext == "txt":
            caption[i] = (off, n)
        elif ext in IMAGE_EXTS and IMAGE_EXTS.index(ext) < rank[i]:
            image[i], rank[i] = (off, n), IMAGE_EXTS.index(ext)
    if problem is not None:
        if not (keys and bad.get(len(keys) - 1, "").startswith("truncated")):
            keys.append("<end of shard>")  # stands for the samples lost after the cut
            image.append((-1, -1))
            caption.append((-1, -1))
            bad[len(keys) - 1] = problem
        log.warning("%s: %s; the %d samples before it are used", path, problem, len(keys) - 1)
    idx = ShardIndex(
        path,
        np.array([k.encode("utf-8", "surrogateescape") for k in keys], dtype=np.bytes_),
        np.array(image, dtype=np.int64).reshape(-1, 2),
        np.array(caption, dtype=np.int64).reshape(-1, 2),
        bad,
        problem,
    )
    _INDEX_CACHE[cache_key] = idx
    return idx


def _check_caption(raw) -> str:
    if raw is None:
        raise BadSample("missing caption (.txt)")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw.encode("utf-8").decode("utf-8")
    except UnicodeError:
        raise BadSample("caption not valid UTF-8") from None
    text = text.strip()
    if not text:
        raise BadSample("empty caption")
    return text


class TarSource:
    """Local webdataset shards; a unit is a shard, a ref is (shard, sample index)."""

    def __init__(self, spec: str):
        from webdataset.shardlists import expand_urls

        self.paths = expand_urls(spec)
        if not self.paths:
            raise InputError(f"{FIELD}: {spec!r} expands to no shard")
        remote = [p for p in self.paths if re.match(r"^[a-z][a-z0-9+]*:", p)]
        if remote:
            raise InputError(f"{FIELD}: only local shard files are supported, got {remote[0]!r}")
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise InputError(f"{FIELD}: {len(missing)} of {len(self.paths)} shards not found, first: {missing[0]}")
        self.indexes = [index_shard(p) for p in self.paths]
        self.counts = [len(ix) for ix in self.indexes]

    def describe(self, ref) -> str:
        ix = self.indexes[ref[0]]
        return f"{ix.path}:{ix.key(ref[1])}"

    def read(self, ref) -> tuple[str, bytes, str]:
        ix, i = self.indexes[ref[0]], ref[1]
        if i in ix.bad:
            raise BadSample(ix.bad[i])
        if ix.image[i, 0] < 0:
            raise BadSample(f"no image member (.{'/.'.join(IMAGE_EXTS)})")
        with open(ix.path, "rb") as f:
            caption = self._member(f, ix.caption[i])
            image = self._member(f, ix.image[i])
        return ix.key(i), image, _check_caption(caption)

    @staticmethod
    def _member(f, span) -> bytes | None:
        off, n = int(span[0]), int(span[1])
        if off < 0:
            return None
        f.seek(off)
        data = f.read(n)
        if len(data) != n:
            raise BadSample("truncated tar (member cut)")
        return data


class CsvSource:
    """A CSV/TSV with `filepath` and `caption` columns; a unit is a row, a ref is (row, 0)."""

    def __init__(self, path: str, image_key: str = "filepath", caption_key: str = "caption",
                 image_root: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{FIELD}: CSV file not found: {path}")
        self.root = Path(os.path.abspath(image_root or self.path.parent))
        if not self.root.is_dir():
            raise InputError(f"stage1.image_root: {self.root} is not a folder, expected the CSV images' root")
        with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            header = f.readline()
            f.seek(0)
            reader = csv.DictReader(f, delimiter="\t" if "\t" in header else ",")
            fields = reader.fieldnames or []
            lacking = [k for k in (image_key, caption_key) if k not in fields]
            if lacking:
                raise InputError(
                    f"{FIELD}: {path}: header lacks column(s) {', '.join(lacking)} (expected "
                    f"{image_key!r} and {caption_key!r}, separated by tab or comma; found {fields})"
                )
            self.rows = [(r[image_key], r[caption_key], reader.line_num) for r in reader]
        if not self.rows:
            raise InputError(f"{FIELD}: {path}: no data rows")
        self.counts = [1] * len(self.rows)

    def describe(self, ref) -> str:
        return f"{self.path}:line {self.rows[ref[0]][2]}"

    def read(self, ref) -> tuple[str, bytes, str]:
        image_path, caption, line = self.rows[ref[0]]
        if not image_path:
            raise BadSample("empty filepath")
        if os.path.isabs(image_path):
            full = Path(os.path.normpath(image_path))
            if self.root != full and self.root not in full.parents:
                raise BadSample(f"image path {image_path} is outside the image root {self.root}")
        else:
            escape = path_escape(image_path)
            if escape:
                raise BadSample(f"image path {image_path!r} {escape} {self.root}")
            full = self.root / image_path
        try:
            image = full.read_bytes()
        except OSError as e:
            raise BadSample(f"cannot read image file {full}: {e.strerror or e}") from None
        return f"line{line}", image, _check_caption(caption)


_URL = re.compile(r"^([a-z][a-z0-9+]*):")


def is_stream(spec: str) -> bool:
    """Whether any `::` source of train_data is a URL webdataset streams (pipe:, https://, ...), not a local path."""
    for part in spec.split("::"):
        m = _URL.match(part.strip())
        if m and m.group(1) != "file":
            return True
    return False


def open_source(source: str, image_root: str | None = None):
    if not source or not source.strip():
        raise InputError(f"{FIELD}: empty (give a shard pattern or a CSV)")
    if "::" not in source and source.lower().endswith((".csv", ".tsv")):
        return CsvSource(source, image_root=image_root)
    return TarSource(source)
