"""Importing jaxscale is cheap: heavy and optional packages load when a feature needs them, not before; a
missing optional package is named together with the extra that installs it."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OPTIONAL = ["matplotlib", "scipy", "tokenizers", "pyarrow", "datasets"]  # the plot, scaling, data, hf extras
HEAVY = ["jax", "flax", "optax", "orbax", "tensorstore"]


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def loaded_after(code: str) -> list[str]:
    """The top-level packages of OPTIONAL + HEAVY that a fresh interpreter holds after running `code`."""
    result = run_python(f"import json, sys\n{code}\n"
                        f"print(json.dumps(sorted({{m.partition('.')[0] for m in sys.modules}})))")
    assert result.returncode == 0, result.stderr
    return sorted(set(json.loads(result.stdout.splitlines()[-1])) & {*OPTIONAL, *HEAVY})


@pytest.mark.parametrize("code", ["import jaxscale", "import jaxscale.data",
                                  "import jaxscale.training.curves, jaxscale.cost.estimate, jaxscale.scaling.sweep"])
def test_package_and_light_modules_load_neither_jax_nor_optional_packages(code):
    assert loaded_after(code) == []


def test_config_and_cli_load_no_optional_package():
    code = ("import jaxscale\njaxscale.load_config('gpt2-124m', ['mesh=tpu-v5e-256'])\n"
            "from jaxscale.cli import build_parser\nbuild_parser().parse_args(['train'])")
    assert not set(loaded_after(code)) & set(OPTIONAL)


def test_training_loads_jax_on_first_use():
    assert {"jax", "orbax"} <= set(loaded_after("from jaxscale import train"))


@pytest.mark.parametrize("hidden, code, extra", [
    ("matplotlib", "from jaxscale.training.curves import curves_figure; curves_figure([])", "plot"),
    ("scipy", "import jaxscale.scaling.fit", "scaling"),
    ("tokenizers", "from jaxscale.data import load_tokenizer; load_tokenizer('tok.json')", "data"),
])
def test_a_missing_optional_package_names_its_extra(hidden, code, extra):
    # sys.modules[name] = None makes `import name` fail as it does where the package is not installed
    probe = (f"import sys\nsys.modules[{hidden!r}] = None\nfrom jaxscale.extras import MissingDependency\n"
             f"try:\n    {code}\nexcept MissingDependency as e:\n    print(e)\n")
    result = run_python(probe)
    assert f"needs {hidden}, which is not installed: pip install 'jaxscale[{extra}]'" in result.stdout, \
        result.stdout + result.stderr


def import_graph() -> dict[str, set[str]]:
    """jaxscale's modules, each with the jaxscale modules it imports anywhere in its file (module level, inside
    functions, under TYPE_CHECKING): `from P import name` counts as importing P.name where that is a module."""
    package = REPO / "jaxscale"
    paths = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        graph[module] = targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package, up level - 1 more
                    parts = module.split(".")[:len(module.split(".")) - node.level + is_package]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
                targets.update(name if name in paths else base for name in names)
        targets.intersection_update(paths)
        targets.discard(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (its nodes in import order, the first repeated at the end) for each strongly connected group of
    nodes larger than one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = {stack.pop()}
            while node not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [cycle_through(graph, group) for group in groups]


def cycle_through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first node back to itself, through the group only (breadth first)."""
    start = min(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{group} holds no cycle")


def folder(module: str) -> str:
    """The part of the package a module belongs to: its subpackage (jaxscale.training), or itself for a
    module at the top (jaxscale.sharding)."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_no_import_cycle_between_folders():
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        graph.setdefault(folder(module), set()).update(folder(t) for t in targets)
    for part, targets in graph.items():
        targets.discard(part)
    found = cycles(graph)
    assert not found, "import cycles between folders:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_the_cycle_finder_names_each_cycle_once():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"f"}, "f": {"e", "a"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
