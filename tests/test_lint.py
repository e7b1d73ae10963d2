"""The code is lint-clean under the project's ruff configuration (pyproject.toml)."""

import ast
import graphlib
import shutil
import subprocess

import pytest
from conftest import ROOT


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    r = subprocess.run([ruff, "check", "--output-format", "concise", str(ROOT)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def _tarflow_modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted((ROOT / "tarflow").glob("*.py"))}


def test_no_function_in_tarflow_over_60_lines():
    long = [f"tarflow/{name}.py:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in _tarflow_modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long


def _imported_siblings(tree: ast.Module, names: set[str]) -> set[str]:
    """tarflow modules a module imports anywhere in it, function bodies included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("tarflow")):
            module = (node.module or "").removeprefix("tarflow").lstrip(".").split(".")[0]
            found.update([module] if module else [a.name for a in node.names])  # "from . import x"
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tarflow."))
    return found & names


def test_tarflow_imports_run_one_way():
    """No import cycle among tarflow's modules, counting imports inside functions (which would only hide one)."""
    modules = _tarflow_modules()
    graph = {name: _imported_siblings(tree, set(modules)) - {name}
             for name, tree in modules.items() if name != "__init__"}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:  # e.args[1] lists each module before one that imports it
        pytest.fail(f"import cycle among tarflow modules: {' imports '.join(reversed(e.args[1]))}")
