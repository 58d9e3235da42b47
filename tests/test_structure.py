"""The package's shape, as README's Layout describes it: small modules and functions, and layers
that import only downward (so the pure math never pulls in a model, the report never a GPU
stack, and no library module depends on a command-line entry point)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cwdpo"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

#: What each layer may import from cwdpo (besides itself). Lower layers come first.
ALLOWED: dict[str, set[str]] = {
    "batch": set(),
    "errors": set(),
    "rules": set(),  # what a config value may be: the objectives' dataclasses and the schema
    "utils": {"batch", "errors"},
    "data": {"batch", "errors", "utils"},
    "losses": {"batch", "rules"},
    # the embedded tiny model's tokenizer is trained on ShapesWorld's words (cwdpo.data.shapes)
    "model": {"batch", "errors", "utils", "losses", "data"},
    "metrics": {"batch", "errors", "utils", "data", "losses", "model"},
    "stages": {"batch", "errors", "utils", "losses", "model"},
    "callbacks": {"batch", "errors", "utils", "data", "losses", "model", "metrics"},
    "analysis": {"batch", "errors", "utils", "data", "metrics"},
    "run": {
        *("batch", "errors", "rules", "utils", "data", "losses", "model", "metrics"),
        *("stages", "callbacks", "analysis"),
    },
    "perf": {"batch", "errors", "utils", "data", "losses", "model", "stages", "run"},
}
ENTRY_POINTS = {"train", "eval", "bench", "report", "plot", "doctor", "gpu_check", "perturb"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "cwdpo" and len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    """Every cwdpo module this file imports, at module level or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module == "cwdpo":  # `from cwdpo import x`
                out.update(f"cwdpo.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] == "cwdpo"}


def test_modules_and_functions_are_small() -> None:
    too_long = []
    for path in _modules():
        text = path.read_text()
        rel = path.relative_to(PACKAGE.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "\n".join(too_long)


def test_layers_import_only_downward() -> None:
    wrong = []
    for path in _modules():
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        layer = _layer(".".join(rel.parts))
        if layer is None or layer in ENTRY_POINTS or layer == "__init__":
            continue
        assert layer in ALLOWED, f"{rel}: layer {layer!r} is not in the layer table"
        for imported in _imports(path):
            dep = _layer(imported)
            if dep not in (None, layer) and dep not in ALLOWED[layer]:
                wrong.append(f"{rel} ({layer}) imports {imported}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_points_are_thin_and_unimported(entry: str) -> None:
    """A command is argument parsing over the library: nothing in the library imports it."""
    importers = [
        str(p.relative_to(PACKAGE.parent))
        for p in _modules()
        if p.stem not in ENTRY_POINTS or p.parent != PACKAGE
        if f"cwdpo.{entry}" in _imports(p)
    ]
    assert not importers, f"cwdpo.{entry} is imported by {importers}"
    assert len((PACKAGE / f"{entry}.py").read_text().splitlines()) <= 150
