"""Exact optimizer-state accounting: what an optimizer holds, live and by formula.

Live: ``state_bytes(optimizer)`` / ``state_breakdown(optimizer)`` count what is really allocated in
the optimizer's state tensors (plain values such as step counts and seeds are not tensors and are
not counted). By formula: ``state_elements(shape, group)`` per parameter (docs/algorithms.md#memory),
priced in a state dtype by :func:`param_state_bytes` (8-bit moments: :func:`moment_bytes`); the two
agree exactly (tests).

Estimates for whole model configs (weights, gradients, states and saved activations of a LLaMA
config built on the ``meta`` device) are in :mod:`grassopt.train.estimate`, beside the model they
describe; measuring a running process (``TensorPeak``, resident memory) is :mod:`grassopt.profiling`,
whose names are also importable from here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .optimizer import SUBSPACE_DEFAULTS
from .profiling import TensorPeak, current_rss_bytes, peak_rss_bytes, peak_rss_since_reset, reset_peak_rss
from .rules import get_rule, rule_flag

__all__ = [
    "state_bytes",
    "state_breakdown",
    "state_elements",
    "expected_state_elements",
    "DTYPES",
    "STATE_DTYPES",
    "INT8_BLOCK",
    "moment_bytes",
    "param_state_bytes",
    # measuring (grassopt.profiling), importable from here as before
    "TensorPeak",
    "peak_rss_bytes",
    "current_rss_bytes",
    "reset_peak_rss",
    "peak_rss_since_reset",
]

_BASIS_KEYS = {"Q"}
_MOMENT_KEYS = {"exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"}  # int8 moments carry block scales
CATEGORIES = ("bases", "moments", "other")

#: dtype names accepted by :func:`estimate` and ``grassopt memory``.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
#: state dtype names accepted by :func:`estimate` and ``grassopt memory --state-dtype``: the dtypes
#: above (every state element in that dtype: the papers' "BF16 states" convention) and ``int8``
#: (SubspaceAdamW's 8-bit Adam moments, see :func:`moment_bytes`).
STATE_DTYPES: dict[str, torch.dtype] = {**DTYPES, "int8": torch.int8}
#: int8 moments: one float32 scale per block of this many consecutive elements of the flattened tensor.
INT8_BLOCK = 256


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype(d: str | torch.dtype) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    try:
        return DTYPES[d]
    except KeyError:
        raise ValueError(f"unknown dtype {d!r}; choose one of {sorted(DTYPES)}") from None


def _size(d: str | torch.dtype) -> int:
    return torch.empty((), dtype=_dtype(d)).element_size()


def _state_dtype(d: str | torch.dtype) -> torch.dtype:
    if d in ("int8", torch.int8):
        return torch.int8
    try:
        return _dtype(d)
    except ValueError:
        raise ValueError(f"unknown state dtype {d!r}; choose one of {sorted(STATE_DTYPES)}") from None


def moment_bytes(numel: int, state_dtype: str | torch.dtype = "fp32") -> int:
    """Bytes of ONE Adam moment tensor (``exp_avg`` or ``exp_avg_sq``) of ``numel`` elements.

    ``int8`` (``SubspaceAdamW(state_dtype="int8")``): one byte per element plus one float32 scale
    per block of :data:`INT8_BLOCK` consecutive elements of the flattened tensor, i.e.
    ``numel + 4 ceil(numel / 256)``. Any other dtype: ``numel`` elements of that dtype.
    """
    if _state_dtype(state_dtype) == torch.int8:
        return numel + 4 * math.ceil(numel / INT8_BLOCK)
    return numel * _size(state_dtype)


def param_state_bytes(shape: tuple[int, ...] | torch.Size, group: dict[str, Any],
                      state_dtype: str | torch.dtype = "fp32") -> dict[str, int]:
    """Bytes of one parameter's optimizer state by category (``bases``, ``moments``, ``other``):
    :func:`state_elements` priced in ``state_dtype``. The one place where a state dtype becomes bytes.

    ``int8``: the two moments as :func:`moment_bytes` each (projected: ``k x r`` each; plain: the
    parameter's shape); the basis ``Q`` and the other state (recovery's or the limiter's scalar,
    LDAdam's error buffer) stay float32. Other dtypes: every element in that dtype.
    """
    el = state_elements(shape, group)
    if _state_dtype(state_dtype) == torch.int8:
        return {"bases": 4 * el["bases"], "moments": 2 * moment_bytes(el["moments"] // 2, "int8"),
                "other": 4 * el["other"]}
    size = _size(state_dtype)
    return {k: v * size for k, v in el.items()}


# ---------------------------------------------------------------------------------------- live state
def state_breakdown(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the live optimizer state split into ``bases`` (``Q``), ``moments`` (Adam's two, with
    their block scales when they are int8) and ``other`` (the limiter's previous norm, LDAdam's
    error-feedback buffer, ...)."""
    out = dict.fromkeys(CATEGORIES, 0)
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor):
                kind = "bases" if k in _BASIS_KEYS else "moments" if k in _MOMENT_KEYS else "other"
                out[kind] += _nbytes(v)
    return out


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of every tensor in the optimizer's state (what is really allocated)."""
    return sum(state_breakdown(optimizer).values())


# ---------------------------------------------------------------------------------------- formula
def state_elements(shape: tuple[int, ...] | torch.Size, group: dict[str, Any]) -> dict[str, int]:
    """State elements of one parameter under ``group``'s settings, by category (docs/algorithms.md#memory).

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
    g = {**SUBSPACE_DEFAULTS, **group}
    m, n = shape
    d, k, r = min(m, n), max(m, n), g["rank"]
    seeded = rule_flag(get_rule(g["rule"]), "FROM_SEED")
    other = (1 if g["recovery"] or g["scaling"] is not None else 0) + (m * n if g["error_feedback"] else 0)
    return {"bases": 0 if seeded else d * r, "moments": 2 * k * r, "other": other}


def expected_state_elements(shape: tuple[int, ...] | torch.Size, group: dict[str, Any]) -> int:
    """Total state elements of one parameter under ``group``'s settings (see :func:`state_elements`)."""
    return sum(state_elements(shape, group).values())
