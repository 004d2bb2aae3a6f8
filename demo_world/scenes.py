"""Scene sampling and rendering for the demo world.

A scene is a plain JSON-able dict: 1-3 objects (shape, colour, size, position, 3x3-grid
region) on a background (kind, colour name). Shape statistics are deliberately
non-uniform and some shapes have a preferred companion, so that POPE's "popular" and
"adversarial" negatives differ from random ones. Rendering draws at a multiple of the
target size and box-downsamples, which anti-aliases edges cheaply.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "hexagon", "crescent", "ring")
# Frequency of a shape as a scene's first object (and as a free pick for later ones).
SHAPE_WEIGHTS = (0.20, 0.16, 0.13, 0.11, 0.09, 0.08, 0.07, 0.06, 0.055, 0.045)
# A later object copies the companion of an earlier one with this probability: rare shapes
# that co-occur often make POPE's adversarial negatives differ from its popular ones.
COMPANIONS = {
    "circle": "ring", "ring": "circle", "star": "crescent", "crescent": "star", "heart": "diamond",
    "diamond": "heart", "square": "cross", "cross": "square", "triangle": "hexagon", "hexagon": "triangle",
}
COMPANION_P = 0.5

COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "pink": (245, 130, 190), "gray": (128, 128, 128),
}
BACKGROUNDS = {
    "white": (245, 245, 245), "black": (20, 20, 20), "cream": (238, 228, 196), "navy": (22, 32, 78),
    "charcoal": (58, 58, 62), "sand": (200, 178, 128), "teal": (20, 100, 100), "maroon": (100, 25, 40),
}
BACKGROUND_KINDS = ("solid", "gradient", "stripes", "noise", "checker")
SIZES = ("small", "large")
# 3x3 grid, row-major; the names double as caption phrases.
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
MIN_CONTRAST = 100.0  # RGB distance between an object colour and each background tone
# Radius as a fraction of the image side; objects sit at their grid cell's centre (1 px of jitter). A tiny ViT
# learns shapes from the share of the image they cover and from seeing them at the same offset to its 16-px patch
# grid (cell centres fall on patch borders at 96 px). Measured with a contrastive demo tower, 256 steps: large
# radii 0.145-0.16 -> 25% zero-shot shape accuracy; 0.19-0.21 at cell centres -> 44%; 0.19-0.21 anywhere in the
# cell -> 10%. Objects this large can cross into a neighbouring cell, so no two objects share a cell edge.
RADIUS = {"small": (0.125, 0.14), "large": (0.175, 0.195)}
JITTER = 0.01


def second_tone(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The other tone of a two-tone background: lighter for dark colours, darker for light ones."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    target, t = (255.0, 0.18) if lum < 128 else (0.0, 0.12)
    return tuple(int(round(c + (target - c) * t)) for c in rgb)


@functools.cache
def contrasts(color: str, background: str) -> bool:
    obj = np.array(COLORS[color], float)
    tones = (BACKGROUNDS[background], second_tone(BACKGROUNDS[background]))
    return all(np.linalg.norm(obj - np.array(t, float)) >= MIN_CONTRAST for t in tones)


def _pick(rng: np.random.Generator, items, p=None):
    return items[int(rng.choice(len(items), p=p))]


def sample_shapes(rng: np.random.Generator, n: int, distinct: bool = False) -> list[str]:
    weights = np.array(SHAPE_WEIGHTS)
    shapes: list[str] = []
    while len(shapes) < n:
        shape = None
        if shapes and rng.random() < COMPANION_P:
            shape = COMPANIONS[_pick(rng, shapes)]
        if shape is None or (distinct and shape in shapes):
            p = weights.copy()
            if distinct:
                p[[SHAPES.index(s) for s in shapes]] = 0.0
            shape = _pick(rng, SHAPES, p / p.sum())
        shapes.append(shape)
    return shapes


def _region_center(region: str) -> tuple[float, float]:
    i = REGIONS.index(region)
    return (i % 3 + 0.5) / 3.0, (i // 3 + 0.5) / 3.0


def _apart(a: int, b: int) -> bool:
    """Grid cells that share no edge (diagonal neighbours are fine: their centres are 0.47 apart)."""
    return abs(a % 3 - b % 3) + abs(a // 3 - b // 3) > 1


def _cells(rng: np.random.Generator, n: int) -> list[int]:
    """n grid cells, no two sharing an edge: a uniform draw among all such layouts."""
    while True:
        cells = [int(c) for c in rng.choice(len(REGIONS), size=n, replace=False)]
        if all(_apart(a, b) for i, a in enumerate(cells) for b in cells[i + 1:]):
            return cells


COUNT_P = (0.3, 0.4, 0.3)  # P(1, 2, 3 objects) of a scene


def sample_scene(
    rng: np.random.Generator, n_objects: int | None = None, distinct_shapes: bool = False,
    first: tuple[str, str] | None = None, count_p: tuple[float, float, float] = COUNT_P,
) -> dict:
    """Draw a scene: objects in distinct grid cells, unique (colour, shape) pairs, contrasting background.

    `first` fixes the (colour, shape) of the first object (labelled single-object images); `count_p` gives
    P(1, 2, 3 objects) when `n_objects` is not fixed."""
    n = int(n_objects) if n_objects else int(rng.choice([1, 2, 3], p=list(count_p)))
    shapes = sample_shapes(rng, n, distinct_shapes)
    if first is not None:
        shapes[0] = first[1]
    cells = _cells(rng, n)
    names = list(COLORS)
    colors, sizes, used = [], [], set()
    for k, shape in enumerate(shapes):
        color = first[0] if first is not None and k == 0 else _pick(rng, [c for c in names if (c, shape) not in used])
        used.add((color, shape))
        colors.append(color)
        sizes.append(_pick(rng, SIZES))
    objects = []
    for shape, color, size, cell in zip(shapes, colors, sizes, cells, strict=True):
        r = float(rng.uniform(*RADIUS[size]))
        cx, cy = _region_center(REGIONS[cell])
        x, y = cx + float(rng.uniform(-JITTER, JITTER)), cy + float(rng.uniform(-JITTER, JITTER))
        # a large object in an edge cell reaches past the image border by up to 3 px: its box is clipped there
        bbox = [round(max(0.0, x - r), 4), round(max(0.0, y - r), 4), round(min(1.0, x + r), 4), round(min(1.0, y + r), 4)]
        objects.append({
            "shape": shape, "color": color, "size": size, "region": REGIONS[cell],
            "position": {"x": round(x, 4), "y": round(y, 4), "r": round(r, 4), "bbox": bbox},
        })
    colors = {o["color"] for o in objects}
    bgs = [b for b in BACKGROUNDS if all(contrasts(c, b) for c in colors)]
    background = {"kind": _pick(rng, BACKGROUND_KINDS), "color": _pick(rng, bgs)}
    return {"objects": objects, "background": background, "count": n}


# --- rendering -------------------------------------------------------------------------


def _background(kind: str, color: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (side, side, 3) texture: a blend map t in [0, 1] looked up in a 256-entry two-tone palette."""
    c1 = np.array(BACKGROUNDS[color], np.float32)
    c2 = np.array(second_tone(BACKGROUNDS[color]), np.float32)
    xx = (np.arange(side, dtype=np.float32) / side)[None, :]
    yy = (np.arange(side, dtype=np.float32) / side)[:, None]
    if kind == "solid":
        t = np.zeros((side, side), np.float32)
    elif kind == "gradient":
        a = float(rng.uniform(0, 2 * math.pi))
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == "stripes":
        period = float(rng.uniform(0.08, 0.2))
        axis = int(rng.integers(3))
        coord = (xx + 0 * yy, yy + 0 * xx, (xx + yy) / math.sqrt(2))[axis]
        t = np.floor(coord / period) % 2
    elif kind == "checker":
        cell = float(rng.uniform(0.1, 0.25))
        t = (np.floor(xx / cell) + np.floor(yy / cell)) % 2
    elif kind == "noise":
        coarse = max(4, side // 8)
        t = rng.random((coarse, coarse), dtype=np.float32)
        t = np.kron(t, np.ones((side // coarse + 1, side // coarse + 1), np.float32))[:side, :side] * 0.6
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    lut = np.clip(c1 + np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None] * (c2 - c1), 0, 255).astype(np.uint8)
    return np.take(lut, np.rint(t * 255).astype(np.uint8), axis=0)


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list[tuple[float, float]]:
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        rad = r if (not inner or k % 2 == 0) else r * inner
        a = rot - math.pi / 2 + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _heart(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(40):
        t = 2 * math.pi * k / 40
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + x * r / 16.5, cy - y * r / 16.5 + r * 0.1))
    return pts


def _draw_mask(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(1, int(r * 0.38)))
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        off = r * 0.55
        draw.ellipse([cx - r + off, cy - r - off * 0.3, cx + r + off, cy + r - off * 0.3], fill=0)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.12, 4, rot + math.pi / 4), fill=255)
    elif shape == "diamond":
        w = r * 0.62
        draw.polygon([(cx, cy - r), (cx + w, cy), (cx, cy + r), (cx - w, cy)], fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.1, 3, rot), fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot + math.pi / 6), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.1, 5, rot, inner=0.45), fill=255)
    elif shape == "cross":
        a, b = r * 0.34, r
        draw.polygon([(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                      (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                      (cx - b, cy - a), (cx - a, cy - a)], fill=255)
    elif shape == "heart":
        draw.polygon(_heart(cx, cy, r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: dict, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render `scene` as an RGB image of side `image_size`; `rng` draws texture and colour jitter only."""
    ss = 4 if image_size <= 96 else 2
    side = image_size * ss
    bg = scene["background"]
    canvas = Image.fromarray(_background(bg["kind"], bg["color"], side, rng))
    for obj in scene["objects"]:
        pos = obj["position"]
        r = pos["r"] if "r" in pos else (pos["bbox"][2] - pos["bbox"][0]) / 2.0
        jitter = rng.integers(-18, 19, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[obj["color"]]) + jitter, 0, 255))
        rot = float(rng.uniform(-0.15, 0.15)) if obj["shape"] in ("triangle", "star", "hexagon") else 0.0
        # draw into a small mask around the object: full-canvas masks dominate the render time
        half = int(math.ceil(r * side * 1.3)) + 2
        x0, y0 = int(pos["x"] * side) - half, int(pos["y"] * side) - half
        mask = Image.new("L", (2 * half, 2 * half), 0)
        _draw_mask(ImageDraw.Draw(mask), obj["shape"], pos["x"] * side - x0, pos["y"] * side - y0, r * side, rot)
        canvas.paste(rgb, (x0, y0, x0 + 2 * half, y0 + 2 * half), mask)
    return canvas.reduce(ss)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()
