"""Gradient-subspace measurements as pure functions on tensors.

Every function takes the gradient already *oriented* (``X``, ``d x k``, the short side as rows:
``grassopt.linalg.orient``) and bases ``Q`` (``d x r``) in that same frame, so the conventions are
those of the optimizer (docs/algorithms.md#notation). Nothing here draws random numbers or changes
its inputs.

- :func:`energy_profile` / :func:`svd_energy_share`: the share of ``||X||_F^2`` captured by the
  best rank-``r`` subspace, ``||U_r^T X||^2 / ||X||^2 = sum_{i<r} s_i^2 / sum_i s_i^2``;
- :func:`basis_energy_share`: the same share for a given basis, ``||Q^T X||^2 / ||X||^2``
  (:func:`captured_share`: as a 0-dim tensor, without a host sync: the per-step quality measure);
- :func:`estimation_error_derivative`: ``grad F = -2 E A^T`` at ``Q`` (docs/algorithms.md#track) and
  :func:`derivative_spectrum`, its singular values;
- :func:`principal_angles`: all principal angles between two subspaces, accurate near 0 and pi/2.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

__all__ = [
    "svd_energy_share",
    "energy_profile",
    "shares_from_singular_values",
    "basis_energy_share",
    "captured_share",
    "estimation_error_derivative",
    "derivative_spectrum",
    "principal_angles",
    "layer_kind",
    "layer_depth",
    "LAYER_KINDS",
]

#: The seven projection types of a LLaMA decoder block, in the papers' order.
LAYER_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def energy_profile(x: Tensor, ranks: list[int] | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Singular values of ``x`` and the share of ``||x||_F^2`` captured by the best rank-``r``
    subspace for each ``r`` in ``ranks`` (Eckart-Young: ``sum_{i<r} s_i^2 / sum_i s_i^2``).

    Returns ``(s, shares)`` with ``shares[j]`` for ``ranks[j]`` (a rank beyond ``min(d, k)`` gives 1).
    A zero matrix captures nothing: its shares are 0.
    """
    s = torch.linalg.svdvals(x)
    return s, shares_from_singular_values(s, ranks)


def shares_from_singular_values(s: Tensor, ranks: list[int] | tuple[int, ...]) -> Tensor:
    """``sum_{i<r} s_i^2 / sum_i s_i^2`` for each ``r`` in ``ranks`` (0 for a zero matrix)."""
    cum = torch.cumsum(s.square(), 0)
    total = cum[-1]
    idx = torch.tensor([min(int(r), s.numel()) - 1 for r in ranks], device=s.device)
    if not float(total) > 0:
        return torch.zeros(len(ranks), dtype=s.dtype, device=s.device)
    return cum[idx] / total


def svd_energy_share(x: Tensor, rank: int) -> float:
    """``||U_r^T X||^2 / ||X||^2`` for the top-``rank`` left singular vectors ``U_r`` of ``x``."""
    return float(energy_profile(x, [rank])[1][0])


def captured_share(x: Tensor, q: Tensor) -> Tensor:
    """``||Q^T X||^2 / ||X||^2`` as a 0-dim tensor on ``x``'s device (no host sync): one ``d x k x r``
    product and two norms, no ``d x k`` temporary. Taken as ``(||Q^T X|| / ||X||)^2`` so that neither
    square can underflow or overflow; a zero matrix captures nothing (0)."""
    den = torch.linalg.vector_norm(x)
    return (torch.linalg.vector_norm(q.mT @ x) / den.clamp_min(torch.finfo(den.dtype).tiny)).square()


def basis_energy_share(x: Tensor, q: Tensor) -> float:
    """``||Q^T X||^2 / ||X||^2``: the share of the gradient's energy inside the span of ``q``
    (``q`` with orthonormal columns, in the frame of ``x``); 0 for a zero matrix."""
    return float(captured_share(x, q))


def estimation_error_derivative(x: Tensor, q: Tensor) -> Tensor:
    """``grad F(Q) = -2 E A^T`` (``d x r``), the derivative of the subspace estimation error
    ``F(Q) = min_A ||X - Q A||_F^2`` at ``q``, with ``A = Q^T X`` and ``E = X - Q A``
    (docs/algorithms.md#track), projected on the tangent space at ``q`` against rounding."""
    a = q.mT @ x  # r x k
    grad = -2.0 * (x @ a.mT - q @ (a @ a.mT))  # -2 (X - Q A) A^T without the d x k residual
    return grad - q @ (q.mT @ grad)


def derivative_spectrum(x: Tensor, q: Tensor, top: int | None = None) -> Tensor:
    """Singular values (descending) of :func:`estimation_error_derivative`, the ``top`` largest."""
    s = torch.linalg.svdvals(estimation_error_derivative(x, q))
    return s if top is None else s[:top]


def _orthonormal(q: Tensor) -> Tensor:
    """An orthonormal basis of the span of ``q`` (float64 QR)."""
    return torch.linalg.qr(q.double())[0]


def principal_angles(q1: Tensor, q2: Tensor) -> Tensor:
    """The principal angles (radians, descending) between the column spans of ``q1`` and ``q2``.

    Both bases are re-orthonormalised in float64 (so a basis stored in float32 is compared to
    itself at 0, not at its rounding error). Cosines come from the singular values of
    ``Q1^T Q2`` and sines from those of ``(I - Q1 Q1^T) Q2``; ``atan2(sin, cos)`` is accurate at
    both ends (``acos`` alone loses half the digits near 0, ``asin`` near pi/2). The spans must have
    the same dimension ``r`` and ``2 r <= d`` for the sines to pair with the cosines exactly;
    otherwise only the cosines are used.
    """
    if q1.shape != q2.shape:
        raise ValueError(f"bases of different shapes {tuple(q1.shape)} and {tuple(q2.shape)}")
    a, b = _orthonormal(q1), _orthonormal(q2)
    cos = torch.linalg.svdvals(a.mT @ b).clamp(0.0, 1.0)  # descending: smallest angle first
    d, r = a.shape
    if 2 * r > d:
        return torch.arccos(cos).flip(0)
    sin = torch.linalg.svdvals(b - a @ (a.mT @ b)).clamp(0.0, 1.0)  # descending: largest angle first
    return torch.atan2(sin, cos.flip(0))


_KIND = re.compile(r"(?:^|[._])(q|k|v|o|gate|up|down)(?:_proj)?(?:\.weight)?$")
_DEPTH = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_kind(name: str) -> str:
    """The projection type of a parameter named like Hugging Face's LLaMA (``layers.3.self_attn.q_proj.weight``
    -> ``"q"``, ``...mlp.down_proj.weight`` -> ``"down"``); other names give their module's last component."""
    match = _KIND.search(name)
    if match:
        return match.group(1)
    parts = [p for p in name.split(".") if p != "weight"]
    return parts[-1] if parts else name


def layer_depth(name: str) -> int | None:
    """The block index of a parameter (``layers.3.`` -> 3), or None outside the numbered blocks."""
    match = _DEPTH.search(name) or re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None
