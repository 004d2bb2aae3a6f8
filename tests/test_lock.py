"""The running environment is the locked, tested one: drift is a red test here, not a crash in a demo.

requirements-lock.txt pins every package of the test environment (scripts/lock.py writes it).
A package whose installed version differs, one the lock names that is missing, or one installed
that the lock does not name is reported on its own line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements-lock.txt"
# pip freeze leaves out the installer's own tools; the project itself is installed editable.
NOT_LOCKED = {"pip", "setuptools", "wheel", "distribute", "ito-mllm"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and name and version, f"{path}:{n}: expected NAME==VERSION, got {line!r}"
        pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def drift(locked: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per package that differs between the lock and the environment."""
    lines = []
    for name in sorted(set(locked) | set(have)):
        if name in NOT_LOCKED:
            continue
        want, got = locked.get(name), have.get(name)
        if want is None:
            lines.append(f"{name}: installed {got}, not in the lock")
        elif got is None:
            lines.append(f"{name}: locked {want}, not installed")
        elif want != got:
            lines.append(f"{name}: installed {got}, locked {want}")
    return lines


def test_environment_matches_lock():
    lines = drift(read_lock(LOCK), installed())
    assert not lines, (
        f"the environment differs from {LOCK.name} in {len(lines)} package(s); reinstall with "
        "`pip install -c requirements-lock.txt -e '.[test]'` or refresh the lock with `python scripts/lock.py`:\n"
        + "\n".join(lines)
    )


def test_drift_names_each_package_on_its_own_line():
    locked = {"filelock": "4.2.12", "numpy": "2.3.5", "torch": "2.14.1"}
    have = {"filelock": "4.3.1", "numpy": "2.3.5", "extra-pkg": "1.0", "pip": "23.2.1"}
    assert drift(locked, have) == [
        "extra-pkg: installed 1.0, not in the lock",
        "filelock: installed 4.3.1, locked 4.2.12",
        "torch: locked 2.14.1, not installed",
    ]
    assert drift(locked | {"extra-pkg": "1.0"}, have | {"torch": "2.14.1", "filelock": "4.2.12"}) == []


def test_lock_pins_the_known_breakers():
    """The packages that broke the stack before are pinned at the versions pyproject allows."""
    pins = read_lock(LOCK)
    assert pins["filelock"].startswith("4.2.")  # 4.3 removed filelock._api (lmms-eval's evaluator)
    assert pins["numpy"].startswith("2.3.")  # 2.4 breaks clip_benchmark's zero-shot accuracy
    assert pins["webdataset"].startswith("0.")  # open_clip_train's loader fails on 1.x
    assert pins["sentencepiece"] == "0.2.2"  # 0.2.3 needs protobuf>=7


def test_pip_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
