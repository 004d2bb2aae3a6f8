"""Random-initialised local Hugging Face directories of the vision-tower families stage 2 accepts (no downloads).

Each writer saves a model built from a transformers config class plus the image processor its family ships
with (CLIP: shortest edge + centre crop; SigLIP: squash to height x width, mean/std 0.5; DINOv2: resize the
shortest edge past the crop, then centre-crop, with position embeddings for a larger config.image_size).
"""

from __future__ import annotations

from pathlib import Path

import torch

PATCH = 8
SIDE = 32  # input side every tower here receives: 16 patches
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 100, "max_position_embeddings": 16}
VISION = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 2,
          "patch_size": PATCH}


def write_clip_dir(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config={**TEXT, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                     vision_config={**VISION, "image_size": SIDE}, projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.26, 0.27]).save_pretrained(str(path))
    return path


def write_siglip_dir(path: Path, seed: int = 0) -> Path:
    """A full SiglipModel directory (text + vision, as google/siglip-* ship); stage 2 reads its vision tower."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    cfg = SiglipConfig(text_config={**TEXT, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                       vision_config={**VISION, "image_size": SIDE})
    SiglipModel(cfg).save_pretrained(str(path))
    SiglipImageProcessor(size={"height": SIDE, "width": SIDE}).save_pretrained(str(path))
    return path


def write_dinov2_dir(path: Path, seed: int = 0, registers: int = 0) -> Path:
    """Dinov2Model (or Dinov2WithRegistersModel) at config size 2 x SIDE, processor: shortest edge 40, crop SIDE."""
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**VISION, image_size=2 * SIDE,
                                                                   num_register_tokens=registers))
    else:
        model = Dinov2Model(Dinov2Config(**VISION, image_size=2 * SIDE))
    model.save_pretrained(str(path))
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": SIDE, "width": SIDE},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(str(path))
    return path


WRITERS = {"clip": write_clip_dir, "siglip": write_siglip_dir, "dinov2": write_dinov2_dir,
           "dinov2_registers": lambda p, seed=0: write_dinov2_dir(p, seed, registers=2)}
# image tokens per family at SIDE: 16 patches (+ CLS and 2 registers the registers family keeps)
IMAGE_TOKENS = {"clip": 16, "siglip": 16, "dinov2": 16, "dinov2_registers": 19}
STRATEGY = {"clip": "default", "siglip": "full", "dinov2": "default", "dinov2_registers": "full"}
