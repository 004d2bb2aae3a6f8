"""Named image-augmentation policies for stage 1 (`stage1.augment`): the views every method trains on.

A policy is data only (no torch import, so config validation stays cheap); `views.make_view_transform`
turns it into open_clip's own train transform (`open_clip.transform.image_transform(is_train=True)`).
The policy is a key of its own, not a property of the method: the paper's Table 7 gives one
augmentation shared by all ITO variants and baselines, so a controlled A/B gives every arm the same
policy, and an arm that sets its own reproduces the other reading ("baselines follow their official
settings").

The `simclr` policy is SLIP's SSL-view augmentation (facebookresearch/SLIP `datasets.get_dataset`:
RandomResizedCrop scale (0.08, 1), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2,
GaussianBlur sigma in [0.1, 2] p=0.5, horizontal flip p=0.5). It is what a method's extra SSL views
use (`MethodSpec.ssl_augment`, `stage1.ssl_augment`); any policy may also serve as `stage1.augment`.
Blur sigmas are given in pixels of a 224-px image and scale with the view size, so a 64-px demo
view is blurred as much, relative to its size, as SLIP's 224-px views.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentPolicy:
    scale: tuple[float, float]  # RandomResizedCrop area range
    color_jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    color_jitter_prob: float = 0.0
    gray_scale_prob: float = 0.0
    blur_prob: float = 0.0  # GaussianBlur applied with this probability
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma range in pixels at BLUR_REFERENCE_SIZE
    hflip_prob: float = 0.0
    description: str = ""


BLUR_REFERENCE_SIZE = 224  # the image size blur_sigma is stated for (SimCLR's and SLIP's)


AUGMENT_POLICIES: dict[str, AugmentPolicy] = {
    "open_clip": AugmentPolicy((0.9, 1.0), description="open_clip's default train transform: RandomResizedCrop "
                               "scale (0.9, 1), bicubic"),
    "ito": AugmentPolicy((0.5, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2,
                         description="the paper's Table 7 (SLIP/MoCo-v3 views): RandomResizedCrop scale (0.5, 1), "
                                     "ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2"),
    "none": AugmentPolicy((1.0, 1.0), description="no augmentation: the whole image, resized (RandomResizedCrop at "
                          "scale 1 finds no other aspect ratio that fits, so it keeps the image whole)"),
    "crop": AugmentPolicy((0.5, 1.0), description="RandomResizedCrop scale (0.5, 1) only: Table 7's geometry "
                          "without its colour changes (for worlds whose labels are colours)"),
    "simclr": AugmentPolicy((0.08, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
                            hflip_prob=0.5,
                            description="SLIP's SimCLR views: RandomResizedCrop scale (0.08, 1), ColorJitter(0.4, 0.4, "
                                        "0.4, 0.1) p=0.8, RandomGrayscale p=0.2, GaussianBlur sigma [0.1, 2] (224 px) "
                                        "p=0.5, HorizontalFlip p=0.5"),
}


def register_augment(name: str, policy: AugmentPolicy) -> None:
    """Add (or replace) a policy; the name becomes valid for `stage1.augment`."""
    if not isinstance(policy, AugmentPolicy):
        raise TypeError(f"register_augment({name!r}): expected an AugmentPolicy, got {type(policy).__name__}")
    AUGMENT_POLICIES[name] = policy


def get_policy(name: str) -> AugmentPolicy:
    try:
        return AUGMENT_POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown augment policy {name!r}; known: {', '.join(sorted(AUGMENT_POLICIES))}") from None
