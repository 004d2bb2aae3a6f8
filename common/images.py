"""Image decoding both stages share: any file or PIL mode to 8-bit RGB, refusing what cannot be used.

- 16-bit and 32-bit grey images are rescaled to 8 bits (PIL's own conversion clips them to 255,
  so a 16-bit scan would become a blank white image).
- Transparency: `composite_alpha=True` composites over white (img2dataset's and transformers'
  `convert_to_rgb` choice, used by stage 1); False keeps LLaVA's `convert("RGB")`, which drops
  the alpha channel (stage 2 sees what LLaVA's own data code feeds the model).
- Images above `max_pixels` are refused from their header, before their pixels are decoded.
- Truncated files are refused even when another library in the process has set PIL's global
  `ImageFile.LOAD_TRUNCATED_IMAGES` (lmms-eval does on import): training data must not depend on
  whether an eval ran earlier in the same process.
Every failure is an `ImageDecodeError` (a ValueError) whose message says why in a few words.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageFile

MAX_PIXELS = 8192 * 8192
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageDecodeError(ValueError):
    """The bytes or file are not a usable image (the message says why, in a few words)."""


def to_rgb(img: Image.Image, composite_alpha: bool = True) -> Image.Image:
    """Any PIL mode to 8-bit RGB (see the module docstring for the choices)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            hi = float(arr.max()) if arr.size else 0.0
            if hi > 255.0:  # a 16-bit (or wider) range stored in a 32-bit mode
                arr = arr * (255.0 / max(hi, 65535.0))
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if composite_alpha and (img.mode in _ALPHA_MODES or "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(source: bytes | str | os.PathLike, max_pixels: int = MAX_PIXELS,
                 composite_alpha: bool = True) -> Image.Image:
    """Image bytes or a file path -> RGB PIL image. A missing file raises FileNotFoundError, anything
    else unusable ImageDecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size is checked below
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"image too large: {w}x{h} pixels, more than {max_pixels}")
            if w < 1 or h < 1:
                raise ImageDecodeError(f"empty image: {w}x{h}")
            lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
            try:
                img.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = lenient
            return to_rgb(img, composite_alpha)
    except (ImageDecodeError, FileNotFoundError):
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large ({e})") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        raise ImageDecodeError(f"not a readable image: {type(e).__name__}: {' '.join(str(e).split())[:120]}") from None
