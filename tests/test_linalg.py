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
        Q2, th = linalg.geodesic_step(Q, H, lambda s: torch.full_like(s, ang), update_rank=1)  # noqa: B023  called right away
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


# ---------------------------------------------------------------- Gram-based geodesic step


def _textbook_step(Q, H, angles, k):
    """docs/algorithms.md#geodesic in float64 from a full SVD of the tangent part of H (the reference)."""
    Q, H = Q.double(), H.double()
    H = H - Q @ (Q.T @ H)
    U, S, Vh = torch.linalg.svd(H, full_matrices=False)
    U, S, V = U[:, :k], S[:k], Vh[:k].T
    th = angles(S).clamp(0, math.pi / 2)
    Id = torch.eye(Q.shape[1], dtype=torch.float64)
    return Q @ V @ torch.diag(torch.cos(th)) @ V.T + U @ torch.diag(torch.sin(th)) @ V.T + Q @ (Id - V @ V.T), th


@pytest.mark.parametrize("k", [1, 2, 5, 12])
def test_top_singular_pairs_match_float64_svd(k):
    H = torch.randn(60, 12, generator=torch.Generator().manual_seed(30))
    s, V = linalg.top_singular_pairs(H, k)
    _, S_ref, Vh_ref = torch.linalg.svd(H.double(), full_matrices=False)
    assert s.dtype == torch.float64 and V.shape == (12, k)
    assert torch.allclose(s, S_ref[:k], rtol=1e-12)
    # each singular vector up to sign (the singular values of a Gaussian matrix are distinct)
    assert torch.allclose((V * Vh_ref[:k].T).sum(0).abs(), torch.ones(k, dtype=torch.float64), atol=1e-9)


def test_top_singular_pair_of_degenerate_zero_and_extreme_matrices_is_finite_and_exact():
    g = torch.Generator().manual_seed(31)
    Qo = torch.linalg.qr(torch.randn(40, 6, generator=g))[0]
    cases = {
        "repeated top value": Qo * torch.tensor([3.0, 3.0, 1.0, 1.0, 0.5, 0.0]),
        "rank one": torch.randn(40, 1, generator=g) @ torch.randn(1, 6, generator=g),
        "tiny": 1e-30 * torch.randn(40, 6, generator=g),
        "huge": 1e18 * torch.randn(40, 6, generator=g),
        "one column": torch.randn(40, 1, generator=g),
    }
    for name, H in cases.items():
        s, V = linalg.top_singular_pairs(H, 1)
        s_ref = torch.linalg.svdvals(H.double())[0]
        assert torch.isfinite(V).all(), name
        assert s.item() == pytest.approx(s_ref.item(), rel=1e-10), name
        # V is a top right singular vector: ||H v|| = s_1 (any vector of a repeated top eigenspace is)
        assert torch.linalg.vector_norm(H.double() @ V).item() == pytest.approx(s_ref.item(), rel=1e-10), name
    s, V = linalg.top_singular_pairs(torch.zeros(40, 6), 1)
    assert s.item() == 0 and torch.isfinite(V).all()


@pytest.mark.parametrize("k", [1, 3, "full"])
def test_geodesic_step_matches_svd_formula_in_float32(k):
    d, r = 48, 8
    Q = random_orthonormal(d, r, seed=32).float()
    H = torch.randn(d, r, generator=torch.Generator().manual_seed(33))
    ang = lambda s: 1.2 * s / s[0]  # noqa: E731
    Q2, theta = linalg.geodesic_step(Q, H, ang, update_rank=k)
    ref, th_ref = _textbook_step(Q, H, ang, r if k == "full" else k)
    assert Q2.dtype == torch.float32 and theta.dtype == torch.float32
    assert torch.allclose(Q2.double(), ref, atol=2e-6)
    assert torch.allclose(theta.double(), th_ref, atol=1e-6)


def test_geodesic_step_with_rank_deficient_tangent():
    # d < 2r: the tangent space at Q has only d - r = 3 dimensions, so H has r - 3 zero singular values;
    # those directions must get angle 0 (no NaN from 0/0) and the step must still match the formula
    d, r = 10, 7
    Q = random_orthonormal(d, r, seed=34).float()
    H = torch.randn(d, r, generator=torch.Generator().manual_seed(35))
    ang = lambda s: 0.9 * s / s[0]  # noqa: E731
    Q2, theta = linalg.geodesic_step(Q, H, ang, update_rank="full")
    assert torch.isfinite(Q2).all() and linalg.orthonormality_error(Q2) < 1e-5
    assert (theta[3:] == 0).all() and (theta[:3] > 0).all()
    ref, _ = _textbook_step(Q, H, ang, 3)
    assert torch.allclose(Q2.double(), ref, atol=2e-6)
    # a zero tangent does not move Q, even with an angle function that divides by s[0] (0/0)
    Q3, theta3 = linalg.geodesic_step(Q, torch.zeros(d, r), lambda s: s * (0.5 / s[0]), update_rank="full")
    assert torch.equal(Q3, Q) and torch.equal(theta3, torch.zeros(r))


def test_geodesic_step_keeps_orthonormality_at_large_rank_and_angle():
    # at r = 96 the old SVD-based step left ||Q^T Q - I||_F near 1e-5; the float64 Gram keeps ~1e-6
    d, r = 384, 96
    Q = linalg.haar(d, r, torch.Generator().manual_seed(36), "cpu")
    H = torch.randn(d, r, generator=torch.Generator().manual_seed(37))
    for k in (1, "full"):
        Q2, theta = linalg.geodesic_step(Q, H, lambda s: s * (math.pi / 2 / s[0]), update_rank=k)
        assert linalg.orthonormality_error(Q2) < 5e-6
        assert theta.max().item() == pytest.approx(math.pi / 2, abs=1e-6)


def test_update_rank_must_be_full_or_a_positive_integer():
    Q = random_orthonormal(10, 3, seed=38).float()
    for bad in (0, -1, "all", 1.5, True):
        with pytest.raises(ValueError, match="update_rank"):
            linalg.geodesic_step(Q, torch.randn(10, 3), lambda s: s, update_rank=bad)
    assert linalg.resolve_update_rank("full", 3) == 3 and linalg.resolve_update_rank(9, 3) == 3


def test_largest_angle_agrees_with_float64_principal_angles():
    g = torch.Generator().manual_seed(39)
    Q = linalg.haar(64, 8, g, "cpu")
    for ang in (1e-4, 1e-2, 0.5, 1.4):
        Q2, _ = linalg.geodesic_step(Q, torch.randn(64, 8, generator=g), lambda s: ang * s / s[0], update_rank="full")  # noqa: B023  called right away
        ref = principal_angles(Q, Q2).max().item()
        assert linalg.largest_angle(Q, Q2).item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    Q3 = linalg.haar(64, 8, g, "cpu")  # an unrelated basis
    assert linalg.largest_angle(Q, Q3).item() == pytest.approx(principal_angles(Q, Q3).max().item(), abs=1e-3)


# ---------------------------------------------------------------- robust SVD (fault injection)

_REAL_SVD = torch.linalg.svd


def _failing_svd(fail_dtypes, mode="raise"):
    """A stand-in for torch.linalg.svd that fails like LAPACK/cuSOLVER for the given input dtypes.

    Non-converging inputs are hard to produce on purpose (hundreds of extreme-range and
    repeated-row matrices converge with this LAPACK), so the failure is injected."""
    calls = []

    def svd(a, *args, **kwargs):
        calls.append(a.dtype)
        if a.dtype in fail_dtypes:
            if mode == "raise":
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (injected)")
            u, s, vh = _REAL_SVD(a, *args, **kwargs)
            return u * float("nan"), s, vh  # the silent failure of some CUDA drivers
        return _REAL_SVD(a, *args, **kwargs)

    return svd, calls


def _assert_svd_of(res, a):
    """res is a correct reduced SVD of a (compared with a float64 SVD), finite, with orthonormal factors."""
    U, S, Vh = _REAL_SVD(a.double(), full_matrices=False)
    assert res.U.dtype == a.dtype and res.S.dtype == a.dtype and res.Vh.dtype == a.dtype
    assert all(torch.isfinite(t).all() for t in res[:3])
    assert torch.allclose(res.S.double(), S, rtol=1e-5, atol=1e-6 * S[0].item())
    k = min(a.shape)
    assert linalg.orthonormality_error(res.U.double()) < 1e-5 and linalg.orthonormality_error(res.Vh.mT.double()) < 1e-5
    # singular vectors up to sign (the test matrices have distinct singular values)
    assert torch.allclose((res.U.double() * U).sum(0).abs(), torch.ones(k, dtype=torch.float64), atol=1e-5)
    assert torch.allclose((res.Vh.double() * Vh).sum(1).abs(), torch.ones(k, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
@pytest.mark.parametrize("fail,mode,expect", [
    ((), "raise", None),
    ((torch.float32,), "raise", "float64"),
    ((torch.float32,), "nan", "float64"),
    ((torch.float32, torch.float64), "raise", "gram"),
])
def test_robust_svd_falls_back_and_stays_exact(monkeypatch, shape, fail, mode, expect):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(40))
    svd, calls = _failing_svd(fail, mode)
    monkeypatch.setattr(torch.linalg, "svd", svd)
    res = linalg.robust_svd(a)
    assert res.fallback == expect
    assert calls[0] == torch.float32  # the default path is always tried first
    _assert_svd_of(res, a)


def test_gram_fallback_of_a_rank_deficient_matrix_has_no_nan(monkeypatch):
    g = torch.Generator().manual_seed(41)
    a = torch.randn(20, 3, generator=g) @ torch.randn(3, 50, generator=g)  # rank 3 of 20
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd((torch.float32, torch.float64))[0])
    res = linalg.robust_svd(a)
    assert res.fallback == "gram" and all(torch.isfinite(t).all() for t in res[:3])
    # the short side is a complete orthonormal basis; the top 3 triplets reproduce a
    assert linalg.orthonormality_error(res.U) < 1e-5
    assert torch.allclose(res.U[:, :3] * res.S[:3] @ res.Vh[:3], a, atol=1e-4)
    assert (res.S[3:] < 1e-5 * res.S[0]).all()


def test_robust_svd_refuses_a_non_finite_input(monkeypatch):
    a = torch.randn(6, 9)
    a[2, 3] = float("nan")
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd((torch.float32, torch.float64))[0])
    with pytest.raises(FloatingPointError, match="non-finite"):
        linalg.robust_svd(a)


@pytest.mark.parametrize("shape", [(24, 60), (60, 24)])
@pytest.mark.parametrize("fail", [(torch.float32,), (torch.float32, torch.float64)])
def test_svd_basis_falls_back_counts_and_spans_the_top_subspace(monkeypatch, shape, fail):
    g = torch.Generator().manual_seed(42)
    G = torch.randn(shape[0], 5, generator=g) @ torch.randn(5, shape[1], generator=g) + 0.05 * torch.randn(shape, generator=g)
    X = linalg.orient(G)
    transposed = linalg.is_transposed(G.shape)
    ref = _REAL_SVD(X.double(), full_matrices=False)[0][:, :5]
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd(fail)[0])

    class Stats:
        svd_fallbacks = 0

    stats = Stats()
    Q = linalg.svd_basis(X, 5, transposed, stats=stats)
    assert stats.svd_fallbacks == 1
    assert Q.shape == (X.shape[0], 5) and Q.dtype == torch.float32 and torch.isfinite(Q).all()
    assert linalg.orthonormality_error(Q) < 1e-5
    assert principal_angles(Q, ref).max() < 1e-4
    linalg.svd_basis(X, 5, transposed)  # stats is optional
