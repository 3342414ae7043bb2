"""The import graph of our packages: dependencies point one way (`service` -> `model`, `training` -> `model`),
no module imports one of its importers (no circle, type-checking imports included), no module over 400 lines."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "service", "training")
MAY_IMPORT = {"model": {"model"}, "service": {"service", "model"}, "training": {"training", "model"}}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that `name` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import mod`
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_dependencies_point_one_way(graph: dict[str, set[str]]) -> None:
    upward = [(a, b) for a, deps in graph.items() for b in deps if b.split(".")[0] not in MAY_IMPORT[a.split(".")[0]]]
    assert not upward, upward


def test_no_import_circle(graph: dict[str, set[str]]) -> None:
    # `from service import deps` names the package too: a package is no node of the design's graph.
    packages = {n for n in graph if modules()[n].name == "__init__.py"}
    g = {a: deps - packages for a, deps in graph.items() if a not in packages}
    try:
        graphlib.TopologicalSorter(g).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import circle: {' -> '.join(e.args[1])}")


def test_modules_are_short() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long
