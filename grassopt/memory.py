"""Exact optimizer-state accounting: what an optimizer holds, live and by formula.

Live: ``state_bytes(optimizer)`` / ``state_breakdown(optimizer)`` count what is really allocated in
the optimizer's state tensors (plain values such as step counts and seeds are not tensors and are
not counted). By formula: :func:`param_state_bytes` prices the optimizer's own declaration of a
parameter's state (``grassopt.optim.state.state_spec``: keys, dtypes, shapes, with the moments laid
out by the group's codec, :data:`grassopt.codecs.CODECS`); the two agree exactly (tests).
:func:`state_elements` counts the same declaration's elements (docs/algorithms.md#memory).

Estimates for whole model configs (weights, gradients, states and saved activations of a LLaMA
config built on the ``meta`` device) are in :mod:`grassopt.train.estimate`, beside the model they
describe; measuring a running process (``TensorPeak``, resident memory) is :mod:`grassopt.profiling`,
whose names are also importable from here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import bases
from .codecs import CODECS, MOMENT_KEYS
from .codecs.int8 import BLOCK as INT8_BLOCK
from .optim.state import spec_bytes
from .optimizer import SUBSPACE_DEFAULTS
from .profiling import TensorPeak, current_rss_bytes, peak_rss_bytes, peak_rss_since_reset, reset_peak_rss

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

_BASIS_KEYS = bases.KEYS
CATEGORIES = ("bases", "moments", "other")

#: dtype names accepted by :func:`estimate` and ``grassopt memory``.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
#: state dtype names accepted by :func:`estimate` and ``grassopt memory --state-dtype``: a codec of
#: :data:`grassopt.codecs.CODECS` (what ``SubspaceAdamW(state_dtype=...)`` allocates: ``int8``'s 8-bit
#: moments, ``Q`` and the other state float32), or a dtype above that is not a codec's name: every
#: state element in that dtype (the papers' "BF16 states" convention; ``fp32`` is ``float32``).
STATE_DTYPES: dict[str, torch.dtype | str] = {**DTYPES, **{name: name for name in CODECS}}


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


def _state_dtype(d: str | torch.dtype) -> str | torch.dtype:
    """A codec name, or the dtype every state element is priced in (not a codec's)."""
    if d in ("fp32", torch.float32):
        return "float32"
    if d == torch.int8:
        return "int8"
    if isinstance(d, str) and d in CODECS:
        return d
    try:
        return _dtype(d)
    except ValueError:
        raise ValueError(f"unknown state dtype {d!r}; choose one of {sorted(STATE_DTYPES)}") from None


def _priced(group: dict[str, Any], state_dtype: str | torch.dtype) -> tuple[dict[str, Any], int | None]:
    """The complete group to read :func:`state_spec` of, and the size every element is priced at
    (None: each at its own dtype's, the codec's layout)."""
    g = {**SUBSPACE_DEFAULTS, **group} if group.get("rank") is not None else dict(group)
    sd = _state_dtype(state_dtype)
    if isinstance(sd, str):
        return {**g, "state_dtype": sd}, None
    return {**g, "state_dtype": "float32"}, _size(sd)


def moment_bytes(numel: int, state_dtype: str | torch.dtype = "fp32") -> int:
    """Bytes of ONE Adam moment tensor (``exp_avg`` or ``exp_avg_sq``) of ``numel`` elements: half
    of the moment pair :func:`param_state_bytes` prices for a plain parameter of that size (``int8``:
    ``numel + 4 ceil(numel / 256)``, with its block scales)."""
    return param_state_bytes((numel,), {"params": []}, state_dtype)["moments"] // 2


def param_state_bytes(shape: tuple[int, ...] | torch.Size, group: dict[str, Any],
                      state_dtype: str | torch.dtype = "fp32") -> dict[str, int]:
    """Bytes of one parameter's optimizer state by category (``bases``, ``moments``, ``other``): the
    tensors of ``state_spec(group, shape)`` (``grassopt.optim.state``) priced at their dtypes, with the
    moments as the codec ``state_dtype`` lays them out (``int8``: codes plus a float32 scale per block;
    ``Q`` and the other state float32). A ``state_dtype`` that is not a codec's name prices every
    element in that dtype. The one place where a state becomes bytes.
    """
    g, size = _priced(group, state_dtype)
    return spec_bytes(g, tuple(shape), size)


# ---------------------------------------------------------------------------------------- live state
def state_breakdown(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the live optimizer state split into ``bases`` (``Q``), ``moments`` (Adam's two, with
    their block scales when they are int8) and ``other`` (the limiter's previous norm, LDAdam's
    error-feedback buffer, ...)."""
    out = dict.fromkeys(CATEGORIES, 0)
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor):
                kind = "bases" if k in _BASIS_KEYS else "moments" if k in MOMENT_KEYS else "other"
                out[kind] += _nbytes(v)
    return out


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of every tensor in the optimizer's state (what is really allocated)."""
    return sum(state_breakdown(optimizer).values())


# ---------------------------------------------------------------------------------------- formula
def state_elements(shape: tuple[int, ...] | torch.Size, group: dict[str, Any]) -> dict[str, int]:
    """State elements of one parameter under ``group``'s settings, by category (docs/algorithms.md#memory):
    the float32 elements of ``state_spec`` (``grassopt.optim.state``).

    Plain AdamW: ``2 numel`` moments. Projected ``m x n`` at rank ``r`` (``d = min``, ``k = max``):

    - bases: ``d r``, except for rules that regenerate ``Q`` from a seed (``gaussian``: the seed is
      a plain int, no tensor);
    - moments: ``2 k r``;
    - other: ``1`` (the norm-growth limiter's previous norm, with recovery scaling or APOLLO's
      scaling) ``+ m n`` (LDAdam's error-feedback buffer).

    So APOLLO is ``2 k r + 1``, APOLLO-Mini ``2 k + 1``, LDAdam ``d r + 2 k r + m n``, as in
    docs/algorithms.md#memory.
    """
    g, _ = _priced(group, "float32")
    return spec_bytes(g, tuple(shape), element_size=1)


def expected_state_elements(shape: tuple[int, ...] | torch.Size, group: dict[str, Any]) -> int:
    """Total state elements of one parameter under ``group``'s settings (see :func:`state_elements`)."""
    return sum(state_elements(shape, group).values())
