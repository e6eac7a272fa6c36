"""Recovery scaling with the norm-growth limiter (docs/algorithms.md#recovery), without a third matrix product.

The residual ``E = X - Q R`` is the gradient the subspace discards. Per slice ``j`` along the long
side it is scaled by how much Adam rescaled the low-rank gradient,
``phi_j = ||N_j|| / (||R_j|| + 1e-8)``, giving ``S = E Phi``. The limiter caps growth: with ``g``
the norm kept from the previous step, if ``||S|| > zeta g`` then ``S`` is scaled down to norm
``zeta g``; the final ``||S||`` becomes the new ``g`` (a stored ``g = 0`` means "no previous step":
the first step only stores).

This module holds the pieces (:func:`col_sq`, :func:`tensor_scale`, :func:`limit`, ``PHI_EPS``); the
optimizer's projected step assembles them, batched over a group. Nothing forms ``E``: since
``Q^T (X Phi) = R Phi``, ``||S||^2 = sum_j phi_j^2 (||X_j||^2 - ||R_j||^2)``, and the optimizer applies
the direction as ``alpha_r c X Phi + Q (alpha N - alpha_r c R Phi)``: one product with ``Q``, like
GaLore. The norm is therefore exact up to float32 cancellation (``sqrt(eps) ||X||``), which only matters when
the residual is a tiny part of the gradient.

The same scale and limiter serve APOLLO (docs/algorithms.md#apollo), whose direction is the whole raw
gradient scaled, ``X Phi`` (``||X Phi||^2 = sum_j phi_j^2 ||X_j||^2``), or with one scale per
tensor (:func:`tensor_scale`).

Layout: the low-rank gradient and Adam's output are stored ``k x r`` (one row per slice ``j`` along
the long side), so every per-slice norm is a fast contiguous row reduction. All results are
tensors (no host synchronisation); the limiter is vectorised over all parameters of a group.
"""

from __future__ import annotations

import torch
from torch import Tensor

PHI_EPS = 1e-8


#: Rows per block when squared column norms are reduced over strided rows (see :func:`col_sq`).
ROW_BLOCK = 64


def col_sq(x: Tensor) -> Tensor:
    """Squared column norms ``||x[:, j]||^2``, by the fastest route for the memory layout, with no
    temporary of ``x``'s size.

    A reduction along contiguous rows (``x`` a transposed view) is fastest with ``vector_norm``. A
    reduction over rows of a row-major ``x`` is 3-5x faster as ``square().sum(0)`` than as a strided
    ``vector_norm`` (measured on CPU), done ``ROW_BLOCK`` rows at a time: a full-size temporary would
    be a fresh allocation at every step, whose page faults cost more than the arithmetic.
    """
    if x.mT.is_contiguous() and not x.is_contiguous():
        return torch.linalg.vector_norm(x.mT, dim=1).square_()
    if x.shape[0] <= ROW_BLOCK:
        return x.square().sum(0)
    out = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    for blk in x.split(ROW_BLOCK):
        out.add_(blk.square().sum(0))
    return out


def tensor_scale(rt: Tensor, nt: Tensor) -> Tensor:
    """APOLLO-Mini's one scale per tensor, ``||N||_F / (||R||_F + 1e-8)`` (a 0-d tensor)."""
    return torch.linalg.vector_norm(nt) / (torch.linalg.vector_norm(rt) + PHI_EPS)


def limit(norm: Tensor, previous: Tensor, zeta: float) -> Tensor:
    """The limiter's factor: ``zeta g / ||S||`` when ``||S|| > zeta g`` (and ``g > 0``), else 1."""
    cap = zeta * previous
    hit = (previous > 0) & (norm > cap)
    return torch.where(hit, cap / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
