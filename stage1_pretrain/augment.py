"""Named image-augmentation policies for stage 1 (`stage1.augment`): the views every method trains on.

A policy is data only (no torch import, so config validation stays cheap); `views.make_view_transform`
turns it into open_clip's own train transform (`open_clip.transform.image_transform(is_train=True)`).
The policy is a key of its own, not a property of the method: the paper's Table 7 gives one
augmentation shared by all ITO variants and baselines, so a controlled A/B gives every arm the same
policy, and an arm that sets its own reproduces the other reading ("baselines follow their official
settings").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentPolicy:
    scale: tuple[float, float]  # RandomResizedCrop area range
    color_jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    color_jitter_prob: float = 0.0
    gray_scale_prob: float = 0.0
    description: str = ""


AUGMENT_POLICIES: dict[str, AugmentPolicy] = {
    "open_clip": AugmentPolicy((0.9, 1.0), description="open_clip's default train transform: RandomResizedCrop "
                               "scale (0.9, 1), bicubic"),
    "ito": AugmentPolicy((0.5, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2,
                         description="the paper's Table 7 (SLIP/MoCo-v3 views): RandomResizedCrop scale (0.5, 1), "
                                     "ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2"),
    "crop": AugmentPolicy((0.5, 1.0), description="RandomResizedCrop scale (0.5, 1) only: Table 7's geometry "
                          "without its colour changes (for worlds whose labels are colours)"),
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
