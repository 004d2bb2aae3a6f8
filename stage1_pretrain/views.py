"""Image decoding and reproducible image views for stage 1.

View transforms are open_clip's own `image_transform(is_train=True)` configured by a named
policy of `stage1_pretrain.augment` (`open_clip`: its default crop; `ito`: the paper's Table 7
views through open_clip's `color_jitter_prob` / `gray_scale_prob` options; `crop`: geometry only).
Those transforms draw from torch's and Python's global RNGs; `MultiView` forks both and
seeds them per sample, so a sample's views depend only on the seed it is given (and
a resumed run sees the same views), never on what ran before in the process.

Decoding (`load_rgb`) is pipeline.images' `decode_image` with transparency composited over
white (as img2dataset and transformers' `convert_to_rgb` do, instead of PIL's alpha drop
that turns transparent pixels black).
"""

from __future__ import annotations

import random
import warnings

import torch
from PIL import Image

from pipeline.images import MAX_PIXELS, ImageDecodeError, decode_image, to_rgb

from .augment import get_policy

__all__ = ["MAX_PIXELS", "ImageDecodeError", "MultiView", "load_rgb", "make_view_transform", "to_rgb"]


def load_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image (transparency over white); ImageDecodeError says why it cannot."""
    return decode_image(data, max_pixels, composite_alpha=True)


def make_view_transform(policy: str, image_size, mean, std, scale_min: float | None = None):
    """PIL RGB image -> normalised float tensor [3, H, W] with augmentation policy `policy`.

    `scale_min` overrides the policy's RandomResizedCrop lower bound (None: the policy's own).
    """
    from open_clip.transform import AugmentationCfg, image_transform

    try:
        p = get_policy(policy)
    except KeyError as e:
        raise ValueError(str(e.args[0])) from None
    low = p.scale[0] if scale_min is None else float(scale_min)
    if not 0.0 < low <= p.scale[1]:
        raise ValueError(f"scale_min must be in (0, {p.scale[1]}], got {low}")
    aug = AugmentationCfg(scale=(low, p.scale[1]), color_jitter=p.color_jitter,
                          color_jitter_prob=p.color_jitter_prob or None, gray_scale_prob=p.gray_scale_prob or None)
    with warnings.catch_warnings():
        # open_clip 3.3 warns "Unused augmentation cfg items" for the jitter/grey options its
        # non-timm branch does use (it reads them from the cfg, not from the dict it checks)
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        return image_transform(image_size, is_train=True, mean=tuple(mean), std=tuple(std), aug_cfg=aug)


class MultiView:
    """V independent views of one image, reproducible from a per-sample seed.

    `views(img, seed)` -> float tensor [V, 3, H, W]. The global torch and Python RNG states
    of the caller are left untouched.
    """

    def __init__(self, transform, V: int):
        if V < 1:
            raise ValueError(f"V must be >= 1, got {V}")
        self.transform, self.V = transform, V

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                views = [self.transform(img) for _ in range(self.V)]
        finally:
            random.setstate(py_state)
        return torch.stack(views)

    def __repr__(self) -> str:
        return f"MultiView(V={self.V}, transform={self.transform!r})"
