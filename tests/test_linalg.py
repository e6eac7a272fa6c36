import math

import pytest
import torch

from grassopt import linalg
from conftest import principal_angles, random_orthonormal


@pytest.mark.parametrize("d,r,q", [(40, 6, 1), (40, 6, 3), (33, 8, 8)])
def test_geodesic_step_orthonormal_and_moves_by_intended_angle(d, r, q):
    Q = random_orthonormal(d, r, seed=1).float()
    H = torch.randn(d, r, generator=torch.Generator().manual_seed(2))
    target = torch.tensor(0.3)
    # angles proportional to the singular values, largest = 0.3 rad
    Q2, theta = linalg.geodesic_step(Q, H, lambda s: s * (target / s[0]), update_rank=q)
    assert linalg.orthonormality_error(Q2) < 1e-5
    assert theta.shape == (q,)
    ang = principal_angles(Q, Q2)
    assert ang.max().item() == pytest.approx(0.3, abs=1e-5)
    # the nonzero principal angles are exactly the thetas used
    top = ang.sort(descending=True).values[:q]
    assert torch.allclose(top, theta.double().sort(descending=True).values, atol=1e-5)
    # the other r - q directions do not move
    if q < r:
        assert ang.sort(descending=True).values[q:].max() < 1e-3


def test_geodesic_step_matches_textbook_formula_in_float64():
    d, r = 20, 5
    Q = random_orthonormal(d, r, seed=3)
    H = torch.randn(d, r, dtype=torch.float64)
    H = H - Q @ (Q.T @ H)
    Q2, theta = linalg.geodesic_step(Q, H, lambda s: 0.7 * s / s[0], update_rank=2)
    U, S, Vh = torch.linalg.svd(H, full_matrices=False)
    U, V = U[:, :2], Vh[:2].T
    th = 0.7 * S[:2] / S[0]
    ref = Q @ V @ torch.diag(torch.cos(th)) @ V.T + U @ torch.diag(torch.sin(th)) @ V.T + Q @ (torch.eye(r, dtype=torch.float64) - V @ V.T)
    assert torch.allclose(Q2, ref, atol=1e-12)


def test_geodesic_angles_clamped_to_right_angle():
    Q = random_orthonormal(10, 2, seed=4).float()
    _, theta = linalg.geodesic_step(Q, torch.randn(10, 2), lambda s: s * 1e6)
    assert theta.max().item() == pytest.approx(math.pi / 2)


def test_haar_monte_carlo_isotropic():
    # E[Q Q^T] = (r/d) I for Q Haar on the Stiefel manifold
    d, r, n = 6, 2, 20000
    g = torch.Generator().manual_seed(0)
    acc = torch.zeros(d, d, dtype=torch.float64)
    first = torch.zeros(d, r, dtype=torch.float64)
    for _ in range(n):
        Q = linalg.haar(d, r, g, "cpu").double()
        acc += Q @ Q.T
        first += Q
    acc /= n
    # each entry of Q Q^T is bounded by 1: standard error <= 1/sqrt(n); allow 5 sigma
    tol = 5 / math.sqrt(n)
    assert torch.allclose(acc, (r / d) * torch.eye(d, dtype=torch.float64), atol=tol)
    # Haar is symmetric: E[Q] = 0 (a QR without the sign fix fails this: its diag(R) > 0 bias)
    assert (first / n).abs().max() < tol


def test_qr_without_sign_fix_is_biased_but_ours_is_not():
    # the sign fix is what makes the law Haar: the first column's first entry is symmetric
    g = torch.Generator().manual_seed(5)
    vals = torch.stack([linalg.haar(4, 2, g, "cpu")[0, 0] for _ in range(4000)])
    assert abs(vals.mean().item()) < 5 * 0.5 / math.sqrt(4000)


def test_largest_angle_accurate_for_small_and_right_angles():
    Q = random_orthonormal(12, 3, seed=6).float()
    for ang in (1e-3, 0.2, 1.2):
        H = torch.randn(12, 3)
        Q2, th = linalg.geodesic_step(Q, H, lambda s: torch.full_like(s, ang), update_rank=1)
        assert linalg.largest_angle(Q, Q2).item() == pytest.approx(ang, rel=2e-3)
    assert linalg.largest_angle(Q, Q).item() < 1e-3
    # orthogonal subspaces: pi/2
    E = torch.eye(6)
    assert linalg.largest_angle(E[:, :2], E[:, 2:4]).item() == pytest.approx(math.pi / 2)


def test_svd_basis_matches_galore_factorisation_signs():
    g = torch.Generator().manual_seed(7)
    for shape in [(20, 30), (30, 20)]:
        G = torch.randn(shape, generator=g)
        X = linalg.orient(G)
        Q = linalg.svd_basis(X, 4, linalg.is_transposed(G.shape))
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        expect = U[:, :4] if shape[0] < shape[1] else Vh[:4].T
        assert torch.equal(Q, expect.contiguous())


def test_orient_is_a_view_for_float32_and_float32_for_bf16():
    G = torch.randn(30, 20)
    assert linalg.orient(G).data_ptr() == G.data_ptr() and linalg.orient(G).shape == (20, 30)
    assert linalg.orient(G.T.contiguous()).shape == (20, 30)
    assert linalg.orient(G.bfloat16()).dtype == torch.float32


def test_reorthonormalize_only_when_drift_exceeds_tolerance():
    Q = random_orthonormal(30, 4, seed=8).float()
    assert linalg.reorthonormalize(Q) is Q
    drifted = Q * (1 + 1e-3)
    fixed = linalg.reorthonormalize(drifted)
    assert fixed is not drifted and linalg.orthonormality_error(fixed) < 1e-5
    assert principal_angles(fixed, Q).max() < 1e-3  # same subspace
