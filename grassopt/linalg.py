"""Float32 linear-algebra helpers shared by every subspace rule (ALGORITHMS.md sections 0 and 1).

Orientation is decided here, once: a projected ``m x n`` gradient ``G`` is handled as ``X``, the
matrix whose rows are the short side ``d = min(m, n)``. ``X = G`` when ``m < n`` and ``X = G^T``
(a view, no copy) when ``m >= n``; square matrices are projected from the right, like GaLore's
``proj_type="std"``. Every basis ``Q`` is ``d x r`` with orthonormal columns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "is_transposed",
    "orient",
    "svd_basis",
    "haar",
    "qr_positive",
    "geodesic_step",
    "largest_angle",
    "orthonormality_error",
    "reorthonormalize",
    "ORTHO_TOL",
]

#: Re-orthonormalise a basis by QR when ``||Q^T Q - I||_F`` exceeds this.
ORTHO_TOL = 1e-4


def is_transposed(shape: torch.Size | tuple[int, ...]) -> bool:
    """True when an ``m x n`` matrix is handled as its transpose (``m >= n``)."""
    m, n = shape[-2], shape[-1]
    return m >= n


def orient(g: Tensor) -> Tensor:
    """The gradient with the short side as rows, in float32 (a view whenever possible)."""
    x = g if g.dtype == torch.float32 else g.float()
    return x.mT if is_transposed(g.shape) else x


def svd_basis(x: Tensor, rank: int, transposed: bool) -> Tensor:
    """Top-``rank`` left singular vectors of the oriented ``x`` (``d x rank``).

    For parity with ``galore-torch`` the SVD factors the gradient *as stored* (``x.mT`` when
    ``transposed``): singular vectors are only defined up to sign, and a different factorisation
    gives the same subspace with other signs (which matters with ``keep`` transport).
    """
    if transposed:
        _, _, vh = torch.linalg.svd(x.mT, full_matrices=False)
        return vh[:rank].mT.contiguous()
    u, _, _ = torch.linalg.svd(x, full_matrices=False)
    return u[:, :rank].contiguous()


def qr_positive(z: Tensor) -> Tensor:
    """Thin QR with the signs fixed so that ``diag(R) > 0`` (a unique, continuous choice)."""
    q, r = torch.linalg.qr(z)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def haar(d: int, r: int, generator: torch.Generator | None, device, dtype=torch.float32) -> Tensor:
    """A ``d x r`` matrix with orthonormal columns drawn from the Haar law on the Stiefel manifold.

    QR of a Gaussian matrix, with the sign fix that makes the law exactly Haar.
    """
    z = torch.randn(d, r, generator=generator, device=device, dtype=dtype)
    return qr_positive(z)


def geodesic_step(q: Tensor, h: Tensor, angles_from_sigma, update_rank: int = 1) -> tuple[Tensor, Tensor]:
    """Move ``q`` along the Grassmann geodesic in the tangent direction ``h`` (ALGORITHMS.md 1.0).

    ``h`` is made tangent (``h - q q^T h``); its compact SVD is truncated to ``update_rank`` terms
    ``U S V^T``, ``angles_from_sigma(S)`` gives the angles ``theta`` (clamped to ``[0, pi/2]``), and

        Q' = Q V cos(Theta) V^T + U sin(Theta) V^T + Q (I - V V^T).

    Returns ``(Q', theta)``. ``theta`` is the vector of principal angles moved (a tensor: no sync).
    """
    h = h - q @ (q.mT @ h)
    u, s, vh = torch.linalg.svd(h, full_matrices=False)
    k = min(update_rank, s.shape[-1])
    u, s, v = u[:, :k], s[:k], vh[:k].mT
    theta = angles_from_sigma(s).clamp(0.0, math.pi / 2)
    qv = q @ v
    # Q' = Q + (Q V (cos - 1) + U sin) V^T : one r x k correction, exact orthonormality preserved.
    delta = qv * (torch.cos(theta) - 1.0) + u * torch.sin(theta)
    return q + delta @ v.mT, theta


def largest_angle(q_old: Tensor, q_new: Tensor) -> Tensor:
    """Largest principal angle (radians) between the column spans of two orthonormal bases.

    Computed from ``sin(theta_max) = ||(I - Q_old Q_old^T) Q_new||_2``, which stays accurate for
    small angles (an arccos of the cosines loses half the digits there).
    """
    resid = q_new - q_old @ (q_old.mT @ q_new)
    s = torch.linalg.matrix_norm(resid, ord=2)
    return torch.asin(s.clamp(0.0, 1.0))


def orthonormality_error(q: Tensor) -> Tensor:
    """``||Q^T Q - I||_F``."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return torch.linalg.matrix_norm(q.mT @ q - eye)


def reorthonormalize(q: Tensor, tol: float = ORTHO_TOL) -> Tensor:
    """Return ``q`` unchanged if ``||Q^T Q - I||_F <= tol``, else its sign-fixed QR factor."""
    if float(orthonormality_error(q)) > tol:
        return qr_positive(q)
    return q
