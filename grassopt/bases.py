"""Compressed bases: how a projected parameter's ``Q`` (``d x r``, orthonormal columns) is stored, its
group's ``basis_dtype`` (docs/algorithms.md#compressed-bases).

- ``"float32"`` (the default): ``Q`` as it is;
- ``"bfloat16"``: ``Q`` rounded to nearest bf16 (2 bytes an element; 8 significant bits);
- ``"int8"``: one int8 code per element and one float32 scale per column, ``Q[:, j] = s_j C[:, j]``,
  ``s_j = max_i |Q_ij| / 127``, rounded to nearest (``d r + 4 r`` bytes). A column of a basis is a unit
  vector whose entries are of order ``1/sqrt(d)`` with no outliers, so one scale per column suffices;
- ``"int4"``: the same with codes ``-7 ... 7`` (``s_j = max_i |Q_ij| / 7``), two rows packed in a byte
  (``ceil(d/2) r + 4 r`` bytes).

:func:`layout` is the one declaration of the stored tensors (``grassopt.optim.state.state_spec`` reads
it, hence the load checks and ``grassopt memory``); :func:`store` writes a float32 basis, :func:`load`
decodes it to float32 for the step. The decoded basis is not exactly orthonormal (its error is measured
as principal angles to the float32 basis, :func:`principal_angles`; benchmarks/low_bit.md). The step
uses it as decoded for ``R = Q^T X`` and the back-projection ``Q N`` (a consistent pair), and
re-orthonormalises it where the maths assumes orthonormal columns: before a rule updates it (a
geodesic step, the moments' rotation ``Q_new^T Q_old``) at every basis update. A new basis is stored
as it comes from the rule (orthonormal) and decoded at once, so every step, resumed or not, uses the
stored basis.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["BASIS_DTYPES", "KEYS", "layout", "store", "load", "compressed", "principal_angles"]

#: The formats a projected group's ``basis_dtype`` may name.
BASIS_DTYPES = ("float32", "bfloat16", "int8", "int4")
#: Every state key a basis may be stored under (the "bases" of the memory accounting).
KEYS = frozenset({"Q", "Q_scale", "Q_rows"})
_QMAX = {"int8": 127, "int4": 7}


def layout(basis_dtype: str, d: int, r: int) -> dict[str, tuple[Any, tuple[int, ...] | None]]:
    """``{state key: (dtype, shape)}`` of a ``d x r`` basis stored as ``basis_dtype`` (``(int, None)``: a plain
    int, int4's number of rows ``d``)."""
    if basis_dtype == "int8":
        return {"Q": (torch.int8, (d, r)), "Q_scale": (torch.float32, (r,))}
    if basis_dtype == "int4":  # rows 2i (low nibble) and 2i + 1 (high nibble) in one byte, codes + 8
        return {"Q": (torch.uint8, ((d + 1) // 2, r)), "Q_scale": (torch.float32, (r,)), "Q_rows": (int, None)}
    if basis_dtype == "bfloat16":
        return {"Q": (torch.bfloat16, (d, r))}
    return {"Q": (torch.float32, (d, r))}


def compressed(st: dict[str, Any]) -> bool:
    """Whether the basis in ``st`` is stored in another format than float32."""
    q = st.get("Q")
    return q is not None and q.dtype != torch.float32


def store(st: dict[str, Any], q: Tensor, basis_dtype: str) -> None:
    """Write the float32 basis ``q`` into ``st`` as ``basis_dtype`` (new tensors: a basis update replaces them)."""
    if basis_dtype in _QMAX:
        qmax = _QMAX[basis_dtype]
        scale = q.abs().amax(dim=0).div_(qmax)
        codes = (q / scale.clamp_min(torch.finfo(torch.float32).tiny)).round_().clamp_(-qmax, qmax)
        st["Q_scale"] = scale
        if basis_dtype == "int8":
            st["Q"] = codes.to(torch.int8)
            return
        d = q.shape[0]
        c = torch.nn.functional.pad(codes.add_(8), (0, 0, 0, d % 2), value=8.0).to(torch.uint8)  # 1 ... 15; pad 0
        st["Q"] = c[0::2].bitwise_or_(c[1::2] << 4)
        st["Q_rows"] = d
    elif basis_dtype == "bfloat16":
        st["Q"] = q.to(torch.bfloat16).contiguous()
    else:
        st["Q"] = q.contiguous()


def load(st: dict[str, Any]) -> Tensor:
    """The basis in ``st`` as float32 (the stored tensor itself when it is float32)."""
    q = st["Q"]
    if q.dtype == torch.int8:
        return q.to(torch.float32).mul_(st["Q_scale"])
    if q.dtype == torch.uint8:  # int4: two rows a byte
        pairs = torch.stack([q & 15, q >> 4], dim=1).reshape(-1, q.shape[1])[:st["Q_rows"]]
        return pairs.to(torch.float32).sub_(8.0).mul_(st["Q_scale"])
    return q if q.dtype == torch.float32 else q.to(torch.float32)


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """The principal angles (radians, ascending) between the column spans of ``a`` and ``b`` (any full
    column rank: both are orthonormalised first), in float64: ``arccos`` of the singular values of
    ``Qa^T Qb``, with the small angles from ``arcsin`` of those of ``(I - Qa Qa^T) Qb`` (accurate there)."""
    qa = torch.linalg.qr(a.to(torch.float64)).Q
    qb = torch.linalg.qr(b.to(torch.float64)).Q
    sines = torch.linalg.svdvals(qb - qa @ (qa.mT @ qb)).clamp(0.0, 1.0)
    return torch.asin(sines).flip(-1)
