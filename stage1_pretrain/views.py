"""Image decoding and reproducible image views for stage 1.

View transforms are open_clip's own `image_transform(is_train=True)` configured by a named
policy of `stage1_pretrain.augment` (`open_clip`: its default crop; `ito`: the paper's Table 7
views through open_clip's `color_jitter_prob` / `gray_scale_prob` options; `crop`: geometry only;
`simclr`: SLIP's SSL views, whose blur and flip open_clip lacks, so torchvision's `GaussianBlur`
and `RandomHorizontalFlip` are inserted before the tensor conversion, in SLIP's order).
Those transforms draw from torch's and Python's global RNGs; `MultiView` forks both and
seeds them per sample, so a sample's views depend only on the seed it is given (and
a resumed run sees the same views), never on what ran before in the process. A method with
SSL views (SLIP) gets them from the same `MultiView`, after its V alignment views.

Decoding (`load_rgb`) is common.images' `decode_image` with transparency composited over
white (as img2dataset and transformers' `convert_to_rgb` do, instead of PIL's alpha drop
that turns transparent pixels black).
"""

from __future__ import annotations

import math
import random
import warnings

import torch
from PIL import Image

from common.images import MAX_PIXELS, ImageDecodeError, decode_image, to_rgb

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
        transform = image_transform(image_size, is_train=True, mean=tuple(mean), std=tuple(std), aug_cfg=aug)
    extra = _blur_and_flip(p, image_size)
    if extra:
        steps = transform.transforms
        at = next(i for i, t in enumerate(steps) if type(t).__name__ in ("MaybeToTensor", "ToTensor"))
        transform.transforms = [*steps[:at], *extra, *steps[at:]]
    return transform


def _blur_and_flip(policy, image_size) -> list:
    """torchvision blur/flip steps of a policy (PIL in, PIL out); sigma scaled from 224 px to the view size."""
    from torchvision import transforms as T

    from .augment import BLUR_REFERENCE_SIZE

    steps = []
    if policy.blur_prob:
        side = min(image_size) if isinstance(image_size, (tuple, list)) else int(image_size)
        lo, hi = (s * side / BLUR_REFERENCE_SIZE for s in policy.blur_sigma)
        kernel = 2 * math.ceil(3 * hi) + 1  # +-3 sigma: the kernel holds the whole Gaussian, as PIL's blur
        steps.append(T.RandomApply([T.GaussianBlur(kernel, (lo, hi))], p=policy.blur_prob))
    if policy.hflip_prob:
        steps.append(T.RandomHorizontalFlip(policy.hflip_prob))
    return steps


class MultiView:
    """V independent views of one image (then S views of `extra_transform`), reproducible from a per-sample seed.

    `views(img, seed)` -> float tensor [V + S, 3, H, W]: the V views of `transform` first, then the
    S views of `extra_transform` (a method's SSL views; both transforms must give the same size).
    The global torch and Python RNG states of the caller are left untouched.
    """

    def __init__(self, transform, V: int, extra_transform=None, extra_views: int = 0):
        if V < 1 or extra_views < 0:
            raise ValueError(f"V must be >= 1 and extra_views >= 0, got V={V}, extra_views={extra_views}")
        if extra_views and extra_transform is None:
            raise ValueError(f"extra_views={extra_views} needs an extra_transform")
        self.transform, self.V = transform, V
        self.extra_transform, self.extra_views = extra_transform, extra_views

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                views = [self.transform(img) for _ in range(self.V)]
                views += [self.extra_transform(img) for _ in range(self.extra_views)]
        finally:
            random.setstate(py_state)
        return torch.stack(views)

    def __repr__(self) -> str:
        extra = f", extra_views={self.extra_views}, extra_transform={self.extra_transform!r}" if self.extra_views else ""
        return f"MultiView(V={self.V}, transform={self.transform!r}{extra})"
