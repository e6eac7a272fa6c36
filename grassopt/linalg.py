"""Float32 linear-algebra helpers shared by every subspace rule (docs/algorithms.md#notation).

Orientation is decided here, once: a projected ``m x n`` gradient ``G`` is handled as ``X``, the
matrix whose rows are the short side ``d = min(m, n)``. ``X = G`` when ``m < n`` and ``X = G^T``
(a view, no copy) when ``m >= n``; square matrices are projected from the right, like GaLore's
``proj_type="std"``. Every basis ``Q`` is ``d x r`` with orthonormal columns.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "is_transposed",
    "orient",
    "svd_basis",
    "robust_svd",
    "RobustSVD",
    "count_fallback",
    "haar",
    "qr_positive",
    "geodesic_step",
    "top_singular_pairs",
    "resolve_update_rank",
    "largest_angle",
    "orthonormality_error",
    "reorthonormalize",
    "ORTHO_TOL",
    "SIGMA_RTOL",
]

#: Re-orthonormalise a basis by QR when ``||Q^T Q - I||_F`` exceeds this.
ORTHO_TOL = 1e-4
#: ``geodesic_step`` treats singular values below this fraction of the largest as zero (angle 0).
SIGMA_RTOL = 1e-6


def is_transposed(shape: torch.Size | tuple[int, ...]) -> bool:
    """True when an ``m x n`` matrix is handled as its transpose (``m >= n``)."""
    m, n = shape[-2], shape[-1]
    return m >= n


def orient(g: Tensor) -> Tensor:
    """The gradient with the short side as rows, in float32 (a view whenever possible)."""
    x = g if g.dtype == torch.float32 else g.float()
    return x.mT if is_transposed(g.shape) else x


class RobustSVD(NamedTuple):
    """A reduced SVD ``A = U diag(S) Vh`` and which fallback produced it (``None``: the default path)."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    fallback: str | None


def _factors_finite(u: Tensor, s: Tensor, vh: Tensor) -> bool:
    """True when an SVD's factors are all finite (one host sync).

    ``U`` and ``Vh`` have entries in ``[-1, 1]``, so their sums cannot overflow: a sum is finite exactly
    when every entry is (one reduction each, without the boolean temporaries of ``isfinite``).
    """
    return bool(torch.isfinite(u.sum() + vh.sum()) & torch.isfinite(s).all())


def _gram_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD from ``eigh`` of the Gram of the short side, in float64.

    The short side's singular vectors are exact eigenvectors (orthonormal to float64 precision); the
    long side's are ``A^T U S^{-1}`` for the singular values above ``1e-12 s_max`` and zero columns
    for the others (never NaN). Singular values below ``~1e-8 s_max`` lose their relative accuracy.
    """
    m, n = a.shape[-2], a.shape[-1]
    w = a.to(torch.float64)
    wide = m <= n
    lam, vec = torch.linalg.eigh(w @ w.mT if wide else w.mT @ w)
    lam, vec = lam.flip(-1).clamp_min(0.0), vec.flip(-1)
    s = lam.sqrt()
    live = s > s[..., :1] * 1e-12
    inv = torch.where(live, 1.0 / torch.where(live, s, 1.0), 0.0)
    if wide:  # vec = U (m x m); Vh = S^-1 U^T A
        u, vh = vec, (vec * inv).mT @ w
    else:  # vec = V (n x n); U = A V S^-1
        u, vh = (w @ vec) * inv, vec.mT
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def robust_svd(a: Tensor) -> RobustSVD:
    """``torch.linalg.svd(a, full_matrices=False)`` that does not fail on a finite input.

    LAPACK's and cuSOLVER's SVDs can fail to converge on ill-conditioned matrices (a known GaLore
    failure: ``LinAlgError``, or NaNs from some CUDA drivers). On such a failure this tries, in
    order: on CUDA ``driver="gesvd"`` (QR iteration, slower, the most robust); the SVD in float64;
    and last the eigendecomposition of the short side's Gram in float64 (``_gram_svd``), which
    converges for every finite input. The result's ``fallback`` names the path that was used
    (``None``, ``"gesvd"``, ``"float64"`` or ``"gram"``) so the caller can count it; ``U``, ``S``,
    ``Vh`` have ``a``'s dtype. A non-finite ``a`` raises ``FloatingPointError`` (no fallback can give
    it a meaningful basis). The fast path costs one finiteness check of the factors (a host sync,
    a fraction of a percent of the SVD).
    """
    try:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        if _factors_finite(u, s, vh):
            return RobustSVD(u, s, vh, None)
    except torch.linalg.LinAlgError:
        pass
    if not bool(torch.isfinite(a).all()):
        raise FloatingPointError(f"robust_svd: the {tuple(a.shape)} input has non-finite entries")
    if a.is_cuda:
        try:
            u, s, vh = torch.linalg.svd(a, full_matrices=False, driver="gesvd")
            if _factors_finite(u, s, vh):
                return RobustSVD(u, s, vh, "gesvd")
        except torch.linalg.LinAlgError:
            pass
    if a.dtype != torch.float64:
        try:
            u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
            if _factors_finite(u, s, vh):
                return RobustSVD(u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype), "float64")
        except torch.linalg.LinAlgError:
            pass
    return RobustSVD(*_gram_svd(a), "gram")


def svd_basis(x: Tensor, rank: int, transposed: bool, *, stats: Any = None) -> Tensor:
    """Top-``rank`` left singular vectors of the oriented ``x`` (``d x rank``).

    For parity with ``galore-torch`` the SVD factors the gradient *as stored* (``x.mT`` when
    ``transposed``): singular vectors are only defined up to sign, and a different factorisation
    gives the same subspace with other signs (which matters with ``keep`` transport).

    The SVD is :func:`robust_svd`; when it needed a fallback, ``stats.svd_fallbacks`` is incremented
    (pass the rule's ``RuleContext``, or any object with an int attribute ``svd_fallbacks``).
    """
    res = robust_svd(x.mT if transposed else x)
    count_fallback(stats, res)
    if transposed:
        return res.Vh[:rank].mT.contiguous()
    return res.U[:, :rank].contiguous()


def count_fallback(stats: Any, res: RobustSVD) -> None:
    """Add one to ``stats.svd_fallbacks`` when ``res`` came from a fallback (``stats`` may be None)."""
    if res.fallback is not None and stats is not None:
        stats.svd_fallbacks += 1


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


def top_singular_pairs(h: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-``k`` singular values and right singular vectors of a tall ``d x r`` matrix, from its Gram.

    The Gram ``G = H^T H`` (``r x r``) is formed and solved in float64: the Gram of a float32 ``H`` is
    then exact to float32's resolution, so nothing is lost by squaring. ``k = 1`` takes the eigenvalues
    only (``eigvalsh``) and the top eigenvector by two steps of inverse iteration with the shift just
    above ``lambda_1`` (one ``r x r`` Cholesky); larger ``k`` take the full ``eigh``. Returns ``(s, V)``:
    ``s`` (``k``, float64, descending, ``>= 0``) and ``V`` (``r x k``, float64, orthonormal columns); the
    left vectors are ``U = H V S^{-1}`` for the non-zero ``s`` (``geodesic_step`` never forms them).
    Costs ``d r^2`` multiply-adds and ``O(r^3)`` for the small problem, against a QR of the ``d x r``
    matrix and an ``r x r`` SVD for ``torch.linalg.svd``.
    """
    hw = h.to(torch.float64)
    g = hw.mT @ hw
    if k == 1:
        r = g.shape[-1]
        scale = g.diagonal().max()  # lambda_1 / r <= max diag <= lambda_1
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        g = g / scale
        lam = torch.linalg.eigvalsh(g)[-1:].clamp_min(0.0)  # in [1, r] unless G = 0
        # (mu I - G) is positive definite for mu > lambda_1, and its inverse amplifies the top
        # eigenvector over the others by (lambda_1 - lambda_2 + delta) / delta, delta ~ 1e-8 lambda_1
        mu = lam * (1.0 + 1e-8) + 1e-12
        eye = torch.eye(r, dtype=g.dtype, device=g.device)
        chol, _ = torch.linalg.cholesky_ex(mu * eye - g)
        # a fixed start with no structure (a unit or all-ones vector could be orthogonal to v_1)
        x = torch.cos(torch.arange(1, r + 1, dtype=g.dtype, device=g.device) * 2.399963229728653).unsqueeze(-1)
        for _ in range(2):
            x = torch.cholesky_solve(x, chol)
            x = x / torch.linalg.vector_norm(x)
        return (lam * scale).sqrt(), x
    lam, v = torch.linalg.eigh(g)  # ascending
    lam = lam.flip(-1)[..., :k].clamp_min(0.0)
    return lam.sqrt(), v.flip(-1)[..., :k]


def resolve_update_rank(update_rank: int | str, r: int) -> int:
    """The number of directions a geodesic step turns: ``"full"`` is all ``r``, an int is clipped to ``r``."""
    if isinstance(update_rank, str) and update_rank == "full":
        return r
    if isinstance(update_rank, bool) or not isinstance(update_rank, Integral) or update_rank < 1:
        raise ValueError(f"update_rank={update_rank!r}: use 'full' or an integer >= 1")
    return min(int(update_rank), r)


def geodesic_step(q: Tensor, h: Tensor, angles_from_sigma, update_rank: int | str = 1) -> tuple[Tensor, Tensor]:
    """Move ``q`` along the Grassmann geodesic in the tangent direction ``h`` (docs/algorithms.md#geodesic).

    ``h`` is made tangent (``h - q q^T h``); its compact SVD is truncated to ``k = update_rank`` terms
    ``U S V^T`` (``"full"``: all ``r``), ``angles_from_sigma(S)`` gives the angles ``theta`` (clamped to
    ``[0, pi/2]``), and

        Q' = Q V cos(Theta) V^T + U sin(Theta) V^T + Q (I - V V^T)
           = Q + Q V (cos(Theta) - I) V^T + H V diag(sin(theta) / s) V^T      (U S = H V)

    The singular pairs come from the ``r x r`` Gram matrix (:func:`top_singular_pairs`), not from an
    SVD of ``h``, and ``U`` is never formed: ``sin(theta) / s`` stays bounded when the angles are
    proportional to ``s`` (``track``, ``walk``). Directions with ``s <= SIGMA_RTOL * s_max`` (where ``h``
    has no component, e.g. the ``r - (d - r)`` null directions when ``d < 2 r``) get angle 0.
    ``angles_from_sigma`` receives ``s`` in float64, descending. ``Q'^T Q' = I`` holds to float32
    rounding (``||Q'^T Q' - I||_F`` of a few ``1e-6`` at ``r = 128``, against ~``1e-5`` for the SVD
    route), so no re-orthonormalisation is needed.

    Returns ``(Q', theta)``: ``theta`` (``k``, ``q``'s dtype, descending in ``s``) holds the principal
    angles moved (a tensor: no host sync).
    """
    h = h - q @ (q.mT @ h)
    r = h.shape[-1]
    k = resolve_update_rank(update_rank, r)
    s, v = top_singular_pairs(h, k)
    live = s > s[..., :1] * SIGMA_RTOL  # all False when h = 0
    theta = torch.where(live, angles_from_sigma(s), 0.0).clamp(0.0, math.pi / 2)
    sin_over_s = torch.where(live, torch.sin(theta) / torch.where(live, s, 1.0), 0.0)
    cos_m1 = -2.0 * torch.sin(theta / 2).square()  # cos(theta) - 1 without cancellation
    dt = q.dtype
    if 3 * k <= 2 * r:  # low rank: three d x r x k products
        vq = v.to(dt)
        delta = (q @ vq) * cos_m1.to(dt) + h @ (v * sin_over_s).to(dt)
        q_new = torch.addmm(q, delta, vq.mT)
    else:  # two d x r x r products with r x r coefficients formed in float64
        a = ((v * cos_m1) @ v.mT).to(dt)
        b = ((v * sin_over_s) @ v.mT).to(dt)
        q_new = torch.addmm(q, q, a).addmm_(h, b)
    return q_new, theta.to(dt)


def largest_angle(q_old: Tensor, q_new: Tensor) -> Tensor:
    """Largest principal angle (radians) between the column spans of two orthonormal bases.

    ``sin(theta_max) = ||R||_2`` with ``R = (I - Q_old Q_old^T) Q_new``, read off the largest eigenvalue
    of the ``r x r`` Gram ``R^T R`` (``eigvalsh`` in float64), not from an SVD of the ``d x r`` ``R``.
    Accurate for small angles to float32's relative precision (an arccos of the cosines would lose
    half the digits there); near ``pi/2`` the arcsine amplifies rounding to about ``3e-4`` rad.
    """
    resid = q_new - q_old @ (q_old.mT @ q_new)
    gram = (resid.mT @ resid).to(torch.float64)
    s2 = torch.linalg.eigvalsh(gram)[..., -1]
    return torch.asin(s2.clamp(0.0, 1.0).sqrt()).to(q_new.dtype)


def orthonormality_error(q: Tensor) -> Tensor:
    """``||Q^T Q - I||_F``."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return torch.linalg.matrix_norm(q.mT @ q - eye)


def reorthonormalize(q: Tensor, tol: float = ORTHO_TOL) -> Tensor:
    """Return ``q`` unchanged if ``||Q^T Q - I||_F <= tol``, else its sign-fixed QR factor."""
    if float(orthonormality_error(q)) > tol:
        return qr_positive(q)
    return q
