"""Stage-1 data from shard URLs that webdataset opens (`pipe:...`, `https://`, `gs://`, ...) and weighted mixtures.

Sources. `stage1.train_data` is open_clip's syntax: sources separated by `::`, each a brace pattern
(`pipe:aws s3 cp s3://b/{0000..0999}.tar -::/data/cc12m/{000..099}.tar`). A source whose URLs have a
scheme is streamed through `webdataset.gopen` (its handlers: pipe, http(s), gs, ais, ...; s3 has
none in webdataset 0.2.86, so use `pipe:aws s3 cp s3://... -` or USE_AIS_FOR=s3); if any source
streams, all are streamed. `stage1.train_data_upsampling_factors` ("1::2", one number per source, as
open_clip's --train-data-upsampling-factors) gives every shard of a source that weight when shards
are drawn with replacement (`resample_shards`, required with factors, as in open_clip). Local-only
mixtures keep the random-access reader of data.py; only the shard draw is weighted.

Streams cannot seek, so an epoch is a plan over shards, not over samples:
- without resampling, the shards are shuffled by (seed, epoch); shard i goes to process i % world
  and, within a process, its j-th shard to loader worker j % workers (a "logical worker": workers 0
  counts as one). Each logical worker reads its shards in groups of GROUP_SHARDS consecutive shards,
  passes each group's samples through a shuffle buffer seeded by (seed, epoch, rank, worker, group)
  and drained at the group's end, and cuts batches from that sequence.
  GUARANTEE: no sample is read twice within an epoch (every shard has exactly one reader, read once).
  The epoch is samples_per_epoch // (batch x world) steps (required: a stream's size is unknown in
  advance); a logical worker that runs out of shards before its share stops the run with a one-line
  error, so leave a margin for uneven shards or use resample_shards.
- with resampling each logical worker draws shards with replacement (weights: the upsampling factors)
  from an RNG seeded by (seed, epoch, rank, worker); samples may repeat, as in open_clip.
RESUME IS EXACT: every batch carries its logical worker's position (group, samples taken from the
group); a checkpoint keeps the newest position per logical worker, and a resumed run reopens each
worker's group at that position, replays the deterministic buffer and skips the samples already
used without decoding them (at most one group per worker is read again). It needs the same number
of processes and loader workers (checked). Bad samples are skipped and counted (max_bad_fraction).
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator

import torch

from common.io import InputError

from .data import TrainLoader, _identity, collate, derive_seed, make_sample
from .sources import FIELD, IMAGE_EXTS, BadSample, _check_caption, is_stream

GROUP_SHARDS = 4
SHUFFLE_BUFFER = 2000  # samples (raw bytes) held per logical worker; open_clip's default buffer is 5000
_SCHEME = re.compile(r"^([a-z][a-z0-9+]*):")
FACTORS_FIELD = "stage1.train_data_upsampling_factors"


def _scheme(url: str) -> str | None:
    m = _SCHEME.match(url)
    return m.group(1) if m and m.group(1) != "file" else None


def parse_sources(spec: str, factors: str = "") -> tuple[list[str], list[float] | None]:
    """(shard URLs in order, per-shard weights or None) from open_clip's `A::B` + `wA::wB` syntax."""
    from webdataset.shardlists import expand_urls

    sources = [s.strip() for s in spec.split("::")]
    if any(not s for s in sources):
        raise InputError(f"{FIELD}: {spec!r} has an empty source between '::' separators")
    urls, weights = [], []
    values = _factors(factors, len(sources)) if factors else [1.0] * len(sources)
    for source, w in zip(sources, values, strict=True):
        expanded = expand_urls(source)
        if not expanded:
            raise InputError(f"{FIELD}: source {source!r} expands to no shard")
        urls += expanded
        weights += [w] * len(expanded)  # open_clip: a source's factor is the weight of each of its shards
    return urls, (weights if factors else None)


def _factors(factors: str, n_sources: int) -> list[float]:
    parts = factors.split("::")
    if len(parts) != n_sources:
        raise InputError(f"{FACTORS_FIELD}: {len(parts)} factor(s) for {n_sources} source(s) in {FIELD}, "
                         "expected one per '::' source")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"{FACTORS_FIELD}: {factors!r} is not '::'-separated numbers") from None
    if any(not v > 0 for v in values):
        raise InputError(f"{FACTORS_FIELD}: factors must be positive, got {factors!r}")
    return values


def check_url(url: str) -> None:
    """Refuse, in one line, a URL scheme webdataset has no handler for (before any worker starts)."""
    from webdataset.gopen import gopen_schemes

    scheme = _scheme(url)
    if scheme is not None and scheme not in gopen_schemes:
        hint = " (e.g. pipe:aws s3 cp s3://bucket/shard.tar -, or USE_AIS_FOR=s3)" if scheme == "s3" else ""
        raise InputError(f"{FIELD}: webdataset has no handler for {scheme}:// URLs{hint}: {url}")


# ------------------------------------------------------------------------------------------ reading

def shard_samples(url: str) -> Iterator[tuple[str, bytes | None, str | None, str | None]]:
    """(key, image bytes, caption, problem) for each sample of one shard, streamed in order.

    Members are grouped as data.py's indexed reader groups them (webdataset's key rule, consecutive
    members with one key, `__meta__` skipped); a stream that breaks yields one sample with the problem.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    key, files = None, {}
    stream = None
    try:
        stream = gopen(url)
        for member in tar_file_iterator(stream):
            k, ext = base_plus_ext(member["fname"])
            if k is None:
                continue
            if k != key:
                if key is not None:
                    yield _sample_of(key, files)
                key, files = k, {}
            ext = ext.lower()
            if ext in files:
                files.setdefault("__dup__", []).append(ext)
            files[ext] = member["data"]
        if key is not None:
            yield _sample_of(key, files)
    except Exception as e:  # truncated tar, failed download, pipe command exiting non-zero
        yield f"{url}:<end of stream>", None, None, f"unreadable stream ({type(e).__name__}: {str(e)[:160]})"
    finally:
        _close(stream)


def _close(stream) -> None:
    if stream is not None:
        # a Pipe reports its command's exit status on close; a broken stream has already said so as a sample
        with contextlib.suppress(Exception):
            stream.close()


def _sample_of(key: str, files: dict) -> tuple[str, bytes | None, str | None, str | None]:
    if "__dup__" in files:
        return key, None, None, f"duplicate member(s) .{', .'.join(files['__dup__'])}"
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if image is None:
        return key, None, None, f"no image member (.{'/.'.join(IMAGE_EXTS)})"
    try:
        return key, image, _check_caption(files.get("txt")), None
    except BadSample as e:
        return key, None, None, str(e)


def shuffled(items: Iterator, rng: random.Random, size: int) -> Iterator:
    """A shuffle buffer of `size` (webdataset-style), drained in random order at the end: deterministic in rng."""
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf


# --------------------------------------------------------------------------------------------- plan

def worker_groups(urls, weights, *, seed, epoch, rank, world, worker, workers, resample) -> Iterator[list[str]]:
    """The shard groups one logical worker reads in an epoch (module docstring); infinite when resampling."""
    if resample:
        rng = random.Random(derive_seed(seed, epoch, rank, worker, "stream-resample"))
        population = range(len(urls))
        while True:
            yield [urls[i] for i in rng.choices(population, weights=weights, k=GROUP_SHARDS)]
    order = list(range(len(urls)))
    random.Random(derive_seed(seed, epoch, "units")).shuffle(order)  # data.plan_epoch's shard order
    mine = order[rank::world][worker::workers]
    for g in range(0, len(mine), GROUP_SHARDS):
        yield [urls[i] for i in mine[g:g + GROUP_SHARDS]]


def group_stream(group: list[str], seed_parts: tuple) -> Iterator[tuple]:
    samples = (s for url in group for s in shard_samples(url))
    return shuffled(samples, random.Random(derive_seed(*seed_parts)), SHUFFLE_BUFFER)


class StreamBatches(torch.utils.data.IterableDataset):
    """The batches of one epoch on one process; each DataLoader worker serves one logical worker (docstring)."""

    def __init__(self, urls, weights, *, batch, n_batches, skip_batches, positions, seed, epoch, rank, world,
                 workers, resample, tokenizer, image_transform, text_view_fn):
        super().__init__()
        self.urls, self.weights, self.batch, self.n_batches = urls, weights, batch, n_batches
        self.skip, self.positions = skip_batches, positions
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.workers, self.resample = max(1, workers), resample
        self.tokenizer, self.image_transform, self.text_view_fn = tokenizer, image_transform, text_view_fn

    def __len__(self) -> int:
        return self.n_batches

    def logical_worker(self) -> int:
        info = torch.utils.data.get_worker_info()
        # DataLoader serves its workers round-robin from worker 0: after `skip` batches, batch `skip` is
        # logical worker skip % workers's, so DataLoader worker w plays logical worker (w + skip) % workers.
        return ((info.id if info is not None else 0) + self.skip) % self.workers

    def __iter__(self):
        lw = self.logical_worker()
        mine = range(lw, self.n_batches, self.workers)
        todo = len(mine) - len(range(lw, self.skip, self.workers))
        if todo <= 0:
            return
        yield from self._batches(lw, todo, mine[len(mine) - todo])

    def _batches(self, lw: int, todo: int, index: int) -> Iterator[dict]:
        """`todo` batches of logical worker `lw`, the first with epoch index `index`, from its saved position on."""
        group0, pos0 = self.positions.get(lw, (0, 0))
        out, bad, seen, made = [], [], 0, 0
        groups = worker_groups(self.urls, self.weights, seed=self.seed, epoch=self.epoch, rank=self.rank,
                               world=self.world, worker=lw, workers=self.workers, resample=self.resample)
        for g, group in enumerate(groups):
            if g < group0:
                continue  # used before the checkpoint: not opened again (the shard draws still advance)
            taken = 0
            for key, image, caption, problem in group_stream(group, (self.seed, self.epoch, self.rank, lw, g)):
                taken += 1
                if g == group0 and taken <= pos0:
                    continue  # used before the checkpoint: replayed through the buffer, not decoded
                seen += 1
                try:
                    if problem:
                        raise BadSample(problem)
                    seed = derive_seed(self.seed, self.epoch, key)  # as data.py: views depend on the key only
                    out.append(make_sample(key, image, caption, seed, self.image_transform, self.text_view_fn))
                except BadSample as e:
                    bad.append(f"{key} in {group} ({e})")
                if len(out) == self.batch:
                    yield collate(out, self.tokenizer, index=index, seen=seen, bad_samples=bad, stream=[lw, g, taken])
                    index, made, out, bad, seen = index + self.workers, made + 1, [], [], 0
                    if made == todo:
                        return
        raise InputError(
            f"{FIELD}: the shards of process {self.rank}, loader worker {lw} ran out after {made} of its {todo} "
            f"remaining batches in epoch {self.epoch}: stage1.samples_per_epoch is more than these shards hold "
            "(lower it, add shards, or set stage1.resample_shards=true)"
            + (f"; {len(bad)} unreadable sample(s) since its last batch, first: {bad[0]}" if bad else ""))


class StreamLoader(TrainLoader):
    """TrainLoader (length, counters, bad-fraction checks) over StreamBatches: one logical worker per DataLoader worker."""

    def __init__(self, dataset: StreamBatches, skip_batches: int, workers: int, max_bad_fraction: float, counters):
        super().__init__(dataset, skip_batches, workers, max_bad_fraction, counters, loader_seed=0)

    def _batches(self):
        if self.workers <= 0:
            return iter(self.dataset)
        return iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                                collate_fn=_identity))


def build_stream_loader(source: str, factors: str, *, tokenizer, image_transform, text_view_fn, batch_size_per_rank,
                        rank, world_size, workers, seed, epoch, samples_per_epoch, resample, max_bad_fraction,
                        skip_batches=0, counters=None, positions=None) -> StreamLoader:
    """The streamed batches of `epoch` for process `rank` (module docstring); `positions`: the checkpoint's."""
    if not samples_per_epoch:
        raise InputError(f"stage1.samples_per_epoch: required when {FIELD} is streamed ({source!r}): a stream's "
                         "size is unknown until it has been read")
    if factors and not resample:
        raise InputError(f"{FACTORS_FIELD}: weights apply to shards drawn with replacement; set "
                         "stage1.resample_shards=true (as open_clip's --dataset-resampled)")
    urls, weights = parse_sources(source, factors)
    for url in urls:
        check_url(url)
    n_batches = samples_per_epoch // (batch_size_per_rank * world_size)
    if n_batches < 1:
        raise InputError(f"stage1.samples_per_epoch: {samples_per_epoch} is not one batch of {batch_size_per_rank} "
                         f"per process for {world_size} process(es)")
    saved = positions or {"workers": max(1, workers), "positions": {}}
    if saved["workers"] != max(1, workers):
        raise InputError(f"stage1.workers: the checkpoint's stream positions are for {saved['workers']} loader "
                         f"worker(s), this run has {max(1, workers)}; resume with the same number")
    pos = {int(k): tuple(v) for k, v in saved["positions"].items()}
    ds = StreamBatches(urls, weights, batch=batch_size_per_rank, n_batches=n_batches, skip_batches=skip_batches,
                       positions=pos, seed=seed, epoch=epoch, rank=rank, world=world_size, workers=workers,
                       resample=resample, tokenizer=tokenizer, image_transform=image_transform,
                       text_view_fn=text_view_fn)
    return StreamLoader(ds, skip_batches, workers, max_bad_fraction, counters)


def track(positions: dict | None, workers: int, batch: dict) -> dict:
    """The stream positions after consuming `batch` (checkpointed as JSON)."""
    out = {"workers": max(1, workers), "positions": dict((positions or {}).get("positions", {}))}
    lw, group, taken = batch["stream"]
    out["positions"][str(lw)] = [group, taken]
    return out


def gather_positions(positions: dict | None, world: int) -> list | None:
    """Every process's stream positions (a checkpoint holds all ranks'); None for a source that does not stream."""
    every = [positions]
    if world > 1:
        every = [None] * world
        torch.distributed.all_gather_object(every, positions)
    return every if any(p is not None for p in every) else None


def rank_positions(saved: list | None, rank: int, world: int) -> dict | None:
    if saved is None:
        return None
    if len(saved) != world:
        raise InputError(f"stage1.nproc: the checkpoint's stream positions are for {len(saved)} process(es), this run "
                         f"has {world}; an exact resume of a stream needs the same number")
    return saved[rank]


__all__ = ["build_stream_loader", "gather_positions", "is_stream", "parse_sources", "rank_positions", "track"]
