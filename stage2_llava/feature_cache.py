"""Opt-in on-disk cache of the frozen vision tower's features (`stage2.feature_cache`).

The tower is frozen in both phases and image preprocessing is deterministic, so the projector's INPUT
(the tower's hidden state at `vision_feature_layer`, patch tokens only: [num_patches, vision_width],
what LlavaModel.get_image_features selects before its projector) is computed once per image and read
back in every epoch, phase and later run that uses the same tower.

Keying: the cache directory is `CACHE_DIR/<key>/`, key = sha256 of the tower's weights (names, dtypes,
shapes, bytes), the image processor's config, the pad-to-square rule, vision_feature_layer, the
feature-select strategy and the compute precision; a different tower or preprocessing gets another
directory and never reads stale features. Images are keyed by the sha256 of their file bytes, so the
same picture under two folders is computed once and a replaced file is recomputed.

Storage: safetensors shards under `<key>/shards/`, each a {image sha256: [P, D] tensor} dict written
atomically (common.io.save_safetensors); an interrupted build leaves complete shards only and the next
build computes just the missing images. In a multi-process run every rank builds a disjoint share;
the caller waits for all ranks, then opens the table.

Training with cached features: `projected_features` runs the projector on them and returns the
`mm_encoder_outputs` LlavaForConditionalGeneration.forward accepts in place of pixel_values; the model
then embeds input_ids and scatters the features into the image-token positions itself
(get_placeholder_mask + masked_scatter), exactly as on the pixel path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from common.io import InputError, atomic_write_json, save_safetensors, sha256_file
from stage2_llava.data import ImageError, ImageLoader
from stage2_llava.llava_json import Record

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAD_RULE = "llava-expand2square(image_mean*255)"
NO_PAD_RULE = "none (resize + centre crop)"
_VOLATILE_PROCESSOR_KEYS = ("processor_class", "_processor_class")


def select_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projector input for `pixel_values` [B, 3, H, W]: [B, P, D], as LlavaModel.get_image_features selects it."""
    cfg = model.config
    layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layers = [layer] if isinstance(layer, int) else list(layer)
    hs = [out.hidden_states[k] for k in layers]
    if strategy == "default":
        hs = [h[:, 1:] for h in hs]
    return hs[0] if len(hs) == 1 else torch.cat(hs, dim=-1)


def projected_features(model, features: torch.Tensor) -> dict:
    """`mm_encoder_outputs` for LlavaForConditionalGeneration.forward from cached features [N_img, P, D]."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    projector = model.model.multi_modal_projector  # transformers' own or a stage2_llava.projectors module
    proj = projector(features.to(next(projector.parameters()).dtype))
    return {"image": BaseModelOutputWithPooling(pooler_output=list(proj))}


def tower_digest(vision_tower: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(vision_tower.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_meta(model, image_processor, precision: str, pad: bool = True) -> dict:
    """Everything the cached features depend on (hashed into the cache key)."""
    proc = {k: v for k, v in image_processor.to_dict().items() if k not in _VOLATILE_PROCESSOR_KEYS}
    return {
        "format": FORMAT_VERSION,
        "tower_sha256": tower_digest(model.model.vision_tower),
        "image_processor": proc,
        "pad_rule": PAD_RULE if pad else NO_PAD_RULE,
        "vision_feature_layer": model.config.vision_feature_layer,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
        "precision": precision,
    }


def cache_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:40]


class FeatureTable:
    """image path (relative, as in the records) -> cached [P, D] features; picklable for DataLoader workers."""

    def __init__(self, locations: dict[str, tuple[str, str]]):
        self.locations = locations  # rel path -> (shard file, image sha256)
        self._handles: dict[str, object] = {}

    def __contains__(self, rel: str) -> bool:
        return rel in self.locations

    def __call__(self, rel: str) -> torch.Tensor:
        if rel not in self.locations:
            raise InputError(f"image {rel!r}: no cached features (it failed while the cache was built)")
        shard, digest = self.locations[rel]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(shard, framework="pt")
        return handle.get_tensor(digest)

    def __getstate__(self):
        return {"locations": self.locations}

    def __setstate__(self, state):
        self.locations, self._handles = state["locations"], {}


class FeatureCache:
    """Features of one (tower, preprocessing, precision) under `root/<key>/`; see the module docstring."""

    def __init__(self, root: str | os.PathLike, model, image_processor, *, precision: str = "fp32", pad: bool = True):
        self.model, self.processor, self.precision, self.pad = model, image_processor, precision, pad
        self.meta = cache_meta(model, image_processor, precision, pad)
        self.key = cache_key(self.meta)
        self.dir = Path(root) / self.key
        self.shards = self.dir / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self._file_hashes: dict[str, str] = {}  # absolute path -> sha256, memoised within this run
        if not (self.dir / "meta.json").exists():
            atomic_write_json(self.dir / "meta.json", self.meta)

    def index(self) -> dict[str, str]:
        """image sha256 -> shard file, over all complete shards."""
        out = {}
        for shard in sorted(self.shards.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                out.update(dict.fromkeys(f.keys(), str(shard)))
        return out

    def hash_images(self, records: Sequence[Record], image_folder: str, workers: int = 8) -> dict[str, str]:
        """rel path -> sha256 of the file's bytes, for every image record (threads: the work is I/O)."""
        rels = sorted({r.image for r in records if r.has_image})
        paths = [os.path.abspath(os.path.join(image_folder, r)) for r in rels]
        new = [p for p in paths if p not in self._file_hashes]
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                self._file_hashes.update(zip(new, pool.map(sha256_file, new), strict=True))
        except OSError as e:  # removed or unreadable since the JSON was validated
            raise ImageError(f"image file {e.filename}: cannot read ({e.strerror}), expected an existing file") from None
        return {rel: self._file_hashes[p] for rel, p in zip(rels, paths, strict=True)}

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.no_grad()
    def _compute(self, loader: ImageLoader, rels: list[str], device: torch.device, batch_size: int,
                 skip_bad: bool, ids: dict[str, str]) -> tuple[list[str], torch.Tensor | None, int]:
        """Features of `rels` -> (the rel paths that worked, [n, P, D], number that failed)."""
        ok, pixels, bad = [], [], 0
        for rel in rels:
            try:
                pixels.append(loader(rel))
                ok.append(rel)
            except (OSError, ValueError) as e:
                if not skip_bad:
                    what = e if isinstance(e, ImageError) else f"image {rel!r}: {e}"  # ImageError names the image
                    raise InputError(f"stage-2 feature cache: record {ids[rel]}: {what}") from None
                bad += 1
        if not ok:
            return ok, None, bad
        feats = []
        with self._autocast(device):
            for i in range(0, len(pixels), batch_size):
                pv = torch.stack(pixels[i:i + batch_size]).to(device)
                feats.append(select_features(self.model, pv).cpu())
        return ok, torch.cat(feats), bad

    def build(self, records: Sequence[Record], image_folder: str, *, rank: int = 0, world: int = 1,
              device: str | torch.device = "cpu", batch_size: int = 32, shard_size: int = 256,
              skip_bad: bool = False, progress: bool = True) -> dict:
        """Compute this rank's share of the images not cached yet; returns {"cached", "computed", "bad"}."""
        device = torch.device(device)
        digests = self.hash_images(records, image_folder)
        have = self.index()
        by_digest: dict[str, str] = {}
        for rel, d in sorted(digests.items()):
            if d not in have:
                by_digest.setdefault(d, rel)
        todo = sorted(by_digest)[rank::world]
        ids = {r.image: r.id for r in records if r.has_image}
        loader = ImageLoader(self.processor, image_folder, pad=self.pad)
        computed = bad = 0
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(todo), desc="feature cache", disable=not progress or not todo, dynamic_ncols=True)
        for start in range(0, len(todo), shard_size):
            chunk = todo[start:start + shard_size]
            rels, feats, n_bad = self._compute(loader, [by_digest[d] for d in chunk], device, batch_size, skip_bad, ids)
            bad += n_bad
            if feats is not None:
                tensors = {digests[rel]: f.contiguous() for rel, f in zip(rels, feats, strict=True)}
                name = hashlib.sha256("".join(sorted(tensors)).encode()).hexdigest()[:24]
                save_safetensors(tensors, self.shards / f"{name}.safetensors")
                computed += len(tensors)
            bar.update(len(chunk))
        bar.close()
        self.model.train(was_training)
        return {"cached": len(set(digests.values()) & set(have)), "computed": computed, "bad": bad}

    def table(self, records: Iterable[Record], image_folder: str) -> FeatureTable:
        """Lookup for the records' images over all shards on disk (after every rank's build)."""
        records = list(records)
        digests = self.hash_images(records, image_folder)
        have = self.index()
        return FeatureTable({rel: (have[d], d) for rel, d in digests.items() if d in have})
