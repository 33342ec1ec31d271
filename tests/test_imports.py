"""The package's import structure: every module imports, no import cycles, only cli.py touches typer/rich.

The graph is read from the source with ast (module-level and function-level imports alike: a lazy
import inside a function still ties two modules together), so a cycle hidden behind a late import
or importlib is found too. Imports under ``if TYPE_CHECKING:`` count as well.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import skullrec

PACKAGE = Path(skullrec.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (packages as their __init__.py)."""
    out = {}
    for info in pkgutil.walk_packages([str(PACKAGE)], "skullrec."):
        rel = info.name.split(".")[1:]
        path = PACKAGE.joinpath(*rel, "__init__.py") if info.ispkg else PACKAGE.joinpath(*rel[:-1], rel[-1] + ".py")
        out[info.name] = path
    out["skullrec"] = PACKAGE / "__init__.py"
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(skullrec modules, other top-level packages) that ``name`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (inside if alias.name.split(".")[0] == "skullrec" else outside).add(
                    alias.name if alias.name.startswith("skullrec") else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "skullrec":
                outside.add(target.split(".")[0])
                continue
            # `from pkg import sub` imports the submodule sub; `from mod import name` imports mod
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                inside.add(sub if sub in modules else target)
    inside.discard(name)
    return {m for m in inside if m in modules}, outside


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules)[0] for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), i.e. every import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_imports() -> None:
    names = sorted(n for n in _modules() if n != "skullrec.__main__")  # __main__ runs the command line
    assert len(names) > 30
    for name in names:
        assert importlib.import_module(name).__name__ == name


def test_the_graph_reader_sees_imports_and_finds_a_planted_cycle() -> None:
    graph = _graph()
    # known edges, read from the source (a relative import, a lazy one inside a function, a package import)
    assert "skullrec.data.resample" in graph["skullrec.inference.predict"]
    assert "skullrec.nets.checkpoint" in graph["skullrec.inference.predict"]
    assert "skullrec.training.distributed" in graph["skullrec.training.trainer"]
    planted = {k: set(v) for k, v in graph.items()}
    planted["skullrec.io"].add("skullrec.inference.predict")  # io -> predict -> io
    assert any({"skullrec.io", "skullrec.inference.predict"} <= set(c) for c in _cycles(planted))


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_only_the_cli_imports_typer_or_rich() -> None:
    modules = _modules()
    users = sorted(n for n, p in modules.items() if _imports(n, p, modules)[1] & {"typer", "rich"})
    assert users == ["skullrec.cli"]


# The pipeline's order: the package's own base modules (config, io, errors, utils, guards, ...) first, then one
# room per stage; the CLI layer on top. A module may import its own stage or an earlier one, never a later one.
STAGES = ("data", "nets", "flatness", "training", "inference", "evaluation", "experiment", "federated", "viewer")


def _stage(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    if parts[1] in ("cli", "__main__"):
        return len(STAGES) + 1
    return STAGES.index(parts[1]) + 1 if parts[1] in STAGES else 0


def test_no_module_imports_a_later_stage_of_the_pipeline() -> None:
    graph = _graph()
    back = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if _stage(b) > _stage(a))
    assert back == []
    # the rule can fail: a data module importing inference is what it is there to catch
    assert _stage("skullrec.inference.stage2") > _stage("skullrec.data.stage2") > _stage("skullrec.io")
