"""The shape of the code, held: no import circle (imports inside functions counted), no function a reader has
to scroll, and a run directory's file names spelled in one module (orchestrator/rundir.py)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "tarflow")
MAX_LINES = 60
RUN_DIR_NAMES = {"state.pt", "result.json", "config.yaml", "lease.json", "tracking_backlog.json",
                 "final_metrics.json", "samples.npz", "checkpoint_manager_snapshot.json"}


def modules(package: str) -> dict[str, Path]:
    out = {}
    for f in (ROOT / package).rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules a module imports anywhere in it (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            out |= {c for c in [target, *(f"{target}.{a.name}" for a in node.names)] if c in known}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
    return out - {name}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package):
    mods = modules(package)
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(m):], m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_a_reader_has_to_scroll(package):
    long = []
    for name, path in modules(package).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_run_directory_names_are_spelled_in_one_module():
    spelled = []
    for name, path in modules("orchestrator").items():
        if name == "orchestrator.rundir":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts = {p for p in node.value.split("/") if p}
                if parts & RUN_DIR_NAMES and len(node.value) < 60:  # a path, not a sentence naming one
                    spelled.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not spelled, spelled
