"""The package's shape: no import cycles, data flowing one way, modules a reader can hold.

Read from the source with `ast` (nothing is imported), so a cycle that only shows up on
some import order is caught too. Imports under `if TYPE_CHECKING:` are for the type
checker only and do not count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "consumer"
MAX_LINES = 400
# Over the limit, and why.
LONG_MODULES: dict[str, str] = {
    "consumer/stream/memory_broker.py": (
        "the broker's shared state (topics, groups, transactions, faults) behind one lock; "
        "its clients live in memory_consumer/memory_producer"
    ),
    "consumer/training/loop.py": (
        "one training run's flow (data, model, epochs with resume, save, calibrate, report) "
        "in order; its teacher and calibration live in distill.py, the state in resume.py"
    ),
}
# What each concern may import from the others: the flow is stream -> fetch -> decode ->
# engine -> publish -> commit, with config, errors and ops (metrics, health) underneath
# and the commands (cli, demo, event_source, preflight, eval, training) on top.
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "errors": set(),
    "ops": {"config"},
    "fetch": {"config", "errors", "__init__"},
    "decode": {"config", "errors"},
    "engine": {"config"},
    "stream": {"config", "errors", "ops", "fetch", "decode"},
    "event_source": {"config", "stream"},
    "replay": {"config", "stream"},
    # The summarizer: Kafka edges and client errors from stream, logging from ops.
    "summarize": {"config", "stream", "ops"},
    "dashboard": {"config", "ops", "stream"},
    "preflight": {"config", "ops", "engine", "stream"},
    "eval": {"config", "errors", "decode", "engine", "event_source"},
    "training": {"config", "engine", "eval"},
    "demo": {"config", "ops", "engine", "stream", "event_source", "summarize", "dashboard"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_imports(tree: ast.AST) -> Iterator[str]:
    """Every module named by an import, except inside `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (name for child in node.orelse for name in _runtime_imports(child))
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        else:
            yield from _runtime_imports(node)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {m for m in _runtime_imports(tree) if m in MODULES and m != name}
    return graph


def _concern(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_concern_imports_only_what_lies_beneath_it() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if (source := _concern(module)) in ALLOWED
        and _concern(target) != source
        and _concern(target) not in ALLOWED[source]
    )
    assert wrong == []


@pytest.mark.parametrize("path", sorted(MODULES.values()), ids=lambda p: p.name)
def test_modules_stay_small_enough_to_read(path: Path) -> None:
    relative = path.relative_to(ROOT).as_posix()
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if relative in LONG_MODULES:
        return
    assert lines <= MAX_LINES, f"{relative} has {lines} lines; split it or say why in LONG_MODULES"
