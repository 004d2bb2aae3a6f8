"""Package boundaries: stages never import each other or the orchestration; shared helpers import no stage."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("stage1_pretrain", "stage2_llava", "eval_mllm")
HELPERS = {"pipeline.io", "pipeline.schema", "pipeline.checkpoint", "pipeline.metrics_log", "pipeline.disk",
           "pipeline.faults", "pipeline.images", "pipeline.devices", "pipeline.launch"}


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods |= {node.module} | {f"{node.module}.{a.name}" for a in node.names if node.module == "pipeline"}
    return mods


def test_stages_import_only_themselves_and_the_shared_helpers():
    bad = []
    for stage in STAGES:
        for path in sorted((ROOT / stage).rglob("*.py")):
            for mod in _imports(path):
                top = mod.split(".")[0]
                if top in STAGES and top != stage:
                    bad.append(f"{path.relative_to(ROOT)}: imports {mod}")
                if top == "pipeline" and mod != "pipeline" and mod not in HELPERS:
                    bad.append(f"{path.relative_to(ROOT)}: imports {mod}")
    assert bad == []


def test_shared_helpers_import_no_stage():
    for mod in sorted(HELPERS):
        path = ROOT / (mod.replace(".", "/") + ".py")
        assert not {m for m in _imports(path) if m.split(".")[0] in STAGES}, path
