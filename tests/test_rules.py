import math

import pytest
import torch

from grassopt import linalg
from grassopt.rules import RULES, RuleContext, check_options, get_rule, rule_flag
from conftest import principal_angles


def estimation_error(Q, X):
    Q, X = Q.double(), X.double()
    return (X - Q @ (Q.T @ X)).square().sum().item()


def low_rank_plus_noise(d, k, r, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, r, generator=g) @ torch.randn(r, k, generator=g)
    return A + noise * torch.randn(d, k, generator=g)


def ctx(rank, transposed=False, seed=0, **opts):
    return RuleContext(rank=rank, transposed=transposed, generator=torch.Generator().manual_seed(seed), options=opts)


def test_registry_has_every_rule_and_unknown_is_clear():
    assert set(RULES) == {"svd", "rsvd", "frozen", "power", "track", "walk", "jump", "hybrid",
                          "gaussian"}
    with pytest.raises(ValueError, match="unknown subspace rule 'svdd'.*choose one of"):
        get_rule("svdd")


@pytest.mark.parametrize("name", sorted(n for n, r in RULES.items() if rule_flag(r, "ORTHONORMAL")))
def test_every_rule_returns_orthonormal_basis_of_right_shape(name):
    rule = get_rule(name)
    X = torch.randn(24, 50)
    c = ctx(5)
    Q = rule.init(X, c)
    assert Q.shape == (24, 5) and Q.dtype == torch.float32
    assert linalg.orthonormality_error(Q) < 1e-5
    Q2 = rule.update(Q, torch.randn(24, 50), c)
    assert Q2.shape == (24, 5)
    assert linalg.orthonormality_error(Q2) < 1e-4


@pytest.mark.parametrize("q", [1, 2, 4])
def test_track_small_step_lowers_estimation_error(q):
    X = low_rank_plus_noise(30, 60, 4, seed=1)
    Q = linalg.haar(30, 4, torch.Generator().manual_seed(3), "cpu")  # a poor basis
    before = estimation_error(Q, X)
    Q2 = get_rule("track").update(Q, X, ctx(4, step_size=0.05, update_rank=q))
    assert estimation_error(Q2, X) < before
    assert linalg.orthonormality_error(Q2) < 1e-5


def test_track_direction_is_minus_gradient_of_F_by_finite_differences():
    # d/dt F(Q(t)) at t=0 along the geodesic must equal -||grad F||-weighted: check that a tiny raw
    # step reduces F by about theta * sigma_1 (first-order decrease along the top singular direction)
    X = low_rank_plus_noise(16, 40, 3, seed=2).double()
    Q = linalg.haar(16, 3, torch.Generator().manual_seed(4), "cpu").double()
    A = Q.T @ X
    E = X - Q @ A
    gradF = -2 * E @ A.T
    sigma1 = torch.linalg.svdvals(gradF)[0].item()
    eta = 1e-6
    Q2 = get_rule("track").update(Q, X, RuleContext(rank=3, transposed=False, options={"step_size": eta, "step_mode": "raw"}))
    theta = eta * sigma1
    dF = estimation_error(Q2, X) - estimation_error(Q, X)
    # moving Q by angle theta along the top direction of -gradF changes F by -theta * sigma1 / ... :
    # along the geodesic Q(t) = Q + t U V^T + O(t^2), dF/dt = <gradF, U V^T> = -sigma1.
    assert dF == pytest.approx(-theta * sigma1, rel=1e-3)


def test_track_normalized_step_bounds_the_angle():
    X = low_rank_plus_noise(20, 40, 3, seed=5)
    Q = linalg.haar(20, 3, torch.Generator().manual_seed(6), "cpu")
    c = ctx(3, step_size=0.4, step_mode="normalized")
    Q2 = get_rule("track").update(Q, X, c)
    assert 0 < c.angle.item() <= 0.4
    assert principal_angles(Q, Q2).max().item() == pytest.approx(c.angle.item(), abs=1e-4)
    # scale-free: multiplying the gradient by 1000 gives the same step
    c2 = ctx(3, step_size=0.4, step_mode="normalized")
    Q3 = get_rule("track").update(Q, 1000 * X, c2)
    assert torch.allclose(Q2, Q3, atol=1e-5)


def test_track_converges_to_the_dominant_subspace():
    X = low_rank_plus_noise(30, 80, 4, noise=0.01, seed=7)
    U = torch.linalg.svd(X.double())[0][:, :4]
    Q = linalg.haar(30, 4, torch.Generator().manual_seed(8), "cpu")
    c = ctx(4, step_size=1.0, update_rank=4)
    for _ in range(60):
        Q = get_rule("track").update(Q, X, c)
    assert principal_angles(Q, U).max() < 0.01


@pytest.mark.parametrize("q", [1, 3, "full"])
def test_walk_moves_by_eta(q):
    Q = linalg.haar(30, 5, torch.Generator().manual_seed(9), "cpu")
    for eta in (0.05, 0.3):
        c = ctx(5, step_size=eta, update_rank=q, seed=10)
        Q2 = get_rule("walk").update(Q, None, c)
        assert principal_angles(Q, Q2).max().item() == pytest.approx(eta, abs=1e-4)
        assert c.angle.item() == pytest.approx(eta, abs=1e-6)


def test_walk_is_reproducible_from_the_generator_and_ignores_the_gradient():
    Q = linalg.haar(30, 5, torch.Generator().manual_seed(9), "cpu")
    a = get_rule("walk").update(Q, torch.randn(30, 40), ctx(5, seed=11, step_size=0.1))
    b = get_rule("walk").update(Q, torch.randn(30, 40), ctx(5, seed=11, step_size=0.1))
    c = get_rule("walk").update(Q, None, ctx(5, seed=12, step_size=0.1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_jump_is_haar_by_monte_carlo():
    d, r, n = 5, 2, 10000
    c = ctx(r, seed=13)
    Q = linalg.haar(d, r, torch.Generator().manual_seed(1), "cpu")
    acc = torch.zeros(d, d, dtype=torch.float64)
    for _ in range(n):
        Q = get_rule("jump").update(Q, None, c)
        acc += (Q @ Q.T).double()
    assert torch.allclose(acc / n, (r / d) * torch.eye(d, dtype=torch.float64), atol=5 / math.sqrt(n))


def test_jump_random_init_and_svd_init():
    X = low_rank_plus_noise(20, 40, 3, seed=14)
    U = torch.linalg.svd(X)[0][:, :3]
    assert principal_angles(get_rule("jump").init(X, ctx(3, init="svd")), U).max() < 1e-3
    assert principal_angles(get_rule("jump").init(X, ctx(3, init="random")), U).max() > 0.1


def test_hybrid_jumps_with_probability_p():
    Q = linalg.haar(30, 3, torch.Generator().manual_seed(15), "cpu")
    c = ctx(3, seed=16, step_size=0.1, jump_prob=0.3)
    n, jumps = 400, 0
    for _ in range(n):
        Q2 = get_rule("hybrid").update(Q, None, c)
        if principal_angles(Q, Q2).max() > 0.11:  # a walk moves by exactly 0.1
            jumps += 1
    sd = math.sqrt(n * 0.3 * 0.7)
    assert abs(jumps - 0.3 * n) < 4 * sd


def test_rsvd_finds_the_top_subspace_of_a_low_rank_matrix():
    X = low_rank_plus_noise(40, 100, 5, noise=1e-3, seed=17)
    U = torch.linalg.svd(X.double())[0][:, :5]
    Q = get_rule("rsvd").init(X, ctx(5, seed=18))
    assert principal_angles(Q, U).max() < 1e-2


def test_power_iteration_converges_to_top_subspace():
    X = low_rank_plus_noise(30, 60, 3, noise=0.05, seed=19)
    U = torch.linalg.svd(X.double())[0][:, :3]
    Q = linalg.haar(30, 3, torch.Generator().manual_seed(20), "cpu")
    for _ in range(30):
        Q = get_rule("power").update(Q, X, ctx(3))
    assert principal_angles(Q, U).max() < 1e-3


def test_frozen_never_moves():
    Q = linalg.haar(10, 2, torch.Generator().manual_seed(21), "cpu")
    assert get_rule("frozen").update(Q, torch.randn(10, 20), ctx(2)) is Q


# ---------------------------------------------------------------- SVD fallbacks are counted in ctx

_REAL_SVD = torch.linalg.svd


def _svd_failing_for_float32(a, *args, **kwargs):
    if a.dtype == torch.float32:
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (injected)")
    return _REAL_SVD(a, *args, **kwargs)


@pytest.mark.parametrize("name,call", [("svd", "init"), ("svd", "update"), ("frozen", "init"), ("track", "init"),
                                       ("walk", "init"), ("jump", "init"), ("rsvd", "init"), ("rsvd", "update")])
@pytest.mark.parametrize("transposed", [False, True])
def test_rules_survive_a_failing_svd_and_count_the_fallback(monkeypatch, name, call, transposed):
    X = low_rank_plus_noise(24, 60, 4, noise=1e-3, seed=22)
    U = torch.linalg.svd(X.double())[0][:, :4]
    c = ctx(4, transposed=transposed, seed=23)
    assert c.svd_fallbacks == 0
    rule = get_rule(name)
    Q = rule.init(X, c) if call == "init" else rule.update(linalg.haar(24, 4, None, "cpu"), X, c)
    assert c.svd_fallbacks == 0  # the default path does not count
    monkeypatch.setattr(torch.linalg, "svd", _svd_failing_for_float32)
    c2 = ctx(4, transposed=transposed, seed=23)
    Q2 = rule.init(X, c2) if call == "init" else rule.update(Q, X, c2)
    assert c2.svd_fallbacks == 1
    assert torch.isfinite(Q2).all() and linalg.orthonormality_error(Q2) < 1e-5
    assert principal_angles(Q2, U).max() < 1e-2


# ---------------------------------------------------------------- the full-rank walk


def test_walk_defaults_to_the_full_step():
    assert get_rule("walk").OPTIONS["update_rank"] == "full"
    assert get_rule("hybrid").OPTIONS["update_rank"] == "full"


@pytest.mark.parametrize("eta", [0.05, 0.3, 1.2])
def test_full_walk_turns_every_direction_and_the_largest_by_exactly_step_size(eta):
    d, r = 30, 5
    Q = linalg.haar(d, r, torch.Generator().manual_seed(24), "cpu")
    c = ctx(r, seed=25, step_size=eta)  # update_rank: the default, "full"
    Q2 = get_rule("walk").update(Q, None, c)
    assert linalg.orthonormality_error(Q2) < 2e-6
    # independently, in float64: cos(theta) are the singular values of Q_old^T Q_new
    cos = torch.linalg.svdvals(Q.double().T @ Q2.double()).clamp(max=1.0)
    angles = torch.arccos(cos).flip(0)  # descending
    assert angles[0].item() == pytest.approx(eta, abs=2e-5)
    assert c.angle.item() == pytest.approx(eta, abs=1e-6)
    # the angles are step_size * s / s_max for the singular values s of the tangent of the same Z
    Z = torch.randn(d, r, generator=torch.Generator().manual_seed(25)).double()
    s = torch.linalg.svdvals(Z - Q.double() @ (Q.double().T @ Z))
    assert torch.allclose(angles, eta * s / s[0], atol=5e-5)
    assert (angles > 0.05 * eta).all()  # all r principal angles move
    # a rank-1 step from the same draw moves one direction only
    Q1 = get_rule("walk").update(Q, None, ctx(r, seed=25, step_size=eta, update_rank=1))
    a1 = principal_angles(Q, Q1)
    assert a1[-1].item() == pytest.approx(eta, abs=2e-5) and a1[:-1].max() < 1e-3


def test_full_walk_mixes_to_the_haar_average_and_stays_orthonormal():
    # E[Q Q^T] -> (r/d) I. Under Haar, Var(P_ii) = 2 r (d - r) / (d^2 (d + 2)), sd 0.164 here (the
    # off-diagonal entries vary less). The chain's integrated autocorrelation time is ~10 steps
    # (measured over three seeds: 8 to 12); with tau <= 20 the 1900 kept steps give >= 95 effective
    # samples, a standard error <= 0.164 / sqrt(95) = 0.017, and 5 standard errors = 0.084. A basis that
    # does not mix keeps the start's projector (entries 0 and 1: a 0.75 deviation).
    d, r, n, burn = 12, 3, 2000, 100
    c = ctx(r, seed=26, step_size=0.5)
    Q = torch.eye(d)[:, :r].contiguous()
    acc = torch.zeros(d, d, dtype=torch.float64)
    for i in range(n):
        Q = get_rule("walk").update(Q, None, c)  # no re-orthonormalisation in between
        if i >= burn:
            acc += (Q @ Q.T).double()
    mean = acc / (n - burn)
    assert (mean - (r / d) * torch.eye(d, dtype=torch.float64)).abs().max() < 0.084
    assert linalg.orthonormality_error(Q) < 1e-5  # 2000 geodesic steps drift by < 1e-5


def test_hybrid_walk_branch_is_the_full_walk():
    Q = linalg.haar(30, 5, torch.Generator().manual_seed(27), "cpu")
    c = ctx(5, seed=28, step_size=0.2, jump_prob=0.0)
    Q2 = get_rule("hybrid").update(Q, None, c)
    angles = principal_angles(Q, Q2)
    assert angles.max().item() == pytest.approx(0.2, abs=2e-5) and (angles > 0.01).all()


def test_hybrid_walks_by_the_walks_default_step():
    """hybrid's walk steps default to walk's step size (1.5 rad), not the 0.1 rad that walk's own
    docstring calls a frozen basis: the same constant, in the rule and in an optimizer's group."""
    from grassopt import SubspaceAdamW
    eta = get_rule("walk").OPTIONS["step_size"]
    assert eta == 1.5 and get_rule("hybrid").OPTIONS["step_size"] == eta
    Q = linalg.haar(30, 5, torch.Generator().manual_seed(29), "cpu")
    Q2 = get_rule("hybrid").update(Q, None, ctx(5, seed=30, jump_prob=0.0))  # step_size: the default
    assert principal_angles(Q, Q2).max().item() == pytest.approx(eta, abs=2e-5)
    w = torch.nn.Parameter(torch.zeros(8, 12))
    assert SubspaceAdamW([{"params": [w], "rank": 2, "rule": "hybrid"}]).param_groups[0]["step_size"] == eta


# ---------------------------------------------------------------- option validation


def test_every_rule_validates_and_accepts_its_own_defaults():
    for name, rule in RULES.items():
        assert callable(getattr(rule, "validate", None)), name
        check_options(rule, rule.OPTIONS, rank=4)
        check_options(rule, {**rule.OPTIONS, "lr": -1, "rank": 4, "rule": name}, rank=4)  # other keys ignored


@pytest.mark.parametrize("name,options,message", [
    ("walk", {"update_rank": 0}, r"update_rank=0 is not valid for subspace rule 'walk': use update_rank='full' or an integer in \[1, rank=4\]"),
    ("walk", {"update_rank": 5}, r"update_rank=5 .* integer in \[1, rank=4\]"),
    ("walk", {"update_rank": "all"}, r"update_rank='all' .* update_rank='full'"),
    ("walk", {"update_rank": True}, r"update_rank=True"),
    ("walk", {"update_rank": 2.0}, r"update_rank=2.0"),
    ("walk", {"step_size": 0}, r"step_size=0 is not valid for subspace rule 'walk': use a number in \(0, 1.571\] radians"),
    ("walk", {"step_size": 2.0}, r"step_size=2.0 .* \(0, 1.571\]"),
    ("walk", {"step_size": float("nan")}, r"step_size=nan"),
    ("walk", {"step_size": "0.1"}, r"step_size='0.1'"),
    ("hybrid", {"update_rank": 9}, r"update_rank=9 is not valid for subspace rule 'hybrid': use update_rank='full' or an integer in \[1, rank=4\]"),
    ("hybrid", {"step_size": -1}, r"step_size=-1 is not valid for subspace rule 'hybrid'"),
    ("hybrid", {"jump_prob": 1.5}, r"jump_prob=1.5 is not valid for subspace rule 'hybrid': use a probability in \[0, 1\]"),
    ("track", {"step_mode": "scaled"}, r"step_mode='scaled' is not valid for subspace rule 'track': use one of 'normalized', 'raw'"),
    ("track", {"step_size": 0.0}, r"step_size=0.0 is not valid for subspace rule 'track': use a number > 0"),
    ("track", {"update_rank": -1}, r"update_rank=-1 .* 'track'"),
    ("jump", {"init": "haar"}, r"init='haar' is not valid for subspace rule 'jump': use one of 'svd', 'random'"),
    ("rsvd", {"oversample": -2}, r"oversample=-2 is not valid for subspace rule 'rsvd': use an integer >= 0"),
    ("rsvd", {"power_iters": 1.5}, r"power_iters=1.5 .* integer >= 0"),
])
def test_validation_messages_name_the_option_and_the_fix(name, options, message):
    with pytest.raises(ValueError, match=message) as err:
        check_options(get_rule(name), options, rank=4)
    assert "\n" not in str(err.value)


def test_valid_options_pass_and_raw_track_step_sizes_are_unbounded():
    check_options(get_rule("walk"), {"update_rank": "full", "step_size": math.pi / 2}, rank=4)
    check_options(get_rule("walk"), {"update_rank": 4, "step_size": 1e-3}, rank=4)
    check_options(get_rule("hybrid"), {"update_rank": 1, "jump_prob": 0}, rank=4)
    check_options(get_rule("track"), {"step_size": 1e4, "step_mode": "raw", "update_rank": "full"}, rank=4)
    check_options(get_rule("jump"), {"init": "random"}, rank=4)
    check_options(get_rule("rsvd"), {"oversample": 0, "power_iters": 0}, rank=4)


def test_a_rule_without_validate_accepts_anything():
    import types

    rule = types.SimpleNamespace(NAME="custom", OPTIONS={"knob": 1})
    check_options(rule, {"knob": "anything"}, rank=2)
