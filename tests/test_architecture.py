"""The design's layers ("imports point down only"), checked on the source.

Every module under msam/ and sweeps/ is parsed with ``ast`` (nothing is imported), and every
import of our own modules is collected, at module level and inside functions alike (lazy imports
still run). ``from x import y`` counts as importing ``x.y`` when that is a module, else ``x``; a
package means its ``__init__.py``; ``importlib.import_module("x")`` and the CLI's
``load_entry("x", ...)`` with a literal name count too. Then:

- there is no import cycle among our modules;
- ``msam`` (the library) never imports optuna, optuna_integration or wandb: it runs without them;
- a module imports its own layer or lower ones only, top to bottom:
  sweeps.cli > sweeps.engine, sweeps.claims > sweeps.finals > sweeps.results > sweeps.tracking >
  foundation (sweeps.spec, sweeps.storage, sweeps.studies, sweeps.faults and every other
  top-level sweeps module) > msam.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO

PACKAGES = ("msam", "sweeps")
#: Third-party packages the library must never need (the GPU image lacks them).
SWEEP_ONLY = ("optuna", "optuna_integration", "wandb")
#: Layer of each sweeps subpackage, higher imports lower; any other sweeps module is foundation.
LAYERS = {
    "sweeps.cli": 5,
    "sweeps.engine": 4,
    "sweeps.claims": 4,
    "sweeps.finals": 3,
    "sweeps.results": 2,
    "sweeps.tracking": 1,
}
FOUNDATION, LIBRARY = 0, -1
LAYER_NAMES = {
    5: "sweeps.cli",
    4: "sweeps.engine/sweeps.claims",
    3: "sweeps.finals",
    2: "sweeps.results",
    1: "sweeps.tracking",
    0: "foundation",
    -1: "msam",
}

#: Imports that break the rules, each "importer -> imported", allowed only until the code is fixed:
#: an entry is neither a cycle nor a layer violation for these tests, and an entry that no longer
#: occurs fails ``test_known_violations_still_occur`` so that it gets deleted. Never add to it.
#: Emptied when the three found by this test were fixed: sweeps.results.export and
#: sweeps.results.leaderboard importing each other, sweeps.results.export importing
#: sweeps.finals.run, and sweeps.studies (foundation) importing sweeps.engine.search.
KNOWN_VIOLATIONS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    @property
    def edge(self) -> str:
        return f"{self.importer} -> {self.imported}"

    def __str__(self) -> str:
        return f"{self.edge} ({module_path(self.importer)}:{self.line})"


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module in our packages (a package is its __init__.py)."""
    names = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


MODULES = module_names()


def module_path(name: str) -> str:
    return str(MODULES[name].relative_to(REPO))


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def nearest_module(dotted: str) -> str | None:
    """``dotted`` if it is one of our modules, else its closest enclosing one (None if outside)."""
    parts = dotted.split(".")
    while parts:
        name = ".".join(parts)
        if name in MODULES:
            return name
        parts.pop()
    return None


def _literal_module(call: ast.Call) -> str | None:
    """The module a literal ``import_module("x")``, ``__import__`` or ``load_entry`` names."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__", "load_entry") or not call.args:
        return None
    first = call.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_of(name: str) -> tuple[list[Import], list[tuple[str, int]]]:
    """Our modules that ``name`` imports, and every top-level package it imports (with lines)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))
    package = name if is_package(name) else name.rpartition(".")[0]
    ours: list[Import] = []
    tops: list[tuple[str, int]] = []

    def add(target: str, line: int) -> None:
        tops.append((target.split(".")[0], line))
        resolved = nearest_module(target)
        if resolved is not None and resolved != name:
            ours.append(Import(name, resolved, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in MODULES else base, node.lineno)
        elif isinstance(node, ast.Call) and (literal := _literal_module(node)):
            add(literal, node.lineno)
    return ours, tops


IMPORTS: dict[str, list[Import]] = {}
TOP_LEVEL: dict[str, list[tuple[str, int]]] = {}
for _name in MODULES:
    IMPORTS[_name], TOP_LEVEL[_name] = imports_of(_name)
EDGES = {i.edge: i for imports in IMPORTS.values() for i in imports}


def layer(name: str) -> int:
    if name == "msam" or name.startswith("msam."):
        return LIBRARY
    for prefix, rank in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            return rank
    return FOUNDATION


def components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components that hold a cycle (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def connect(v: str) -> None:  # the graph is small: recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (a -> b -> ... -> a) per strongly connected component that has one."""
    return [_cycle_in(component, graph) for component in components(graph)]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def import_graph(skip: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """Importer -> the modules it imports, leaving out the edges in ``skip``."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for edge, imp in EDGES.items():
        if edge not in skip:
            graph[imp.importer].add(imp.imported)
    return graph


def layer_violations() -> list[Import]:
    return [imp for edge, imp in sorted(EDGES.items()) if layer(imp.imported) > layer(imp.importer)]


# ----------------------------------------------------------------------------- the checks


def test_every_module_parsed_and_imports_found():
    assert {"msam", "msam.trainer", "sweeps.cli", "sweeps.tracking.wandb_runs"} <= set(MODULES)
    assert any(i.imported.startswith("msam") for i in IMPORTS["sweeps.tracking.wandb_runs"])
    assert len(EDGES) > 50


def test_no_import_cycles():
    cycles = find_cycles(import_graph(skip=KNOWN_VIOLATIONS))
    assert not cycles, "import cycles among our modules:\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles
    )


@pytest.mark.parametrize("package", SWEEP_ONLY)
def test_msam_never_imports_sweep_only_packages(package):
    found = [
        f"{module_path(name)}:{line}"
        for name, tops in TOP_LEVEL.items()
        if layer(name) == LIBRARY
        for top, line in tops
        if top == package
    ]
    assert not found, f"msam imports {package} (it must run without it): {', '.join(found)}"


def test_layers_point_down_only():
    upward = [
        f"{imp}: {LAYER_NAMES[layer(imp.importer)]} imports {LAYER_NAMES[layer(imp.imported)]}"
        for imp in layer_violations()
        if imp.edge not in KNOWN_VIOLATIONS
    ]
    assert not upward, "imports pointing up a layer:\n" + "\n".join("  " + u for u in upward)


def test_known_violations_still_occur():
    """The allow-list only shrinks: an entry whose import is gone (or is fine now) must go."""
    cyclic = components(import_graph())
    on_a_cycle = {
        edge
        for edge, imp in EDGES.items()
        if any(imp.importer in c and imp.imported in c for c in cyclic)
    }
    upward = {imp.edge for imp in layer_violations()}
    stale = sorted(KNOWN_VIOLATIONS - on_a_cycle - upward)
    assert not stale, (
        f"fixed, so delete from KNOWN_VIOLATIONS in tests/test_architecture.py: {stale}"
    )


def test_the_checks_catch_what_they_should():
    """The checker itself: a cycle is found and printed, layers rank as documented."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    order = ["sweeps.cli.main", "sweeps.engine.sweep", "sweeps.finals.run", "sweeps.results.read"]
    order += ["sweeps.tracking.wandb_runs", "sweeps.spec", "msam.trainer"]
    assert [layer(m) for m in order] == sorted((layer(m) for m in order), reverse=True)
    assert layer("sweeps.claims") == layer("sweeps.engine.sweep")
    assert layer("sweeps.storage") == layer("sweeps") == FOUNDATION
