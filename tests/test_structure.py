"""The house rules of conformance/ that a reader relies on (docs/architecture.md): no import
circles (imports inside functions and under TYPE_CHECKING count alike), no module past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "conformance"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the conformance modules it imports (an imported name that is a module counts)."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            graph[name] |= {target for target in targets if target in paths and target != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_finds_a_circle_when_there_is_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_conformance_has_no_import_circle():
    graph = import_graph()
    assert "conformance.checks.run" in graph["conformance.checks"]  # the graph sees package imports
    assert circles(graph) == []


MAX_LINES = 400  # a module past this is two jobs (docs/architecture.md)


def test_no_module_of_conformance_passes_400_lines():
    long = {module_name(path): count for path in PACKAGE.rglob("*.py")
            if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


# The rows of docs/architecture.md's module map, from the bottom up: a module imports only from
# its own row or a row above it (the package itself, `from conformance import x`, aside).
ROWS = [
    ("case format", ["schema", "schema_export", "yamlio", "case", "timing"]),
    ("problem", ["datasets", "network", "problem", "prepare", "compare", "records"]),
    ("backends", ["backends", "results", "workers"]),
    ("formulas", ["environment", "formulas", "expectations"]),
    ("references", ["optimizers", "schedules", "model_loss", "compute_dtype", "reference", "rounding_bands", "fits",
                    "references"]),
    ("checks", ["checks"]),
    ("generated cases", ["fuzz_draws", "fuzz", "shrink"]),
    ("pytest and report", ["items", "plugin", "test_parity", "report", "doctor", "bounds", "__main__"]),
]


def row_of(module: str) -> int:
    name = module.removeprefix("conformance.")
    for index, (_, members) in enumerate(ROWS):
        if any(name == member or name.startswith(member + ".") for member in members):
            return index
    raise AssertionError(f"{module} is in no row of docs/architecture.md's module map")


def test_no_import_runs_up_a_row_of_the_module_map():
    graph = import_graph()
    upward = [f"{module} -> {target}" for module, targets in graph.items() if module != "conformance"
              for target in targets if target != "conformance" and row_of(target) > row_of(module)]
    assert upward == []
