"""Exact optimizer-state accounting (ALGORITHMS.md section 6).

``state_bytes(optimizer)`` counts what is really allocated in the optimizer's state tensors;
``expected_state_elements(shape, group)`` is the formula. The two must agree exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["state_bytes", "state_breakdown", "expected_state_elements"]

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


def expected_state_elements(shape: tuple[int, int] | torch.Size, group: dict[str, Any]) -> int:
    """State elements of one parameter under ``group``'s settings (ALGORITHMS.md section 6).

    Plain AdamW: ``2 numel``. Projected ``m x n`` at rank ``r``: ``d r`` (basis) ``+ 2 k r``
    (moments) ``+ 1`` (the limiter's previous norm, with recovery scaling).
    """
    if group.get("rank") is None:
        numel = 1
        for s in shape:
            numel *= s
        return 2 * numel
    m, n = shape
    d, k, r = min(m, n), max(m, n), group["rank"]
    return d * r + 2 * k * r + (1 if group.get("recovery") else 0)
