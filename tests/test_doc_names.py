"""The Python names the README and the benchmark write-ups give in backticks (```grassopt.x.y```) exist:
a function moved (``grassopt.memory.estimate`` -> ``grassopt.train.estimate.estimate``) leaves no stale name."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "benchmarks").glob("*.md"))]
NAME = re.compile(r"`(grassopt(?:\.[A-Za-z_]\w*)+)")


def resolves(name: str) -> bool:
    """``name`` is a module, or an attribute (chain) of the longest module prefix of it that imports."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_the_resolver_tells_a_moved_name_from_a_present_one():
    assert resolves("grassopt.train.estimate.estimate") and resolves("grassopt.train")
    assert not resolves("grassopt.train.estimate.no_such_function") and not resolves("grassopt.no_such_module.f")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_grassopt_name_in_the_docs_exists(doc):
    missing = sorted({n for n in NAME.findall(doc.read_text(encoding="utf-8")) if not resolves(n)})
    assert not missing, f"{doc.relative_to(ROOT)} names {missing}, which do not exist"
