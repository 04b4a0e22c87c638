"""The import graph of the project, read from the source (every ``import``, at module
level or inside a function: a lazy import is still a dependency): the command line is
the outermost layer, so no package imports ``sr_cli``; no two modules depend on each
other, directly or through others; and what the training VMs run (``python -m
jobs.train``) loads nothing of the ``sr`` command."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sr_core", "sr_cli", "jobs", "batch", "infra")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_by(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that ``name`` imports (``from pkg import mod`` counts as
    ``pkg.mod`` when that is a module, else as ``pkg``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a.b.c -> the deepest module of ours
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported_by(name, path, known) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_known_edges():
    # so that an empty graph cannot make the tests below pass
    edges = graph()
    assert "sr_core.storage" in edges["sr_core.lease"]
    assert any(target.startswith("sr_core") for target in edges["jobs.train"])
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_package_imports_sr_cli():
    edges = graph()
    offenders = sorted(f"{m} -> {t}" for m, targets in edges.items() if not m.startswith("sr_cli")
                       for t in targets if t == "sr_cli" or t.startswith("sr_cli."))
    assert offenders == [], offenders


def test_no_import_cycle_between_modules():
    # A package's __init__ importing its own modules is how packages work, not a cycle.
    edges = {m: {t for t in targets if not (m.startswith(t + ".") and t in PACKAGES)}
             for m, targets in graph().items()}
    assert cycles(edges) == []


def test_the_training_entry_point_does_not_load_the_sr_command():
    code = ("import runpy, sys\n"
            "sys.argv = ['jobs.train', '--help']\n"
            "try:\n"
            "    runpy.run_module('jobs.train', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sorted(m for m in sys.modules if m == 'sr_cli' or m.startswith('sr_cli.')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = done.stdout.strip().splitlines()[-1]
    assert loaded == "[]", f"python -m jobs.train loads {loaded}"
