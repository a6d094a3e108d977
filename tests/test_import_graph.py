"""The modules of `src/fwdlap` import each other without cycles, at their tops.

Imports are read with `ast`, those inside functions included, so a cycle cannot hide
behind an import deferred to call time.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _package(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The fwdlap modules an import statement of module `name` loads."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name in MODULES)
        return
    base = node.module or ""
    if node.level:
        package = _package(name)
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in MODULES:
            yield sub
        elif base in MODULES:
            yield base


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = {
            target
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for target in _targets(name, node)
            if target != name
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "fwdlap._core.trace" in graph["fwdlap._core.transform"]  # sanity
    bad = cycles(graph)
    assert not bad, f"import cycles: {bad}"


def test_the_core_never_imports_the_api() -> None:
    graph = import_graph()
    core = [m for m in graph if m.startswith("fwdlap._core")]
    assert not [(m, t) for m in core for t in graph[m] if t.startswith("fwdlap.api")]


@pytest.mark.parametrize("name", list(MODULES))
def test_imports_are_at_the_top(name: str) -> None:
    tree = ast.parse(MODULES[name].read_text())
    deferred = [
        node.lineno
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    assert not deferred, f"{name}: imports inside functions at lines {deferred}"


SHIM = "fwdlap._core._jax"


def _api_shim_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(m for m in graph if m.startswith("fwdlap.api") and SHIM in graph[m])


def test_the_api_never_imports_jax_internals() -> None:
    # JAX internals stay behind the core's shim; the api layer validates arguments
    # and calls the core (`_core.evaluate` for every evaluation strategy).
    graph = import_graph()
    assert any(m.startswith("fwdlap.api") for m in graph)  # sanity
    assert not _api_shim_imports(graph)


@pytest.mark.parametrize(
    "source",
    [
        "from .._core import _jax",
        "from .._core._jax import Tracer",
        "import fwdlap._core._jax",
        "def f():\n    from fwdlap._core import _jax",
    ],
)
def test_the_checker_finds_a_shim_import(source: str) -> None:
    node = [
        n
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    found = {t for n in node for t in _targets("fwdlap.api._lap", n)}
    assert _api_shim_imports({"fwdlap.api._lap": found}) == ["fwdlap.api._lap"]


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
