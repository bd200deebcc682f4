"""The shape of the code: no import cycles in core/ and launch/ (function-level imports included,
so none can hide one), and the registries are the only lists of kinds."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [*ROOT.glob("core/**/*.py"), *ROOT.glob("launch/**/*.py")]
    return {module_name(p): p for p in files}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its file (top level or inside functions)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_core_and_launch():
    modules = project_modules()
    assert {"core.loop", "core.recipe", "core.tasks.base", "launch.cli"} <= modules.keys()
    graph = {name: imported(name, path, set(modules)) for name, path in modules.items()}
    assert graph["core.loop"] >= {"core.tasks", "core.evaluators", "core.engines"}  # sees edges
    assert cycles(graph) == []


def test_entry_points_import_on_their_own():
    """Each in a fresh interpreter, first: an order-dependent import would fail here."""
    for name in ("core.config", "core.tasks.base", "core.evaluators", "core.engines",
                 "core.recipe", "core.loop", "launch.cli"):  # fmt: skip
        code = f"import {name}, sys; assert 'deepspeed' not in sys.modules, 'deepspeed loaded'"
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, (name, done.stderr[-2000:])
