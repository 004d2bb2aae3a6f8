"""Stage-1 training data: webdataset shards or a CSV, deterministic per (seed, epoch, rank).

Random access by plan instead of a streaming shuffle buffer: batch j of an epoch is a pure
function of (source, seed, epoch, rank, world_size, batch size, j), the same with any number
of loader workers and after a resume (`skip_batches=k` starts at batch k without reading or
decoding anything before it).

- Shards (img2dataset layout: KEY.jpg|jpeg|png|webp + KEY.txt [+ KEY.json]): the pattern is
  expanded by webdataset's `expand_urls` (braces, "::" lists); each tar is indexed once per
  process by scanning its headers (Python `tarfile`: member offsets, no data read) with
  webdataset's key rule (`base_plus_ext`, lower-cased extensions, consecutive members with
  one key form a sample, `__meta__` members skipped). webdataset 0.2.86's own indexed reader
  (`wids`) is not used: it copies shards into /tmp/_wids_cache, prints on every construction,
  pickles index files next to the shards and does not notice truncation.
- Epoch plan: shards are shuffled by (seed, epoch), their samples permuted within windows of
  8 consecutive shards (wider than open_clip's 5000-sample buffer, reads stay local), and
  sample i of that sequence goes to rank i % world_size. Ranks never share a sample, every
  rank gets (N // world_size) // batch batches in every epoch, the remainder is dropped. A
  CSV is the same with one "shard" per row (rows permuted by (seed, epoch), row i of the
  permutation to rank i % world_size).
- Resampling (`resample=True`): each rank draws shards with replacement from all shards,
  seeded by (seed, epoch, rank); samples_per_epoch is global: the epoch has
  samples_per_epoch // (batch * world_size) batches per rank; ranks may repeat each other's
  samples (as open_clip's --dataset-resampled).
- Bad samples (undecodable or too large image, missing/empty/non-UTF-8 caption, truncated
  tar member, missing CSV image file) are counted and replaced by draws from the rank's own
  samples seeded by (seed, epoch, rank, batch index), so batches always have the full size.
  When bad/seen exceeds max_bad_fraction (checked once enough samples are seen to measure
  it, and at the end of the epoch) iteration raises pipeline.io.InputError naming train_data.
  A truncated or unreadable tar keeps the samples before the cut and counts one bad sample
  for the cut.
- Views and sub-descriptions are seeded by (seed, epoch, key) (a replacement for a bad sample
  by (seed, epoch, key, rank, batch index, slot)), independent of the number of processes.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import random
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.io import InputError

from .views import ImageDecodeError, load_rgb

log = logging.getLogger(__name__)

FIELD = "stage1.train_data"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
SHUFFLE_WINDOW_SHARDS = 8
_META = re.compile(r"__[^/]*__($|/)")
_LOGGED_BAD = 20  # individual warnings per loader; then one every _LOG_EVERY
_LOG_EVERY = 1000


def derive_seed(*parts) -> int:
    """A 63-bit seed from printable parts, stable across processes and runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8", "backslashreplace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class BadSample(Exception):
    """A sample that cannot be used; the message is the reason, in a few words."""


# ---------------------------------------------------------------------------- sources


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

    def __init__(self, path: str, image_key: str = "filepath", caption_key: str = "caption"):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{FIELD}: CSV file not found: {path}")
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
        full = Path(image_path)
        if not full.is_absolute():
            full = self.path.parent / full
        try:
            image = full.read_bytes()
        except OSError as e:
            raise BadSample(f"cannot read image file {full}: {e.strerror or e}") from None
        return f"line{line}", image, _check_caption(caption)


def open_source(source: str):
    if not source or not source.strip():
        raise InputError(f"{FIELD}: empty (give a shard pattern or a CSV)")
    if "::" not in source and source.lower().endswith((".csv", ".tsv")):
        return CsvSource(source)
    return TarSource(source)


# ------------------------------------------------------------------------------ plan


def _window_refs(units, counts, seed_parts, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Refs (unit, i) of `units` in order, permuted within windows of consecutive units;
    of that sequence, the elements at positions p with p % world_size == rank."""
    chunks, offset = [], 0
    for w in range(0, len(units), SHUFFLE_WINDOW_SHARDS):
        window = [u for u in units[w : w + SHUFFLE_WINDOW_SHARDS] if counts[u]]
        if not window:
            continue
        refs = np.concatenate([np.stack([np.full(counts[u], u), np.arange(counts[u])], 1) for u in window])
        rng = np.random.Generator(np.random.PCG64(derive_seed(*seed_parts, w)))
        refs = refs[rng.permutation(len(refs))]
        chunks.append(refs[(rank - offset) % world_size :: world_size])
        offset += len(refs)
    return np.concatenate(chunks) if chunks else np.zeros((0, 2), dtype=np.int64)


def plan_epoch(counts, seed, epoch, rank, world_size, batch, samples_per_epoch, resample):
    """(refs of this rank's batches [n_batches * batch, 2], fill pool [P, 2], n_batches)."""
    n_units, total = len(counts), sum(counts)
    if total == 0:
        raise InputError(f"{FIELD}: no samples found")
    if resample:
        if not samples_per_epoch:
            raise InputError("stage1.samples_per_epoch: required with resample_shards")
        n_batches = samples_per_epoch // (batch * world_size)
        rng = random.Random(derive_seed(seed, epoch, rank, "resample"))
        drawn, have = [], 0
        while have < max(n_batches * batch, 1):
            drawn.append(rng.randrange(n_units))
            have += counts[drawn[-1]]
        pool = _window_refs(drawn, counts, (seed, epoch, rank, "resample-window"))
    else:
        order = list(range(n_units))
        random.Random(derive_seed(seed, epoch, "units")).shuffle(order)
        n_batches = total // world_size // batch
        if samples_per_epoch:
            if samples_per_epoch > n_batches * batch * world_size:
                log.warning(
                    "%s: samples_per_epoch=%d exceeds the %d samples used per epoch",
                    FIELD,
                    samples_per_epoch,
                    n_batches * batch * world_size,
                )
            n_batches = min(n_batches, samples_per_epoch // (batch * world_size))
        pool = _window_refs(order, counts, (seed, epoch, "window"), rank, world_size)
    if n_batches < 1:
        raise InputError(
            f"{FIELD}: not one full batch of {batch} per process for {world_size} process(es) "
            f"({total} samples in {n_units} unit(s); samples_per_epoch={samples_per_epoch})"
        )
    return pool[: n_batches * batch], pool, n_batches


# --------------------------------------------------------------------------- batches


class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item j is the whole batch j of the epoch plan."""

    def __init__(self, source, refs, pool, n_batches, batch, tokenizer, image_transform, text_view_fn, where):
        self.source, self.refs, self.pool, self.n_batches = source, refs, pool, n_batches
        self.batch, self.tokenizer = batch, tokenizer
        self.image_transform, self.text_view_fn = image_transform, text_view_fn
        self.where = where  # (seed, epoch, rank): with the batch index, the root of all per-sample seeds

    def __len__(self) -> int:
        return self.n_batches

    def _sample(self, ref, j: int, slot: int, fill: bool = False):
        try:
            key, image_bytes, caption = self.source.read(ref)
            img = load_rgb(image_bytes)
        except (BadSample, ImageDecodeError) as e:
            raise BadSample(str(e)) from None
        # A planned sample's views depend on (seed, epoch, key) only, not on the rank layout, so the
        # union of N processes' batches is the 1-process batch, views included.
        seed, epoch, rank = self.where
        s = derive_seed(seed, epoch, key, *((rank, j, slot) if fill else ()))
        try:
            views = self.image_transform(img, s)
        except Exception as e:  # odd geometry can break a transform; count it, do not crash the run
            raise BadSample(f"augmentation failed: {type(e).__name__}: {str(e)[:100]}") from None
        texts = list(self.text_view_fn(caption, random.Random(s ^ 0x5EED)))
        return key, views, texts

    def __getitem__(self, j: int) -> dict:
        if not 0 <= j < self.n_batches:
            raise IndexError(j)
        slots = [tuple(int(x) for x in r) for r in self.refs[j * self.batch : (j + 1) * self.batch]]
        out: list = [None] * len(slots)
        bad, seen = [], 0
        for slot, ref in enumerate(slots):
            seen += 1
            try:
                out[slot] = self._sample(ref, j, slot)
            except BadSample as e:
                bad.append(f"{self.source.describe(ref)} ({e})")
        missing = [s for s, o in enumerate(out) if o is None]
        if missing:
            seen += self._fill(out, missing, set(slots), j, bad)
        keys = [o[0] for o in out]
        images = torch.stack([o[1] for o in out])
        flat = [t for o in out for t in o[2]]
        n_text = len(out[0][2])
        texts = self.tokenizer(flat).long().view(len(out), n_text, -1)
        return dict(images=images, texts=texts, keys=keys, index=j, seen=seen, bad=len(bad), bad_samples=bad)

    def _fill(self, out, missing, used, j, bad) -> int:
        """Replace bad slots by draws from the rank's pool, seeded by batch index; returns samples tried."""
        rng = random.Random(derive_seed(*self.where, j, "fill"))
        tried = 0
        for draw in range(10 * self.batch + 100):
            ref = tuple(int(x) for x in self.pool[rng.randrange(len(self.pool))])
            if ref in used and draw < 2 * self.batch + 20:  # avoid in-batch duplicates while we can
                continue
            used.add(ref)
            tried += 1
            try:
                out[missing[0]] = self._sample(ref, j, missing[0], fill=True)
                missing.pop(0)
            except BadSample as e:
                bad.append(f"{self.source.describe(ref)} ({e})")
            if not missing:
                return tried
        raise InputError(
            f"{FIELD}: could not fill batch {j}: {len(bad)} unreadable samples; first bad: {bad[0] if bad else '?'}"
        )


# ---------------------------------------------------------------------------- loader


@dataclass
class DataCounters:
    """Samples tried (`seen`) and skipped as unreadable (`bad`); restorable via DataCounters(**d)."""

    seen: int = 0
    bad: int = 0
    first_bad: str | None = None
    recent_bad: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _identity(x):
    return x


class TrainLoader:
    """Iterable over the batches skip_batches .. num_batches-1 of one epoch on one rank.

    Each batch is a dict: images float [B, V, 3, H, W], texts long [B, W, L], keys list[str]
    (B entries), index (batch number in the epoch), seen/bad (samples tried / skipped for
    this batch), bad_samples (their descriptions). `counters` accumulates seen/bad.
    """

    def __init__(self, dataset: BatchDataset, skip_batches, workers, max_bad_fraction, counters, loader_seed: int):
        self.dataset = dataset
        self.num_batches = len(dataset)
        if not 0 <= skip_batches <= self.num_batches:
            raise ValueError(f"skip_batches={skip_batches} outside [0, {self.num_batches}]")
        self.skip_batches, self.workers = skip_batches, workers
        self.max_bad_fraction = max_bad_fraction
        self.counters = counters if counters is not None else DataCounters()
        self._loader_seed = loader_seed
        frac = max_bad_fraction
        self._min_seen = 1 if frac <= 0 else max(100, math.ceil(10 / frac))  # enough to measure frac
        self._logged = 0

    def __len__(self) -> int:
        return self.num_batches - self.skip_batches

    def _batches(self):
        indices = range(self.skip_batches, self.num_batches)
        if self.workers <= 0:
            return (self.dataset[j] for j in indices)
        return iter(
            torch.utils.data.DataLoader(
                self.dataset,
                batch_size=None,
                sampler=indices,
                num_workers=self.workers,
                collate_fn=_identity,
                # own generator: iterating must not consume the trainer's global torch RNG
                generator=torch.Generator().manual_seed(self._loader_seed),
            )
        )

    def __iter__(self):
        for b in self._batches():
            self._count(b)
            self.check(final=False)
            yield b
        self.check(final=True)

    def _count(self, b: dict) -> None:
        c = self.counters
        c.seen += b["seen"]
        c.bad += b["bad"]
        for desc in b["bad_samples"]:
            if c.first_bad is None:
                c.first_bad = desc
            c.recent_bad = [*c.recent_bad[-9:], desc]
            self._logged += 1
            if self._logged <= _LOGGED_BAD or self._logged % _LOG_EVERY == 0:
                log.warning("%s: skipped unreadable sample %s [%d of %d so far]", FIELD, desc, c.bad, c.seen)

    def check(self, final: bool = True) -> None:
        """Raise InputError when the unreadable fraction exceeds max_bad_fraction."""
        c = self.counters
        if c.seen == 0 or c.bad <= self.max_bad_fraction * c.seen:
            return
        if final or c.seen >= self._min_seen:
            raise InputError(
                f"{FIELD}: {c.bad} of {c.seen} samples ({100 * c.bad / c.seen:.1f}%) unreadable, more than "
                f"max_bad_fraction={100 * self.max_bad_fraction:g}%: first bad: {c.first_bad}"
            )


def build_train_loader(
    source: str,
    *,
    tokenizer,
    image_transform,
    text_view_fn,
    batch_size_per_rank: int,
    rank: int,
    world_size: int,
    workers: int,
    seed: int,
    epoch: int,
    samples_per_epoch: int | None,
    resample: bool,
    max_bad_fraction: float,
    skip_batches: int = 0,
    counters: DataCounters | None = None,
) -> TrainLoader:
    """The training batches of `epoch` for process `rank` of `world_size` (see module docstring).

    image_transform: callable (PIL RGB image, seed) -> [V, 3, H, W] (a views.MultiView);
    text_view_fn: callable (caption, random.Random) -> W strings (a subdescriptions.TextViews);
    tokenizer: open_clip tokenizer, list[str] -> LongTensor [n, L].
    """
    if batch_size_per_rank < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch/rank/world: batch={batch_size_per_rank} rank={rank} world_size={world_size}")
    src = open_source(source)
    b = batch_size_per_rank
    refs, pool, n_batches = plan_epoch(src.counts, seed, epoch, rank, world_size, b, samples_per_epoch, resample)
    ds = BatchDataset(src, refs, pool, n_batches, b, tokenizer, image_transform, text_view_fn, (seed, epoch, rank))
    return TrainLoader(ds, skip_batches, workers, max_bad_fraction, counters, derive_seed(seed, epoch, "loader"))
