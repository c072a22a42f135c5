"""The package's layers, read from its imports: data flows one way, nothing imports upward.

The layer order is the README's architecture paragraph; a module may import only from layers below
its own (or from its own sub-package). Imports inside functions count too: a hidden import is still
an edge.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import lowrank_spin

PACKAGE = Path(lowrank_spin.__file__).parent

# lowest first; one layer per line of the README's paragraph
LAYERS = [
    {"settings", "files", "faults"},
    {"embedded"},
    {"batching", "templates", "memory"},
    {"losses", "models", "vllm_engine"},  # vllm_engine: below generation, which picks it
    {"generation"},
    {"opponent"},
    {"data"},
    {"evaluation", "lm_eval_tasks"},
    {"judge"},
    {"callbacks"},
    {"module"},
    {"compare", "lm_eval_runner"},
    {"cli"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def _unit(path: Path) -> str:
    """The top-level unit of the package a file belongs to (`data` for data/chat.py)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The package units a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lowrank_spin" and len(parts) > 1 and parts[1] in LAYER:
                found.add(parts[1])
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in FILES}
    assert units <= set(LAYER), f"add these to LAYERS (and the README's paragraph): {units - set(LAYER)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path):
    unit = _unit(path)
    upward = {other for other in _imports(path) - {unit} if LAYER[other] >= LAYER[unit]}
    assert not upward, (
        f"{path.relative_to(PACKAGE)} (layer {LAYER[unit]}) imports from its own or a higher layer: {upward}"
    )


def test_the_data_layer_never_reaches_into_the_module():
    """The DataModule gets the opponent handed to it; it never asks the trainer for the LightningModule."""
    for path in (PACKAGE / "data").rglob("*.py"):
        assert "lightning_module" not in path.read_text(), path


def test_every_module_imports():
    """An import smoke test of every module of the package."""
    for info in pkgutil.walk_packages(lowrank_spin.__path__, "lowrank_spin."):
        if info.name != "lowrank_spin.lm_eval_tasks.utils":  # loaded by lm_eval from a copy, not imported
            importlib.import_module(info.name)
