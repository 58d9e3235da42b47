"""The markers `make test-fast` deselects stay true: a test that starts a process (directly, or
through a helper, fixture or script string of its own module) carries `subprocess` or `dist`, and
the family matrix carries `families`. Read from the source (AST), so the check costs nothing and
catches a new test that spawns without its marker."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: names whose use means "starts another process"
SPAWNS = {"subprocess", "Popen", "executable", "start_processes", "spawn", "fork", "NotebookClient"}
FAST = "not slow and not dist and not families and not subprocess"


def _marks(decorators: list[ast.expr]) -> set[str]:
    """`@pytest.mark.X` / `@pytest.mark.X(...)` → {X}."""
    out = set()
    for d in decorators:
        d = d.func if isinstance(d, ast.Call) else d
        if isinstance(d, ast.Attribute) and ast.unparse(d.value) == "pytest.mark":
            out.add(d.attr)
    return out


def _module_marks(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            vals = node.value.elts if isinstance(node.value, ast.List | ast.Tuple) else [node.value]
            return {ast.unparse(v).removeprefix("pytest.mark.") for v in vals}
    return set()


def _names(node: ast.AST) -> set[str]:
    """Every name `node` uses; `from tests.m import f` adds "tests.m:f" (followed across files)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)  # a fixture parameter
        elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("tests."):
            out |= {f"{n.module}:{a.name}" for a in n.names}
        elif isinstance(n, ast.alias):
            out.add(n.asname or n.name.split(".")[0])
    return out


def _defs(tree: ast.Module) -> dict[str, ast.AST]:
    """Module-level functions and constants by name; a name imported from `tests.*` maps to an
    import node whose only name is the qualified "tests.m:f"."""
    defs: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
            for a in node.names:
                defs[a.asname or a.name] = ast.ImportFrom(node.module, [a], 0)
        elif isinstance(node, ast.FunctionDef):
            defs[node.name] = node
        elif isinstance(node, ast.Assign):
            defs |= {t.id: node for t in node.targets if isinstance(t, ast.Name)}
    return defs


def spawning_tests(source: str, modules: dict[str, str] | None = None) -> dict:
    """{test name: (starts a process, its marks incl. the module's)} for one test module. A
    function, fixture or constant of this module, or one imported from `tests.*` (`modules`:
    module name → source, default the files beside this one), spawns when its body does."""
    modules = modules if modules is not None else {}
    trees = {"": ast.parse(source)}
    spawns: dict[str, bool] = {}

    def body(key: str) -> ast.AST | None:
        mod, _, name = key.rpartition(":")
        if mod not in trees:
            path = TESTS / f"{mod.removeprefix('tests.')}.py"
            text = modules.get(mod) or (path.read_text() if path.is_file() else None)
            trees[mod] = ast.parse(text) if text else ast.Module(body=[], type_ignores=[])
        return _defs(trees[mod]).get(name)

    def spawning(key: str, seen: frozenset) -> bool:
        if key not in spawns:
            node, mod = body(key), key.rpartition(":")[0]
            used = {u if ":" in u else f"{mod}:{u}" for u in _names(node)} if node else set()
            spawns[key] = bool({u.rpartition(":")[2] for u in used} & SPAWNS) or any(
                spawning(u, seen | {key}) for u in used if u not in seen and body(u) is not None
            )
        return spawns[key]

    tree = trees[""]
    module = _module_marks(tree)
    return {
        n.name: (spawning(f":{n.name}", frozenset()), _marks(n.decorator_list) | module)
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    }


def test_the_check_sees_spawns_through_helpers_and_module_marks():
    src = (
        "import subprocess, sys, pytest\n"
        "SCRIPT = 'x'\n"
        "def run(): return subprocess.run([sys.executable, '-c', SCRIPT])\n"
        "@pytest.fixture\n"
        "def proc(): return run()\n"
        "def test_direct(): subprocess.run(['ls'])\n"
        "def test_helper(): run()\n"
        "def test_fixture(proc): pass\n"
        "@pytest.mark.dist\n"
        "@pytest.mark.parametrize('a', [1])\n"
        "def test_marked(a): run()\n"
        "def test_plain(): assert 1\n"
    )
    got = spawning_tests(src)
    assert {k: v[0] for k, v in got.items()} == {
        "test_direct": True,
        "test_helper": True,
        "test_fixture": True,
        "test_marked": True,
        "test_plain": False,
    }
    assert got["test_marked"][1] == {"dist", "parametrize"} and got["test_plain"][1] == set()
    marked = spawning_tests("import pytest\npytestmark = pytest.mark.families\ndef test_a(): 1\n")
    assert marked == {"test_a": (False, {"families"})}
    other = {"tests.launchers": "import subprocess\ndef launch(): subprocess.run(['ls'])\n"}
    imported = "def test_b():\n    from tests.launchers import launch\n    launch()\n"
    assert spawning_tests(imported, other) == {"test_b": (True, set())}
    at_top = "from tests.launchers import launch\ndef run(): launch()\ndef test_c(): run()\n"
    assert spawning_tests(at_top, other) == {"test_c": (True, set())}


def test_every_test_that_starts_a_process_is_marked():
    unmarked = [
        f"{f.name}::{name}"
        for f in sorted(TESTS.glob("test_*.py"))
        for name, (spawns, marks) in spawning_tests(f.read_text()).items()
        if spawns and not marks & {"subprocess", "dist", "slow", "gpu"}
    ]
    assert not unmarked, f"mark these @pytest.mark.subprocess (or dist): {unmarked}"


def test_the_family_matrix_is_marked_and_the_markers_are_registered():
    tree = ast.parse((TESTS / "test_families.py").read_text())
    assert "families" in _module_marks(tree)
    root = TESTS.parent
    block = re.search(
        r"^markers = \[\n(.*?)^\]", (root / "pyproject.toml").read_text(), re.M | re.S
    )
    registered = set(re.findall(r'^  "(\w+):', block.group(1), re.M))  # tomllib needs 3.11
    assert {"slow", "dist", "families", "subprocess"} <= registered
    # make test-fast deselects exactly these; make test deselects only `slow`
    make = (root / "Makefile").read_text()
    assert re.search(r"^test-fast:\n\t\$\(PYTHON\) -m pytest -q -m \"" + FAST + '"$', make, re.M)
    assert re.search(r"^test:\n\t\$\(PYTHON\) -m pytest -q$", make, re.M)
