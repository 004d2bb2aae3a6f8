"""Floors read from the import graph: one ground, the stages beside each other on it, one roof on top.

Nothing here says which package is which. The packages are the ones pyproject.toml installs; a package's
floor is computed from its imports (0: it imports none of our packages; otherwise one above the highest
floor it imports), so the rule is: the graph has no cycle, floor 0 holds exactly one package (the
ground), the top floor is 2 and holds exactly one package (the roof, the only code that imports stages),
and everything else sits on floor 1 (importing only the ground and itself). A stage that imports the
roof closes a cycle; a stage that imports another stage lifts itself to floor 2 and the roof to 3.
ARCHITECTURE.md draws the result.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def packages(root: Path = ROOT) -> list[str]:
    """Top-level packages that `pip install` ships (pyproject's packages.find `include` patterns)."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
    found = [p.parent.name for p in root.glob("*/__init__.py")]
    return sorted(name for name in found if any(fnmatch.fnmatch(name, pat) for pat in patterns))


def _imported(tree: ast.AST) -> list[tuple[str, int]]:
    """(top-level module, line) of every absolute import in a module, wherever it appears (functions too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], node.lineno))
    return out


def import_graph(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """{package: {other package it imports: ["file:line", ...]}} over our packages (relative imports stay inside)."""
    ours = set(packages(root))
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in ours}
    for pkg in ours:
        for path in sorted((root / pkg).rglob("*.py")):
            for mod, line in _imported(ast.parse(path.read_text(encoding="utf-8"))):
                if mod in ours and mod != pkg:
                    graph[pkg].setdefault(mod, []).append(f"{path.relative_to(root)}:{line}")
    return graph


def floors(graph: dict[str, dict[str, list[str]]]) -> tuple[dict[str, int], list[str]]:
    """Each package's floor, and the import cycles found (as readable lines)."""
    floor: dict[str, int] = {}
    cycles: list[str] = []

    def visit(pkg: str, path: tuple[str, ...]) -> int:
        if pkg in path:
            loop = [*path[path.index(pkg):], pkg]
            where = "; ".join(f"{a} -> {b} ({graph[a][b][0]})" for a, b in zip(loop, loop[1:], strict=False))
            cycles.append(f"import cycle {' -> '.join(loop)}: {where}")
            return 0
        if pkg not in floor:
            deps = [visit(dep, (*path, pkg)) for dep in graph[pkg]]
            floor[pkg] = 1 + max(deps) if deps else 0
        return floor[pkg]

    for pkg in sorted(graph):
        visit(pkg, ())
    return floor, sorted(set(cycles))


def problems(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    """What breaks the three-floor rule (empty: the layout holds)."""
    floor, bad = floors(graph)
    if bad:
        return bad
    by_floor: dict[int, list[str]] = {}
    for pkg, f in sorted(floor.items()):
        by_floor.setdefault(f, []).append(pkg)
    picture = ", ".join(f"floor {f}: {' '.join(pkgs)}" for f, pkgs in sorted(by_floor.items()))
    if len(by_floor.get(0, [])) != 1:
        bad.append(f"expected one ground package (importing none of ours), got {by_floor.get(0, [])} ({picture})")
    if max(by_floor) != 2 or len(by_floor[max(by_floor)]) != 1:
        for pkg in [p for f, pkgs in by_floor.items() if f >= 2 for p in pkgs]:
            lifted = {dep: where[0] for dep, where in graph[pkg].items() if floor[dep] >= 1}
            bad.append(f"{pkg} stands on floor {floor[pkg]} because it imports {lifted}")
        bad.append(f"expected floors 0, 1 and a single roof on 2 ({picture})")
    return bad


def test_the_tree_has_three_floors():
    graph = import_graph()
    assert problems(graph) == []
    floor, _ = floors(graph)
    roof = max(floor, key=floor.get)
    stages = {p for p, f in floor.items() if f == 1}
    assert stages and all(roof not in graph[s] for s in stages)
    assert set(graph[roof]) == stages | {p for p, f in floor.items() if f == 0}  # the roof stands on every stage


def _with(graph: dict, pkg: str, dep: str) -> dict:
    changed = {p: dict(deps) for p, deps in graph.items()}
    changed[pkg][dep] = [f"{pkg}/planted.py:1"]
    return changed


def test_a_stage_importing_the_roof_breaks_the_rule():
    graph = import_graph()
    floor, _ = floors(graph)
    roof = max(floor, key=floor.get)
    for stage in (p for p, f in floor.items() if f == 1):
        found = problems(_with(graph, stage, roof))
        assert found and found[0].startswith("import cycle") and f"{stage}/planted.py:1" in found[0], found


def test_a_stage_importing_another_stage_or_the_ground_importing_a_stage_breaks_the_rule():
    graph = import_graph()
    floor, _ = floors(graph)
    stages = sorted(p for p, f in floor.items() if f == 1)
    ground = next(p for p, f in floor.items() if f == 0)
    assert any("planted.py:1" in p for p in problems(_with(graph, stages[0], stages[1])))
    assert problems(_with(graph, ground, stages[0]))
