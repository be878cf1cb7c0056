"""The dependency rules of docs/architecture.md, read from the source: models/ is pure PyTorch and imports no other
layer (nor Ray); pipelines/ imports models/ only; nothing imports tests/; and the modules of models/ import each other
without a cycle (every import counted, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("models", "pipelines", "jobs", "serve")


def imports_of(path: Path) -> set[str]:
    """Every module named by an import statement in the file (absolute names; relative imports resolved)."""
    names = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from models import checkpoint`
    return names


def modules(layer: str) -> dict[str, set[str]]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): imports_of(p) for p in (ROOT / layer).rglob("*.py")}


FORBIDDEN = {
    "models": ("pipelines", "jobs", "serve", "tests", "ray"),
    "pipelines": ("jobs", "serve", "tests"),
    "jobs": ("tests",),
    "serve": ("pipelines", "jobs", "tests"),
}


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_what_it_may(layer):
    bad = sorted(f"{module} imports {name}" for module, names in modules(layer).items() for name in names
                 if name.split(".")[0] in FORBIDDEN[layer])
    assert not bad, bad


def test_models_modules_import_each_other_without_a_cycle():
    imports = modules("models")
    # edges between the modules of models/ (the package itself, a lazy façade over them, is left out)
    graph = {module: {name for name in names if name in imports and name not in (module, "models")}
             for module, names in imports.items()}
    visiting, done, cycles = set(), set(), []

    def visit(module, path):
        if module in done:
            return
        if module in visiting:
            cycles.append(" → ".join(path[path.index(module):] + [module]))
            return
        visiting.add(module)
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, cycles
