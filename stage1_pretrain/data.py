"""Stage-1 training data: webdataset shards or a CSV, deterministic per (seed, epoch, rank).

Random access by plan instead of a streaming shuffle buffer: batch j of an epoch is a pure
function of (source, seed, epoch, rank, world_size, batch size, j), the same with any number
of loader workers and after a resume (`skip_batches=k` starts at batch k without reading or
decoding anything before it).

- Sources (shards, CSV) and their indexing are in `sources.py`; URLs webdataset opens (pipe:, https://,
  ...) stream through `streaming.py` (a plan over shards instead of samples, exact resume from saved
  stream positions); `::` mixtures with upsampling factors weight the resampled shard draws.
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
  it, and at the end of the epoch) iteration raises common.io.InputError naming train_data.
  A truncated or unreadable tar keeps the samples before the cut and counts one bad sample
  for the cut.
- Views and sub-descriptions are seeded by (seed, epoch, key) (a replacement for a bad sample
  by (seed, epoch, key, rank, batch index, slot)), independent of the number of processes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from common.io import InputError

from .sources import FIELD, BadSample, index_shard, open_source
from .views import ImageDecodeError, load_rgb

__all__ = ["BadSample", "DataCounters", "build_train_loader", "index_shard", "open_source", "plan_epoch"]

log = logging.getLogger(__name__)

SHUFFLE_WINDOW_SHARDS = 8
_LOGGED_BAD = 20  # individual warnings per loader; then one every _LOG_EVERY
_LOG_EVERY = 1000


def derive_seed(*parts) -> int:
    """A 63-bit seed from printable parts, stable across processes and runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8", "backslashreplace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


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


def plan_epoch(counts, seed, epoch, rank, world_size, batch, samples_per_epoch, resample, weights=None):
    """(refs of this rank's batches [n_batches * batch, 2], fill pool [P, 2], n_batches).

    weights: per-unit draw weights for resampling (a weighted mixture's upsampling factors)."""
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
            drawn.append(rng.randrange(n_units) if weights is None else rng.choices(range(n_units), weights)[0])
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


def make_sample(key: str, image_bytes: bytes, caption: str, seed: int, image_transform, text_view_fn):
    """(key, views [V, 3, H, W], W text views) of one sample, its augmentations drawn from `seed`; BadSample else."""
    try:
        img = load_rgb(image_bytes)
    except ImageDecodeError as e:
        raise BadSample(str(e)) from None
    try:
        views = image_transform(img, seed)
    except Exception as e:  # odd geometry can break a transform; count it, do not crash the run
        raise BadSample(f"augmentation failed: {type(e).__name__}: {str(e)[:100]}") from None
    return key, views, list(text_view_fn(caption, random.Random(seed ^ 0x5EED)))


def collate(out: list, tokenizer, **extra) -> dict:
    """Samples from make_sample -> the batch dict the trainer reads (see TrainLoader); `extra` adds index/seen/..."""
    images = torch.stack([o[1] for o in out])
    flat = [t for o in out for t in o[2]]
    texts = tokenizer(flat).long().view(len(out), len(out[0][2]), -1)
    bad = extra.pop("bad_samples")
    return dict(images=images, texts=texts, keys=[o[0] for o in out], bad=len(bad), bad_samples=bad, **extra)


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
        except BadSample as e:
            raise BadSample(str(e)) from None
        # A planned sample's views depend on (seed, epoch, key) only, not on the rank layout, so the
        # union of N processes' batches is the 1-process batch, views included.
        seed, epoch, rank = self.where
        s = derive_seed(seed, epoch, key, *((rank, j, slot) if fill else ()))
        return make_sample(key, image_bytes, caption, s, self.image_transform, self.text_view_fn)

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
        return collate(out, self.tokenizer, index=j, seen=seen, bad_samples=bad)

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
    image_root: str | None = None,
    upsampling_factors: str = "",
    stream_positions: dict | None = None,
) -> TrainLoader:
    """The training batches of `epoch` for process `rank` of `world_size` (see module docstring).

    image_transform: callable (PIL RGB image, seed) -> [V, 3, H, W] (a views.MultiView);
    text_view_fn: callable (caption, random.Random) -> W strings (a subdescriptions.TextViews);
    tokenizer: open_clip tokenizer, list[str] -> LongTensor [n, L].
    A source with URLs (pipe:, https://, ...) streams (streaming.py; `stream_positions`: the checkpoint's);
    `upsampling_factors` weights a `::` mixture's shards when resampling (open_clip's syntax).
    """
    if batch_size_per_rank < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch/rank/world: batch={batch_size_per_rank} rank={rank} world_size={world_size}")
    from .streaming import build_stream_loader, is_stream, parse_sources

    if is_stream(source):
        return build_stream_loader(
            source, upsampling_factors, tokenizer=tokenizer, image_transform=image_transform,
            text_view_fn=text_view_fn, batch_size_per_rank=batch_size_per_rank, rank=rank, world_size=world_size,
            workers=workers, seed=seed, epoch=epoch, samples_per_epoch=samples_per_epoch, resample=resample,
            max_bad_fraction=max_bad_fraction, skip_batches=skip_batches, counters=counters,
            positions=stream_positions)
    if upsampling_factors and not resample:
        raise InputError("stage1.train_data_upsampling_factors: weights apply to shards drawn with replacement; "
                         "set stage1.resample_shards=true (as open_clip's --dataset-resampled)")
    src = open_source(source, image_root)
    weights = parse_sources(source, upsampling_factors)[1] if upsampling_factors else None
    if weights is not None and len(weights) != len(src.counts):
        raise InputError("stage1.train_data_upsampling_factors: weights apply to '::' mixtures of shard patterns, "
                         "not to a CSV")
    b = batch_size_per_rank
    refs, pool, n_batches = plan_epoch(src.counts, seed, epoch, rank, world_size, b, samples_per_epoch, resample,
                                       weights)
    ds = BatchDataset(src, refs, pool, n_batches, b, tokenizer, image_transform, text_view_fn, (seed, epoch, rank))
    return TrainLoader(ds, skip_batches, workers, max_bad_fraction, counters, derive_seed(seed, epoch, "loader"))
