"""Shared fixtures: small synthetic image-text data written in the formats users bring."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
SHAPES = ("circle", "square")


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M GGUF that `scripts/fetch_test_models.py` extracts (None: not fetched)."""
    root = Path(os.environ.get("ITO_MLLM_TEST_MODELS") or REPO / ".cache" / "test-models")
    path = root / SMOLLM2_FILE
    return path if path.is_file() else None


def render(color: str, shape: str, size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(im)
    box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
    return im


def write_shards(out: Path, n_shards: int = 2, per_shard: int = 48, seed: int = 0) -> str:
    """img2dataset-style shards of coloured shapes; returns the brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    k = 0
    for s in range(n_shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tf:
            for _ in range(per_shard):
                c, sh = rng.choice(list(COLORS)), rng.choice(SHAPES)
                buf = io.BytesIO()
                render(c, sh).save(buf, "JPEG", quality=90)
                key = f"{k:09d}"
                k += 1
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"A {c} {sh}. It sits on gray.".encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    return str(out / f"{{00000..{n_shards - 1:05d}}}.tar")


def write_csv(out: Path, n: int = 64, seed: int = 0) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = ["filepath,caption"]
    for i in range(n):
        c, sh = rng.choice(list(COLORS)), rng.choice(SHAPES)
        render(c, sh).save(out / f"{i:04d}.png")
        lines.append(f"{i:04d}.png,A {c} {sh}. It sits on gray.")
    (out / "train.csv").write_text("\n".join(lines) + "\n")
    return str(out / "train.csv")


def kill_after_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, min_step: int, timeout: float = 120) -> int:
    """SIGKILL `proc` once a checkpoint of step >= min_step exists in ckpt_dir; returns the newest step left."""
    from common.checkpoint import latest_checkpoint

    deadline = time.time() + timeout
    while time.time() < deadline:
        ck = latest_checkpoint(ckpt_dir)
        if ck is not None and int(ck.name.split("_")[1]) >= min_step:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = latest_checkpoint(ckpt_dir)
    return int(ck.name.split("_")[1]) if ck is not None else 0


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def csv_data(tmp_path_factory) -> str:
    return write_csv(tmp_path_factory.mktemp("csv"))
