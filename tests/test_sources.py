"""What the sources say of themselves: the package's imports flow one way (none inside a function), the files they
cite exist, and the releases they name are released. Read from the checkout (skipped when tests/ runs without it)."""
import ast
import re
from pathlib import Path

import pytest

import cbn

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cbn"
pytestmark = pytest.mark.skipif(not (PACKAGE / "modules.py").is_file(), reason="the checkout's cbn/ is not here")


def _cbn_imports(path):
    """(module imported, whether inside a function) for each import of a cbn module in ``path``."""
    tree = ast.parse(path.read_text())
    inside = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cbn."):
            names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("cbn.")]
        else:
            continue
        for name in names:
            yield name.split(".")[0], id(node) in inside


def _graph():
    return {path.stem: list(_cbn_imports(path)) for path in sorted(PACKAGE.glob("*.py"))}


def test_no_function_imports_a_cbn_module():
    local = {module: [name for name, in_function in imports if in_function] for module, imports in _graph().items()}
    assert {module: names for module, names in local.items() if names} == {}


def test_imports_flow_one_way():
    """No cycle; the layer modules build on modules.py, and only cbn/__init__.py and the file loader import the
    module of every layer class (freeze and precise_stats walk models without importing MPI's module)."""
    graph = {module: {name for name, _ in imports} for module, imports in _graph().items()}
    done = set()

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        if module not in done:
            for name in sorted(graph.get(module, ())):
                visit(name, path + (module,))
            done.add(module)

    for module in graph:
        visit(module, ())
    assert {module for module, names in graph.items() if "distributed" in names} == {"__init__", "_load"}
    assert "_walk" in graph["frozen"] and "_walk" in graph["precise"] and "modules" in graph["_walk"]


def _sources():
    return [*sorted(PACKAGE.glob("*.py")), *sorted(PACKAGE.glob("*.pyx")), *sorted((ROOT / "tests").glob("*.py"))]


def test_cited_files_exist():
    cited = {(path.name, name) for path in _sources() for name in re.findall(r"\b[\w./-]+\.md\b", path.read_text())}
    assert {(source, name) for source, name in cited if not (ROOT / name).is_file()} == set()


def test_named_releases_exist():
    """A comment or message may name cbn's releases up to the current version only."""
    def key(version):
        return tuple(int(part) for part in version.split("."))

    named = {(path.name, v) for path in _sources() for v in re.findall(r"\bcbn (\d+\.\d+(?:\.\d+)?)", path.read_text())}
    assert {(source, v) for source, v in named if key(v) > key(cbn.__version__)} == set()
