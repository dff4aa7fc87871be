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
LAYERS = ("core", "federation", "operations")
#: What each layer may not import: higher layers of the package and (for the core) Flower.
FORBIDDEN = {
    "core": ("docl_flower.federation", "docl_flower.operations", "flwr"),
    "federation": ("docl_flower.operations",),
    "operations": (),
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


def test_every_module_belongs_to_a_layer():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert top == [], f"modules outside the layers: {top}"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == [
        *LAYERS
    ]


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
        "for m in pkgutil.iter_modules(c.__path__):\n"
        "    importlib.import_module('docl_flower.core.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n == 'flwr' or n.startswith('flwr.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
