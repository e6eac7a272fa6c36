"""The package's layers point one way: no import cycle, and the library never imports the application.

Read from the source with ``ast`` (every ``import`` anywhere in a module, in functions too), so an
import hidden inside a function or a module ``__getattr__`` counts like any other.

Layers, bottom to top: the library (``grassopt.*``: optimizer, rules, presets, targets, sketch, zo,
memory, profiling, registry, ...), the engine every loop shares (``grassopt.engine``, library too:
it knows no model or data set), and the applications (``train``, ``finetune``, ``bench``, the CLI
parts of ``analysis``, and the ``grassopt`` command itself).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "grassopt"

#: The application: modules (and packages, with everything below them) that may import anything.
APPLICATION = ("grassopt.train", "grassopt.finetune", "grassopt.bench", "grassopt.cli", "grassopt.__main__",
               "grassopt.analysis.cli")
#: Application modules inside a library package (analysis: the diagnostics are library, ``analyze`` runs training).
APPLICATION_MODULES = {"grassopt.analysis"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> set[str]:
    """The grassopt modules that module ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``
    when ``sub`` is a module, else as ``pkg``)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(mod)
    deps = set()
    for mod in found:
        while mod and mod not in MODULES:  # ``import grassopt.sketch.laws as x`` -> the module itself
            mod = mod.rpartition(".")[0]
        if mod.startswith("grassopt") and mod != name:
            deps.add(mod)
    return deps


GRAPH = {name: imports_of(name) for name in MODULES}


def is_application(name: str) -> bool:
    return name in APPLICATION_MODULES or any(name == a or name.startswith(a + ".") for a in APPLICATION)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from its first node)."""
    out, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                out.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return out


def test_the_graph_is_read():
    assert "grassopt.optimizer" in GRAPH["grassopt.presets"]
    assert "grassopt.optim._projected" in GRAPH["grassopt.optimizer"]  # ``from .optim import _plain, _projected``
    assert "grassopt.functional" in GRAPH["grassopt.optim._plain"]  # ``from .. import functional as F``
    assert "grassopt.sketch" in GRAPH["grassopt.train.loop"]  # imports inside functions count
    assert "grassopt.engine" in MODULES and is_application("grassopt.train.loop")
    assert not is_application("grassopt.engine.run") and not is_application("grassopt.analysis.hook")


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("name", [n for n in MODULES if not is_application(n)])
def test_library_modules_do_not_import_the_application(name):
    upward = sorted(m for m in GRAPH[name] if is_application(m))
    assert upward == [], f"{name} (library) imports the application: {upward}"


def test_train_and_finetune_share_the_engine_not_each_other():
    for a, b in (("grassopt.finetune", "grassopt.train"), ("grassopt.train", "grassopt.finetune")):
        for name in MODULES:
            if name == a or name.startswith(a + "."):
                crossing = sorted(m for m in GRAPH[name] if m == b or m.startswith(b + "."))
                assert crossing == [], f"{name} imports {crossing}: what both loops need belongs in grassopt.engine"
    for app in ("grassopt.train.loop", "grassopt.finetune.loop"):
        assert any(m.startswith("grassopt.engine") for m in GRAPH[app]), app
