"""Exact optimizer-state accounting (ALGORITHMS.md section 6).

``state_bytes(optimizer)`` counts what is really allocated in the optimizer's state tensors;
``expected_state_elements(shape, group)`` is the formula. The two must agree exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["state_bytes", "state_breakdown", "state_elements", "expected_state_elements"]

_BASIS_KEYS = {"Q"}
_MOMENT_KEYS = {"exp_avg", "exp_avg_sq"}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def state_breakdown(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the live optimizer state split into ``bases``, ``moments`` and ``other``."""
    out = {"bases": 0, "moments": 0, "other": 0}
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor):
                kind = "bases" if k in _BASIS_KEYS else "moments" if k in _MOMENT_KEYS else "other"
                out[kind] += _nbytes(v)
    return out


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of every tensor in the optimizer's state (what is really allocated)."""
    return sum(state_breakdown(optimizer).values())


def state_elements(shape: tuple[int, ...] | torch.Size, group: dict[str, Any]) -> dict[str, int]:
    """State elements of one parameter under ``group``'s settings, by category (ALGORITHMS.md 6).

    Plain AdamW: ``2 numel`` moments. Projected ``m x n`` at rank ``r`` (``d = min``, ``k = max``):

    - bases: ``d r``, except for rules that regenerate ``Q`` from a seed (``gaussian``: the seed is
      a plain int, no tensor);
    - moments: ``2 k r``;
    - other: ``1`` (the norm-growth limiter's previous norm, with recovery scaling or APOLLO's
      scaling) ``+ m n`` (LDAdam's error-feedback buffer).

    So APOLLO is ``2 k r + 1``, APOLLO-Mini ``2 k + 1``, LDAdam ``d r + 2 k r + m n``. (Section 6
    writes APOLLO as ``2 k r (+ a seed)`` and leaves out the limiter's one float.)
    """
    if group.get("rank") is None:
        return {"bases": 0, "moments": 2 * math.prod(shape), "other": 0}
    from .optimizer import SUBSPACE_DEFAULTS
    from .rules import get_rule, rule_flag

    g = {**SUBSPACE_DEFAULTS, **group}
    m, n = shape
    d, k, r = min(m, n), max(m, n), g["rank"]
    seeded = rule_flag(get_rule(g["rule"]), "FROM_SEED")
    other = (1 if g["recovery"] or g["scaling"] is not None else 0) + (m * n if g["error_feedback"] else 0)
    return {"bases": 0 if seeded else d * r, "moments": 2 * k * r, "other": other}


def expected_state_elements(shape: tuple[int, ...] | torch.Size, group: dict[str, Any]) -> int:
    """Total state elements of one parameter under ``group``'s settings (see :func:`state_elements`)."""
    return sum(state_elements(shape, group).values())
