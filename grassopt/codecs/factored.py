"""Factored second moment (``state_dtype="factored"``, and ``"factored-no-m"`` for ``betas[0] == 0``):
Adafactor's factored ``V`` inside grassopt's Adam.

For moments of shape ``(a, b)`` (2-D: a plain group's embedding and head, a projected group's
``k x r`` moments) ``V`` is kept as its row sums ``R`` (``exp_avg_sq_row``, ``(a,)``) and column sums
``C`` (``exp_avg_sq_col``, ``(b,)``), float32, and read as the rank-one ``V = R C^T / sum(R)``
(whose row and column sums are ``R`` and ``C`` again: ``sum(C) = sum(R)``). Each step updates the
statistics by the EMA of the gradient's:

    R = b2 R + (1 - b2) rowsum(G*G);   C = b2 C + (1 - b2) colsum(G*G)

which is exactly what re-encoding ``b2 V + (1 - b2) G*G`` by its row and column sums gives, since the
sums are linear and those of ``V`` are ``R`` and ``C`` (tests/test_codec_factored.py checks it). The
Adam direction then reads the *updated* ``V = R C^T / sum(R)``, as Adafactor does:
``N = M / (sqrt(V) + eps)`` with the step ``lr sqrt(1 - b2^t) / (1 - b1^t)`` (grassopt's convention).
Unlike Adafactor there is no ``eps1`` added to ``G*G``, no update clipping, no relative step size and
no ``b2`` schedule: only the storage of ``V`` changes. ``M`` stays float32 (``exp_avg``); with
``"factored-no-m"`` (``betas[0] == 0``) it is not stored at all (``M = G``, see ``no_m.py``).
Moments of another rank than 2 (biases, norms, scalars, convolutions) keep a whole float32 ``V``
(``exp_avg_sq``), as float32 does.

The statistics of a whole tensor cannot be updated a chunk at a time, so the codec updates them
itself (:attr:`UPDATES_V`) before the chunked Adam: ``G*G`` is squared a block of rows at a time
(``grassopt.codecs.CHUNK`` elements), and each chunk of the Adam reconstructs its own rows of ``V``:
no full-size temporary. A basis update's transport (``load``/``store`` of the whole moments)
reconstructs the whole ``k x r`` ``V``, transports it and re-encodes it by its row and column sums.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _base
from ._base import Codec, Layout
from .no_m import beta1_error

__all__ = ["Factored", "FactoredNoM"]

_F32 = torch.float32


class Factored(Codec):
    """``M`` float32 (``exp_avg``); ``V`` as row and column sums of a 2-D moment, else whole."""

    NAME = "factored"
    HAS_M = True
    UPDATES_V = True
    NON_NEGATIVE = frozenset({"exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"})

    def layout(self, shape: tuple[int, ...]) -> Layout:
        out: Layout = {"exp_avg": (_F32, shape)} if self.HAS_M else {}
        if len(shape) == 2:
            out["exp_avg_sq_row"] = (_F32, (shape[0],))
            out["exp_avg_sq_col"] = (_F32, (shape[1],))
        else:
            out["exp_avg_sq"] = (_F32, shape)
        return out

    def keys(self) -> frozenset[str]:
        return frozenset(self.layout((1,))) | frozenset(self.layout((1, 1)))

    def matches(self, state: dict) -> bool:
        return any(all(getattr(state.get(k), "dtype", None) == dt for k, (dt, _) in self.layout(s).items())
                   for s in ((1,), (1, 1)))

    def group_error(self, group: dict[str, Any]) -> str | None:
        return None if self.HAS_M else beta1_error(self.NAME, group)

    def shape(self, state: dict) -> torch.Size:
        if "exp_avg_sq" in state:
            return state["exp_avg_sq"].shape
        return torch.Size((state["exp_avg_sq_row"].numel(), state["exp_avg_sq_col"].numel()))

    def update_v_(self, state: dict, grad: Tensor, beta2: float) -> None:
        step = _base.CHUNK
        if "exp_avg_sq" in state:  # whole V: the plain EMA, a chunk at a time
            vf, gf = state["exp_avg_sq"].view(-1), grad.reshape(-1)
            for lo in range(0, vf.numel(), step):
                g = gf[lo:lo + step].float()
                vf[lo:lo + step].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            return
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        a, b = row.numel(), col.numel()
        g2 = grad.reshape(a, b)
        rows = max(1, step // b)
        row_sq = torch.empty(a, dtype=_F32, device=row.device)
        col_sq = torch.zeros(b, dtype=_F32, device=col.device)
        for r0 in range(0, a, rows):  # G*G a block of rows at a time
            sq = g2[r0:r0 + rows].float().square()
            torch.sum(sq, dim=1, out=row_sq[r0:r0 + rows])
            col_sq.add_(sq.sum(dim=0))
        row.mul_(beta2).add_(row_sq, alpha=1 - beta2)
        col.mul_(beta2).add_(col_sq, alpha=1 - beta2)

    def _v(self, state: dict, lo: int, hi: int) -> Tensor:
        """Flat float32 ``V`` of elements ``[lo, hi)``: its rows of ``R C^T / sum(R)`` (a new tensor), or
        a view of the whole ``V``."""
        if "exp_avg_sq" in state:
            return state["exp_avg_sq"].view(-1)[lo:hi]
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        b = col.numel()
        r0, r1 = lo // b, math.ceil(hi / b)
        total = row.sum().clamp_min(torch.finfo(_F32).tiny)  # R = 0 (a fresh state): V = 0
        return torch.outer(row[r0:r1] / total, col).view(-1)[lo - r0 * b:hi - r0 * b]

    def load(self, state: dict, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor]:
        hi = math.prod(self.shape(state)) if hi is None else hi
        v = self._v(state, lo, hi)
        m = state["exp_avg"].view(-1)[lo:hi] if self.HAS_M else torch.zeros(hi - lo, dtype=_F32, device=v.device)
        return m, v

    def store_m(self, state: dict, m: Tensor, lo: int = 0) -> None:
        if self.HAS_M:
            dst = state["exp_avg"].view(-1)[lo:lo + m.numel()]
            if dst.data_ptr() != m.data_ptr():
                dst.copy_(m)

    def store(self, state: dict, m: Tensor, v: Tensor, lo: int = 0, generator: torch.Generator | None = None) -> None:
        """Whole moments back (the transport): ``M`` as it is, ``V`` by its row and column sums."""
        self.store_m(state, m, lo)
        if "exp_avg_sq" in state:
            dst = state["exp_avg_sq"].view(-1)[lo:lo + v.numel()]
            if dst.data_ptr() != v.data_ptr():
                dst.copy_(v)
            return
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        if lo != 0 or v.numel() != row.numel() * col.numel():
            raise ValueError("a factored V is stored whole (its row and column sums), not a chunk at a time")
        v2 = v.view(row.numel(), col.numel())
        torch.sum(v2, dim=1, out=row)
        torch.sum(v2, dim=0, out=col)


class FactoredNoM(Factored):
    """The factored ``V`` alone: ``M`` is not stored (``betas[0] == 0``, as ``no-m``)."""

    NAME = "factored-no-m"
    HAS_M = False
