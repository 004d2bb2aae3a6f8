"""Stage-2 training data: LLaVA records to padded batches, and LLaVA's length-grouped batch order.

- `ImageLoader`: RGB image, LLaVA's `expand2square` (pad to a square with the image-processor mean
  colour), then the model's own image processor (resize, crop, normalise), so training sees what
  inference sees. A processor with `do_pad=True` (LlavaImageProcessor) pads the same way, so the
  padding here is then a no-op; with a processor that does not pad, inference will not pad either.
  `pad=False` is LLaVA's `image_aspect_ratio` other than "pad" (its pretrain phase): no padding, the
  processor's resize + centre crop only (its own `do_pad` switched off for the call).
  Decoding is common.images' `decode_image` with LLaVA's alpha handling (`convert("RGB")` drops it);
  16/32-bit grey images are rescaled to 8 bits. A missing, undecodable or oversized file raises
  `ImageError` (a ValueError) naming the file.
- `LlavaDataset`: one record -> input_ids / labels (`tokenize_and_mask` with the phase template, the
  image token expanded to the tower's feature count, truncated at model_max_length), plus the image's
  pixel values, or its cached tower features (`features=`), or nothing for a text-only record.
  A bad record (unreadable image, template refusal, image token cut off, tokenization mismatch) raises
  InputError naming the record, or with `skip_bad=True` is counted and replaced by the next good
  record (so batch shapes stay fixed); the counts travel with the batch (`n_bad`, `n_mismatch`).
- `Collator`: right padding (pad id / -100 / attention mask 0), images stacked in sample order, which
  is the order LlavaForConditionalGeneration consumes them in; `image_index` names the image samples.
- `StepBatchSampler`: the order of one epoch as LLaVA's `LengthGroupedSampler(group_by_modality=True)`
  builds it (HF Trainer + accelerate layout: megabatches of one global batch, per-device chunks of
  balanced length), seeded by (seed, epoch), and this rank's micro-batches from a given step on.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from common.images import MAX_PIXELS, ImageDecodeError, decode_image
from common.io import InputError
from stage2_llava.llava_json import Record
from stage2_llava.preprocess import IGNORE_INDEX, expand_image_tokens, tokenize_and_mask

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- images

def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: paste the image centred on a square canvas of `background`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def pad_color(image_processor) -> tuple[int, int, int]:
    """The image-mean colour LLaVA pads with (`tuple(int(x * 255) for x in image_mean)`)."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file, the problem and what was expected."""


class ImageLoader:
    """Path relative to `image_folder` -> normalised [3, H, W] float tensor, as the model's processor makes it."""

    def __init__(self, image_processor, image_folder: str | os.PathLike | None, pad: bool = True):
        self.processor = image_processor
        self.folder = None if image_folder is None else str(image_folder)
        self.background = pad_color(image_processor)
        self.pad = pad
        # a LlavaImageProcessor pads by itself (do_pad=True); without padding it must be told not to
        self.call_kwargs = {} if pad or not getattr(image_processor, "do_pad", False) else {"do_pad": False}

    def path(self, rel: str) -> str:
        if self.folder is None:
            raise InputError(f"image {rel!r}: no image folder given")
        return os.path.join(self.folder, rel)

    def open(self, rel: str) -> Image.Image:
        try:
            rgb = decode_image(self.path(rel), composite_alpha=False)
        except FileNotFoundError:
            raise ImageError(f"image file {rel!r} not found in {self.folder}, expected an existing file") from None
        except ImageDecodeError as e:
            raise ImageError(f"image {rel!r}: {e}; expected a decodable image of at most {MAX_PIXELS} pixels") from None
        return expand2square(rgb, self.background) if self.pad else rgb

    def __call__(self, rel: str) -> torch.Tensor:
        return self.processor(images=self.open(rel), return_tensors="pt", **self.call_kwargs)["pixel_values"][0]


# ---------------------------------------------------------------------------------------- dataset

class _Mismatch(ValueError):
    pass


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA records -> {"input_ids", "labels", "pixel_values"|"image_features"|None, counts} (module docstring)."""

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer,
        image_loader: ImageLoader,
        *,
        template: str,
        image_token_id: int,
        num_image_tokens: int,
        model_max_length: int,
        skip_bad: bool = False,
        features: Callable[[str], torch.Tensor] | None = None,
        max_warnings: int = 20,
    ):
        if not records:
            raise InputError("the stage-2 dataset has no records, expected at least one")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.images = image_loader
        self.template = template
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.model_max_length = model_max_length
        self.skip_bad = skip_bad
        self.features = features
        self.max_warnings = max_warnings
        self._warned = 0

    def __len__(self) -> int:
        return len(self.records)

    def tokenize(self, rec: Record) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and labels of one record, image token expanded, at most model_max_length long."""
        out = tokenize_and_mask(
            rec.conversations, self.tokenizer, self.template, self.image_token_id,
            self.model_max_length, rec.has_image,
        )
        if out["mismatch"]:
            raise _Mismatch(f"tokenization mismatch with the {self.template} template (all labels would be ignored)")
        ids, labels = out["input_ids"], out["labels"]
        if rec.has_image:
            ids, labels = expand_image_tokens(ids, labels, self.num_image_tokens, self.image_token_id,
                                              max_length=self.model_max_length)
        return ids, labels

    def load(self, i: int) -> dict:
        """Sample `i` or an exception describing why the record is unusable."""
        rec = self.records[i]
        ids, labels = self.tokenize(rec)
        item = {"input_ids": ids, "labels": labels, "pixel_values": None, "image_features": None}
        if rec.has_image:
            if self.features is not None:
                item["image_features"] = self.features(rec.image)
            else:
                item["pixel_values"] = self.images(rec.image)
        return item

    def _describe(self, i: int, err: Exception) -> str:
        return f"stage-2 data: record {self.records[i].id} (index {i}): {err}"

    def __getitem__(self, i: int) -> dict:
        n_bad = n_mismatch = 0
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            try:
                item = self.load(j)
            except (OSError, ValueError) as e:  # InputError and PIL's UnidentifiedImageError are among these
                if not self.skip_bad:
                    raise InputError(self._describe(j, e)) from None
                n_mismatch += isinstance(e, _Mismatch)
                n_bad += not isinstance(e, _Mismatch)
                if self._warned < self.max_warnings:
                    self._warned += 1
                    log.warning("skipped %s", self._describe(j, e))
                continue
            item.update(index=j, n_bad=n_bad, n_mismatch=n_mismatch)
            return item
        raise InputError(f"stage-2 data: none of the {len(self)} records is usable")


@dataclass
class Collator:
    """Samples -> a right-padded batch; images stacked in sample order (module docstring)."""

    pad_token_id: int

    def __call__(self, items: Sequence[dict]) -> dict:
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for b, it in enumerate(items):
            k = len(it["input_ids"])
            ids[b, :k], labels[b, :k], mask[b, :k] = it["input_ids"], it["labels"], 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": None,
                 "image_features": None}
        for key in ("pixel_values", "image_features"):
            got = [it[key] for it in items if it[key] is not None]
            if got:
                batch[key] = torch.stack(got)
        has_image = [b for b, it in enumerate(items) if it["pixel_values"] is not None or it["image_features"] is not None]
        batch["image_index"] = torch.tensor(has_image, dtype=torch.long)
        batch["index"] = torch.tensor([it.get("index", -1) for it in items], dtype=torch.long)
        batch["n_bad"] = sum(it.get("n_bad", 0) for it in items)
        batch["n_mismatch"] = sum(it.get("n_mismatch", 0) for it in items)
        return batch


# ---------------------------------------------------------------------------------------- sampler

def _split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """LLaVA's `split_to_even_chunks`: equal-size chunks of balanced total length (greedy)."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = math.inf
    return chunks


def _length_grouped(lengths: Sequence[int], batch_size: int, num_chunks: int, g: torch.Generator) -> list[int]:
    """LLaVA's `get_length_grouped_indices`: shuffle, cut into megabatches, sort each by length, balance chunks."""
    order = torch.randperm(len(lengths), generator=g).tolist()
    mega = batch_size * num_chunks
    out = []
    for start in range(0, len(order), mega):
        megabatch = sorted(order[start:start + mega], key=lambda i: lengths[i], reverse=True)
        out += [i for chunk in _split_to_even_chunks(megabatch, lengths, num_chunks) for i in chunk]
    return out


def modality_grouped_order(lengths: Sequence[int], batch_size: int, num_chunks: int, g: torch.Generator) -> list[int]:
    """LLaVA's `get_modality_length_grouped_indices` (lengths > 0: image samples, < 0: text-only).

    Megabatches hold one modality; their order is shuffled; the two leftover partial megabatches form
    one mixed megabatch at the end. Unlike LLaVA, every shuffle uses the seeded generator (LLaVA draws
    the per-modality shuffles from the global RNG).
    """
    if any(n == 0 for n in lengths):
        raise ValueError("modality lengths must be non-zero (positive: image, negative: text-only)")
    if all(n > 0 for n in lengths) or all(n < 0 for n in lengths):
        return _length_grouped([abs(n) for n in lengths], batch_size, num_chunks, g)
    mm = [i for i, n in enumerate(lengths) if n > 0]
    lang = [i for i, n in enumerate(lengths) if n < 0]
    mm_order = [mm[i] for i in _length_grouped([lengths[i] for i in mm], batch_size, num_chunks, g)]
    lang_order = [lang[i] for i in _length_grouped([-lengths[i] for i in lang], batch_size, num_chunks, g)]
    mega = batch_size * num_chunks
    mm_mb = [mm_order[i:i + mega] for i in range(0, len(mm_order), mega)]
    lang_mb = [lang_order[i:i + mega] for i in range(0, len(lang_order), mega)]
    additional = mm_mb[-1] + lang_mb[-1]
    megabatches = mm_mb[:-1] + lang_mb[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=g).tolist()]
    if additional:
        megabatches.append(sorted(additional))
    return [i for mb in megabatches for i in mb]


def epoch_order(
    lengths: Sequence[int], per_device: int, num_chunks: int, *, seed: int, epoch: int, group_by_modality: bool,
) -> list[int]:
    """Sample order of one epoch, padded (by repeating its start, as DistributedSampler does) to whole global batches.

    num_chunks = processes x accumulation steps; a global batch is per_device x num_chunks samples.
    group_by_modality=False is LLaVA's default RandomSampler (a seeded permutation).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if group_by_modality:
        order = modality_grouped_order(lengths, per_device, num_chunks, g)
    else:
        order = torch.randperm(len(lengths), generator=g).tolist()
    global_batch = per_device * num_chunks
    pad = -len(order) % global_batch
    while pad:
        take = order[:pad]
        order += take
        pad -= len(take)
    return order


class StepBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches (lists of indices) of one epoch, from optimizer step `start_step` on.

    Global batch s of the epoch is cut into `world * accum` chunks of `per_device`; micro-batch a of
    rank r is chunk `a * world + r` (the layout HF Trainer + accelerate give LLaVA's sampler).
    """

    def __init__(self, lengths: Sequence[int], *, per_device: int, accum: int, world: int, rank: int, seed: int,
                 epoch: int, group_by_modality: bool, start_step: int = 0):
        self.per_device, self.accum, self.world, self.rank = per_device, accum, world, rank
        self.order = epoch_order(lengths, per_device, world * accum, seed=seed, epoch=epoch,
                                 group_by_modality=group_by_modality)
        self.steps_per_epoch = len(self.order) // (per_device * world * accum)
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} outside the epoch's {self.steps_per_epoch} steps")
        self.start_step = start_step

    def micro_batch(self, step: int, a: int) -> list[int]:
        chunk = (step * self.accum + a) * self.world + self.rank
        return self.order[chunk * self.per_device:(chunk + 1) * self.per_device]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps_per_epoch):
            for a in range(self.accum):
                yield self.micro_batch(step, a)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    return math.ceil(n_samples / global_batch)
