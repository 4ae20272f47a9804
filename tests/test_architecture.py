"""The layout's promises: no import circles, dependencies one way, no string-keyed run config below the boundary."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from msfusion_flwr.config import DEFAULTS

PACKAGE = Path(__file__).resolve().parents[1] / "msfusion_flwr"
BOUNDARY = {"config", "apps", "__main__", "experiments.comparison", "protocol"}
"""Modules that take the run config as a flat mapping: they resolve it (the harness builds matrices of it),
or, ``protocol``, write it into a train message's record and read it back as ``TrainInstructions``."""
LAYERS = {
    "storage": 0, "engine": 0, "data": 0, "models": 1, "config": 2, "protocol": 3, "device": 4, "server": 4,
    "apps": 5, "experiments": 6, "deployment": 0, "__main__": 7,
}  # fmt: skip
"""Package -> layer: a module may import only from lower layers or its own package."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Package-internal modules a ``from ... import ...`` at module level names."""
    if node.level == 0:
        if not (node.module or "").startswith("msfusion_flwr"):
            return []
        base = (node.module or "").removeprefix("msfusion_flwr").lstrip(".")
    else:
        parts = importer.split(".") if importer else []
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
        base = ".".join([*parts, *([node.module] if node.module else [])])
    return [base] if base else []


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (imports inside functions are lazy, left out)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, tree in mods.items():
        path_is_package = (PACKAGE / name.replace(".", "/") / "__init__.py").exists() if name else True
        deps: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for target in resolve(name, path_is_package, node):
                    deps.add(target)
                    for alias in node.names:  # ``from . import participant`` names a module
                        if f"{target}.{alias.name}".lstrip(".") in mods:
                            deps.add(f"{target}.{alias.name}".lstrip("."))
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join([*stack[stack.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_packages_depend_one_way():
    """engine/data/storage import no other package; device and server do not import each other; nothing imports apps."""
    for importer, deps in import_graph().items():
        top = importer.split(".")[0] or "__init__"
        if top == "__init__":
            continue
        for dep in deps:
            target = dep.split(".")[0]
            if target == top or not target:
                continue
            assert LAYERS[target] < LAYERS[top] or (top, target) == ("experiments", "apps"), f"{importer} imports {dep}"
            assert {top, target} != {"device", "server"}, f"{importer} imports {dep}"


def string_keyed_config_reads(tree: ast.Module) -> list[str]:
    """``x["<run-config key>"]`` and ``x.get("<run-config key>")`` on anything but a node config."""
    found = []
    for node in ast.walk(tree):
        key, target = None, None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key, target = node.slice.value, node.value
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and node.args and isinstance(node.args[0], ast.Constant)
        ):  # fmt: skip
            key, target = node.args[0].value, node.func.value
        if key in DEFAULTS and not (isinstance(target, ast.Attribute) and target.attr == "node_config"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_string_keyed_run_config_below_the_boundary():
    """Below the boundary modules read typed settings (RunConfig, TrainInstructions), never config["key"]."""
    offenders = {
        name: reads
        for name, tree in modules().items()
        if name not in BOUNDARY and (reads := string_keyed_config_reads(tree))
    }
    assert offenders == {}

