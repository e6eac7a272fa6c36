
import math

import pytest
import torch
from torch import nn

from grassopt import SubspaceAdamW, recovery, transport
from conftest import random_orthonormal


def moments(r, k, seed=0):
    """Moments in the optimizer's layout, k x r (one row per slice along the long side)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(k, r, generator=g)
    v = m * m + torch.rand(k, r, generator=g)  # a valid second moment: V >= M^2
    return m, v


def test_rotate_with_identity_leaves_moments_unchanged():
    Q = random_orthonormal(20, 4, seed=1).float()
    m, v = moments(4, 30)
    m0, v0 = m.clone(), v.clone()
    transport.transport("rotate", Q, Q.clone(), m, v)
    assert torch.allclose(m, m0, atol=1e-6) and torch.allclose(v, v0, atol=1e-5)


def test_rotate_is_exact_for_a_permutation_and_sign_flip_of_the_basis():
    Q = random_orthonormal(20, 4, seed=2).float()
    perm = torch.tensor([2, 0, 3, 1])
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    Q_new = Q[:, perm] * signs
    m, v = moments(4, 30, seed=3)
    m0, v0 = m.clone(), v.clone()
    transport.transport("rotate", Q, Q_new, m, v)
    # new coordinate i is old coordinate perm[i] times its sign
    assert torch.allclose(m, m0[:, perm] * signs, atol=1e-6)
    assert torch.allclose(v, v0[:, perm], atol=1e-6)


def test_rotate_matches_float64_formula_without_the_one_minus_beta2_factor():
    Q_old = random_orthonormal(25, 5, seed=4)
    Q_new = random_orthonormal(25, 5, seed=5)
    m, v = moments(5, 12, seed=6)
    C = Q_new.T @ Q_old
    md, vd = m.double().T, v.double().T  # the r x k moments of docs/algorithms.md#transport
    m_ref = C @ md
    v_ref = ((C * C) @ (vd - md * md) + m_ref * m_ref).abs()
    transport.transport("rotate", Q_old.float(), Q_new.float(), m, v)
    assert torch.allclose(m.double().T, m_ref, atol=1e-5)
    assert torch.allclose(v.double().T, v_ref, atol=1e-5)
    # the public SubTrack++ code's (1 - b2) factor would shrink V a thousandfold: make sure we do not
    assert v.sum() > 0.5 * v_ref.sum()


def test_keep_and_reset():
    Q_old, Q_new = random_orthonormal(10, 3, 1).float(), random_orthonormal(10, 3, 2).float()
    m, v = moments(3, 7)
    m0 = m.clone()
    assert transport.transport("keep", Q_old, Q_new, m, v) is False and torch.equal(m, m0)
    assert transport.transport("reset", Q_old, Q_new, m, v) is True
    assert not m.any() and not v.any()
    with pytest.raises(ValueError, match="unknown transport 'spin'"):
        transport.transport("spin", Q_old, Q_new, m, v)


def naive(X, Q, N, prev, zeta):
    X, Q, N = X.double(), Q.double(), N.double()
    R = Q.T @ X
    E = X - Q @ R
    phi = N.norm(dim=0) / (R.norm(dim=0) + 1e-8)
    S = E * phi
    c = 1.0
    if prev > 0 and S.norm() > zeta * prev:
        c = (zeta * prev / S.norm()).item()
    return S * c, c, E.norm().item()


def first_adam_direction(R, betas=(0.9, 0.999), eps=1e-6):
    """``N`` of the first Adam step on ``R`` (section 2: ``eps`` on ``sqrt(V)``, bias correction in the step size)."""
    R = R.double()
    return (1 - betas[0]) * R / (((1 - betas[1]) * R * R).sqrt() + eps)


def optimizer_route(X, Q, prev, zeta, alpha, alpha_r):
    """What :class:`SubspaceAdamW` does with recovery (``k x r`` layout, the norms from
    ``||X_j||^2 - ||R_j||^2``, ``E`` never formed): one first Adam step of a ``d x k`` weight (``d < k``,
    so ``X = G``) in the basis ``Q``, with the limiter remembering ``prev``. Returns the direction
    ``D`` (``W <- W - lr_t D``), the limiter's factor, the norm ``||c S||`` it stores and ``||E||``."""
    w = nn.Parameter(torch.zeros(X.shape))
    opt = SubspaceAdamW([{"params": [w], "rank": Q.shape[1], "rule": "frozen", "transport": "keep",
                          "recovery": True, "zeta": zeta, "alpha": alpha, "alpha_r": alpha_r,
                          "update_interval": 1000}], lr=1.0)
    w.grad = X.clone()
    opt.step()  # makes the state; then set it: this basis, fresh moments, the limiter's memory
    st = opt.state[w]
    st["Q"].copy_(Q)
    st["exp_avg"].zero_()
    st["exp_avg_sq"].zero_()
    st["adam_step"] = 0
    st["residual_norm"].fill_(prev)
    with torch.no_grad():
        w.zero_()
    w.grad = X.clone()
    opt.step()
    b1, b2 = opt.param_groups[0]["betas"]
    direction = -w.detach().double() / (math.sqrt(1 - b2) / (1 - b1))
    (diag,) = opt.diagnostics().values()
    return direction, diag["limiter"], st["residual_norm"].item(), diag["residual_norm"]


@pytest.mark.parametrize("prev", [0.0, 1e-3, 100.0])
def test_the_optimizers_recovery_matches_the_naive_residual(prev):
    g = torch.Generator().manual_seed(7)
    X = torch.randn(16, 40, generator=g)
    Q = random_orthonormal(16, 4, seed=8).float()
    alpha, alpha_r = 0.25, 0.5
    direction, c, s_norm, e_norm = optimizer_route(X, Q, prev, 1.01, alpha, alpha_r)
    N = first_adam_direction(Q.T @ X)
    S_ref, c_ref, e_ref = naive(X, Q, N, prev, 1.01)
    assert (c_ref < 1) == (prev == 1e-3)  # the limiter acts in one case only
    assert c == pytest.approx(c_ref, rel=1e-5)
    assert s_norm == pytest.approx(S_ref.norm().item(), rel=1e-4)
    assert e_norm == pytest.approx(e_ref, rel=1e-4)
    # the direction alpha Q N + alpha_r c E Phi, which the optimizer forms without E
    ref = alpha * Q.double() @ N + alpha_r * S_ref
    assert torch.allclose(direction, ref, atol=1e-5 * ref.abs().max().item())


def test_residual_vanishes_when_the_basis_spans_the_gradient():
    d, r = 12, 4
    Q = random_orthonormal(d, r, seed=9).float()
    X = Q @ torch.randn(r, 30, generator=torch.Generator().manual_seed(10))  # X = Q Q^T X
    alpha = 0.25
    direction, c, s_norm, e_norm = optimizer_route(X, Q, 0.0, 1.01, alpha, 0.5)
    # the recovery part of the direction, (I - Q Q^T) X Phi, vanishes: only alpha Q N is left
    ref = alpha * Q.double() @ first_adam_direction(Q.T @ X)
    assert torch.allclose(direction, ref, atol=1e-5 * ref.abs().max().item())
    # the norms come from ||X||^2 - ||R||^2 (no extra product), exact up to float32 cancellation:
    # sqrt(eps32) * ||X|| is the documented accuracy
    assert e_norm < 1e-3 * X.norm().item()
    phi = (first_adam_direction(Q.T @ X).norm(dim=0) / (Q.T @ X).double().norm(dim=0)).float()
    assert s_norm < 1e-3 * (X * phi).norm().item()


def test_limiter_only_shrinks_and_caps_growth_at_zeta():
    assert recovery.limit(torch.tensor(5.0), torch.tensor(0.0), 1.01).item() == 1.0  # first step stores
    assert recovery.limit(torch.tensor(1.0), torch.tensor(2.0), 1.01).item() == 1.0  # shrinking: untouched
    c = recovery.limit(torch.tensor(10.0), torch.tensor(2.0), 1.01).item()
    assert c == pytest.approx(2.02 / 10.0)
