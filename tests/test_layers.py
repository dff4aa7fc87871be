"""The package's layers: a Flower-free core, the Flower layer on top, operations on top of both.

Read from the import statements of every module (AST), so the rule holds whatever is imported
lazily inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "docl_flower"
LAYERS = ("core", "federation", "operations", "experiments")
#: What each layer may not import: higher layers of the package and (for the core) Flower.
FORBIDDEN = {
    "core": (
        "docl_flower.federation",
        "docl_flower.operations",
        "docl_flower.experiments",
        "flwr",
    ),
    "federation": ("docl_flower.operations", "docl_flower.experiments"),
    "operations": ("docl_flower.experiments",),
    "experiments": (),
}


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def violations(layer: str, root: Path = PACKAGE) -> list[str]:
    """``module -> import`` pairs of ``layer`` that break the layering."""
    bad = []
    for path in sorted((root / layer).rglob("*.py")):
        for name in sorted(imports_of(path, root)):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{_module_name(path, root)} -> {name}")
    return bad


#: The core's sub-packages along the data flow, lowest first: a module may import its own
#: floor and the floors below it, never one above (function-level imports included).
CORE_FLOORS = (
    "common",
    "data",
    "features",
    "training",
    "filter",
    "evaluation",
    "baselines",
    "pipeline",
)


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["docl_flower", "core"] or len(parts) < 3:
        return None
    return CORE_FLOORS.index(parts[2]) if parts[2] in CORE_FLOORS else None


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """``module -> import`` pairs of the core that reach a floor above the module's own."""
    bad = []
    for path in sorted((root / "core").rglob("*.py")):
        module = _module_name(path, root)
        own = _floor(module)
        for name in sorted(imports_of(path, root)):
            floor = _floor(name)
            if own is not None and floor is not None and floor > own:
                bad.append(f"{module} -> {name}")
    return bad


def test_every_core_module_lives_on_a_floor():
    core = PACKAGE / "core"
    loose = sorted(p.name for p in core.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"core modules outside a sub-package: {loose}"
    floors = sorted(p.name for p in core.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert floors == sorted(CORE_FLOORS)


def test_no_core_module_imports_a_floor_above_its_own():
    assert upward_imports() == []


def test_the_floor_check_catches_an_upward_import_inside_a_function(tmp_path):
    fake = tmp_path / "docl_flower" / "core" / "data"
    fake.mkdir(parents=True)
    (fake / "leaky.py").write_text(
        "def f():\n    from ..filter.store import load_filter\n    return load_filter\n"
    )
    assert upward_imports(tmp_path / "docl_flower") == [
        "docl_flower.core.data.leaky -> docl_flower.core.filter.store",
        "docl_flower.core.data.leaky -> docl_flower.core.filter.store.load_filter",
    ]


def test_every_module_belongs_to_a_layer():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert top == [], f"modules outside the layers: {top}"
    layers = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert layers == sorted(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_what_it_may(layer):
    assert violations(layer) == []


def test_the_check_catches_a_core_module_that_imports_flower(tmp_path):
    fake = tmp_path / "docl_flower" / "core"
    fake.mkdir(parents=True)
    (fake / "leaky.py").write_text("from ..federation import keys\nimport flwr.app\n")
    found = violations("core", tmp_path / "docl_flower")
    assert len(found) == 3 and any("flwr.app" in v for v in found)


def test_importing_the_core_does_not_load_flower():
    code = (
        "import sys, importlib, pkgutil, docl_flower.core as c\n"
        "for m in pkgutil.walk_packages(c.__path__, 'docl_flower.core.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n == 'flwr' or n.startswith('flwr.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (function-level imports included)."""
    paths = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets = set()
        for name in imports_of(path, root):
            # ``from .x import y`` names ``pkg.x`` and ``pkg.x.y``: keep what is a module.
            if name in paths and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    # Function-level imports count: a cycle hidden inside a function is still a cycle.
    # A package's __init__ is left out as a target when its own submodule imports it (Python
    # imports the package first anyway; that edge is not a design choice).
    graph = import_graph()
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    assert import_cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    fake = tmp_path / "docl_flower" / "core"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("from . import b\n")
    (fake / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    (fake / "c.py").write_text("from .a import b\n")
    assert import_cycles(import_graph(tmp_path / "docl_flower")) == [
        ["docl_flower.core.a", "docl_flower.core.b"]
    ]
