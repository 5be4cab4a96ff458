"""Imports flow one way: config, storage <- models <- flow <- {data, eval, distributed,
checkpoint} <- train <- cli.

Every `import` statement of every module under arflow/ is read with `ast` (function-level ones
too: they run sooner or later), so a cycle or an upward import fails here, not at some user's
first unlucky import order.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "arflow"

# Lowest first. A module may import modules of its own layer or a lower one. Names are module
# paths below `arflow`; the longest matching prefix decides a module's layer.
LAYERS = [
    {"config", "utils", "storage", "internals"},  # the schema; helpers, storage and adapters
    {"models"},
    {"flow"},
    {"data", "eval", "distributed", "checkpoint"},
    {"train"},
    {"cli", "__main__"},  # the `arflow` command; launchers/ and tools/ are scripts over it
]


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (packages by their __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (relative imports resolved;
    `from pkg import sub` counts `pkg` and the submodule `pkg.sub`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer(module: str) -> int:
    """The layer of a dotted module name (longest prefix listed in LAYERS)."""
    inner = module.removeprefix("arflow.")
    best, best_len = None, -1
    for index, names in enumerate(LAYERS):
        for prefix in names:
            if (inner == prefix or inner.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer of LAYERS: add it"
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for name in modules():
        if name != "arflow":
            layer(name)


def test_no_import_cycle_between_modules():
    assert cycles(graph()) == []


def test_no_import_against_the_layer_order():
    upward = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in graph().items()
        if a != "arflow"
        for b in sorted(targets)
        if b != "arflow" and layer(b) > layer(a)
    ]
    assert upward == []


def test_no_cycle_between_packages_of_one_layer():
    """data, eval, distributed and checkpoint may use each other one way only."""
    top = {}
    for a, targets in graph().items():
        for b in targets:
            pa, pb = a.split(".")[:2], b.split(".")[:2]
            if len(pa) == len(pb) == 2 and pa != pb and layer(a) == layer(b):
                top.setdefault(".".join(pa), set()).add(".".join(pb))
    assert cycles(top) == []


def test_the_checker_sees_cycles_and_upward_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("arflow.config") < layer("arflow.models.arflow") < layer("arflow.train")
    assert layer("arflow.cli.demo") > layer("arflow.train") > layer("arflow.utils.digits")


def test_backends_table_matches_the_config_schema():
    """parallel.backend accepts exactly the names the backend table registers."""
    from arflow.config import ParallelConfig
    from arflow.distributed.parallelize import BACKENDS

    allowed = typing.get_args(typing.get_type_hints(ParallelConfig)["backend"])
    assert set(allowed) == set(BACKENDS)
