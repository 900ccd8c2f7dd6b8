"""The package layering a newcomer can rely on, read from the source (no imports run):

    benchmarks, scripts (beside tests) -> toyworld -> evaluation -> preference -> refl -> reward -> runkit

A package imports only packages to its right (the top floor's may import any below them, not each other),
and no two modules import each other, even through imports inside functions (those hide a cycle until the
day someone moves one to the top).
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("toyworld", "evaluation", "preference", "refl", "reward", "runkit")  # top to bottom
# The top floor, beside the tests: a checkout's commands, outside the installed packages.
TOP = ("benchmarks", "scripts")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports anywhere in its body; `from pkg import name` counts as pkg.name when
    that is a module of this repository, else as pkg."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (REPO / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    REPO / Path(*sub.split(".")) / "__init__.py").is_file()
                found.add(sub if is_module else node.module)
    return found


def package_sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", TOP + LAYERS)
def test_a_package_imports_only_the_layers_below_it(package):
    beside = ("tests", "helpers", *(p for p in TOP if p != package))
    above = beside if package in TOP else (*beside, *LAYERS[: LAYERS.index(package)])
    wrong = {f"{path.relative_to(REPO)} imports {name}"
             for path in package_sources(package) for name in imported_modules(path)
             if name.split(".")[0] in above}
    assert not wrong, sorted(wrong)


def test_reward_and_refl_never_name_evaluation_or_toyworld():
    # Strings too: a "toyworld.evaluators:oracle" registry entry is an import by another name.
    wrong = [str(path.relative_to(REPO)) for package in ("reward", "refl")
             for path in package_sources(package)
             if any(isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value.startswith(("toyworld.", "evaluation."))
                    for node in ast.walk(ast.parse(path.read_text())))]
    assert not wrong


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def import_graph(packages) -> dict[str, set[str]]:
    modules = {module_name(path): path for package in packages for path in package_sources(package)}
    return {name: {m for m in imported_modules(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycles_in_evaluation_and_toyworld():
    graph = import_graph(("evaluation", "toyworld"))
    assert {"evaluation.harness", "evaluation.report", "toyworld.world", "toyworld.render"} <= set(graph)
    assert not _cycles(graph)


def test_no_import_cycles():
    graph = import_graph(TOP + LAYERS)
    assert {"reward.standard", "reward.standard.base", "reward.standard.imagereward", "refl.step",
            "refl.step.methods.refl", "benchmarks.refl", "benchmarks.memory_model"} <= set(graph)
    assert not _cycles(graph)


def test_the_top_floor_stays_out_of_the_wheel():
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"]
    assert all(any(fnmatch.fnmatch(p, pattern) for pattern in include) for p in LAYERS)
    assert not [(p, pattern) for p in TOP for pattern in include if fnmatch.fnmatch(p, pattern)]


def test_one_class_name_for_one_thing():
    # Two configs (or any classes) with one name force aliases on import; `Settings` is kept for the shared
    # training vocabulary the trainers' configs subclass, every other config is a `Config`.
    defined: dict[str, list[str]] = {}
    for package in TOP + LAYERS:
        for path in package_sources(package):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef):
                    defined.setdefault(node.name, []).append(module_name(path))
    assert not {name: where for name, where in defined.items() if len(where) > 1}
    assert [name for name in defined if name.endswith("Settings")] == ["TrainSettings"]
