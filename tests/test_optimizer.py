import io
import math

import pytest
import torch
from torch import nn

import grassopt
from grassopt import SubspaceAdamW
from reference import ReferenceStep
from resume import assert_resumes_bit_identically

PROJECTED = [p for p, v in grassopt.PRESETS.items() if v is not None]


def grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append(torch.randn(shape, generator=g) + 2 * torch.outer(torch.randn(shape[0], generator=g),
                                                                     torch.randn(shape[1], generator=g)))
    return out


@pytest.mark.parametrize("preset", PROJECTED)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["m<n", "m>n"])
def test_every_preset_matches_the_naive_float64_reference(preset, shape):
    T, rank, lr, wd = 4, 5, 1e-2, 0.05
    w0 = 0.1 * torch.randn(shape)
    p = nn.Parameter(w0.clone())
    opt = SubspaceAdamW([{"params": [p], "rank": rank, "update_interval": T, **grassopt.PRESETS[preset]}],
                        lr=lr, weight_decay=wd)
    group = opt.param_groups[0]
    ref = ReferenceStep(w0, rank, lr, wd=wd, alpha=group["alpha"], transport=group["transport"],
                        recovery=group["recovery"], update_interval=group["update_interval"],
                        scaling=group["scaling"], error_feedback=group["error_feedback"])
    for G in grads(shape, 14):
        p.grad = G
        opt.step()
        W_ref = ref.step(G, opt.basis(p))
        assert torch.allclose(p.detach().double(), W_ref, atol=2e-6, rtol=1e-5), preset
    assert opt.state[p]["step"] == 14


def test_reset_transport_restarts_bias_correction():
    shape, T = (20, 30), 3
    w0 = 0.1 * torch.randn(shape)
    p = nn.Parameter(w0.clone())
    opt = SubspaceAdamW([{"params": [p], "rank": 4, "update_interval": T, "rule": "svd", "transport": "reset",
                          "recovery": True}], lr=1e-2)
    ref = ReferenceStep(w0, 4, 1e-2, transport="reset", recovery=True, update_interval=T)
    for G in grads(shape, 8, seed=3):
        p.grad = G
        opt.step()
        assert torch.allclose(p.detach().double(), ref.step(G, opt.state[p]["Q"]), atol=2e-6, rtol=1e-5)
    assert opt.state[p]["adam_step"] == 8 - 6  # reset at steps 3 and 6


def test_plain_group_is_adam_with_eps_outside_the_bias_correction():
    w0 = torch.randn(7, 3)
    p = nn.Parameter(w0.clone())
    b = nn.Parameter(torch.randn(3))
    opt = SubspaceAdamW([p, b], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-3)
    m = v = torch.zeros_like(w0, dtype=torch.float64)
    W = w0.double()
    for t in range(1, 6):
        G = torch.randn(7, 3)
        p.grad, b.grad = G, torch.randn(3)
        opt.step()
        m = 0.8 * m + 0.2 * G.double()
        v = 0.95 * v + 0.05 * G.double() ** 2
        W = W - 1e-2 * math.sqrt(1 - 0.95**t) / (1 - 0.8**t) * m / (v.sqrt() + 1e-3)
        W = W - 1e-2 * 0.1 * W
        assert torch.allclose(p.double(), W, atol=1e-6)


def test_plain_group_with_negligible_eps_matches_torch_adamw():
    # eps=0 is refused (0/0 where V = 0, tests/test_faults.py); 1e-30 is below every sqrt(V) here
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(10, 4))
    b = nn.Parameter(a.detach().clone())
    ours = SubspaceAdamW([a], lr=1e-2, eps=1e-30)
    ref = torch.optim.Adam([b], lr=1e-2, eps=1e-30)
    for _ in range(5):
        G = torch.randn(10, 4)
        a.grad, b.grad = G.clone(), G.clone()
        ours.step(), ref.step()
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("preset", list(grassopt.PRESETS))
def test_state_dict_loads_weights_only_and_resume_is_bit_identical(preset, tmp_path):
    def model_and_opt():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 12), nn.Tanh(), nn.Linear(12, 4))
        opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=3, update_interval=3, seed=7)
        return model, opt

    data = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)),
             torch.randn(8, 4, generator=torch.Generator().manual_seed(100 + i))) for i in range(12)]

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    ckpt = assert_resumes_bit_identically(model_and_opt, train, data, 5, tmp_path / "ckpt.pt")  # stop mid-interval (T = 3)
    if preset in ("grasswalk", "grassjump"):
        assert any("rng_state" in s for s in ckpt["opt"]["state"].values())
    settings = grassopt.PRESETS[preset] or {}
    saved = [s for s in ckpt["opt"]["state"].values() if "adam_step" in s]  # the projected parameters
    if settings.get("rule") == "gaussian":  # the basis travels as a plain int seed, not a tensor
        assert saved and all(type(s["seed"]) is int and "Q" not in s for s in saved)
    if settings.get("error_feedback"):
        assert saved and all(s["error"].dtype == torch.float32 for s in saved)


def test_loading_keeps_float32_state_for_bf16_parameters():
    p = nn.Parameter(torch.randn(20, 30).bfloat16())
    opt = SubspaceAdamW([{"params": [p], "rank": 4}], lr=1e-3)
    p.grad = torch.randn(20, 30).bfloat16()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = SubspaceAdamW([{"params": [p], "rank": 4}], lr=1e-3)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for k in ("Q", "exp_avg", "exp_avg_sq"):
        assert opt2.state[p][k].dtype == torch.float32
        assert torch.equal(opt2.state[p][k], opt.state[p][k])


def test_random_rules_are_seeded_by_seed_and_parameter_index():
    def run(seed):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(12, 20)) for _ in range(2)]
        opt = SubspaceAdamW([{"params": ps, "rank": 3, "rule": "jump", "update_interval": 1}], lr=1e-2, seed=seed)
        for i in range(3):
            for p in ps:
                p.grad = torch.ones(12, 20) + i
            opt.step()
        return [opt.state[p]["Q"].clone() for p in ps]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # two parameters draw differently
    assert not torch.equal(a[0], c[0])  # the seed matters


def _random_rules_optimizer():
    """An optimizer with every random rule (walk, jump, hybrid, gaussian) and stochastic rounding of a
    bf16 weight, its parameters and gradients: built before the caller reads the global RNG's state."""
    ps = [nn.Parameter(torch.ones(12, 20)) for _ in range(4)] + [nn.Parameter(torch.ones(20, 12).bfloat16())]
    rules = ["walk", "jump", "hybrid", "gaussian", "walk"]
    groups = [{"params": [p], "rank": 3, "rule": r, "update_interval": 1,
               **({"scaling": "channel", "transport": "keep", "recovery": False} if r == "gaussian" else {})} for p, r in zip(ps, rules)]
    grads = [torch.linspace(-1, 1, p.numel()).view(p.shape).to(p.dtype) for p in ps]
    opt = SubspaceAdamW(groups, lr=1e-2, seed=3, stochastic_rounding=True)
    return opt, ps, grads


def _run(opt, ps, grads, steps=3):
    for i in range(steps):
        for p, g in zip(ps, grads):
            p.grad = g * (i + 1)
        opt.step()


def test_the_optimizer_never_draws_from_the_global_rng():
    opt, ps, grads = _random_rules_optimizer()
    before = torch.random.get_rng_state()
    _run(opt, ps, grads)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_the_global_rng_check_sees_a_draw_without_the_generator(monkeypatch):
    """The check above can fail: a rule that draws from the global RNG changes its state."""
    from grassopt.rules import walk
    real = walk.step

    def leaky(q, ctx, step_size, update_rank):
        torch.randn(1)  # no generator: the global RNG
        return real(q, ctx, step_size, update_rank)

    monkeypatch.setattr(walk, "step", leaky)
    opt, ps, grads = _random_rules_optimizer()
    before = torch.random.get_rng_state()
    _run(opt, ps, grads)
    assert not torch.equal(torch.random.get_rng_state(), before)


def test_memory_state_bytes_equal_the_formula_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40), nn.LayerNorm(40), nn.Linear(40, 10))
    for preset in grassopt.PRESETS:
        opt = grassopt.make_optimizer(model, preset, lr=1e-3, rank=8)
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        expected = sum(4 * grassopt.expected_state_elements(p.shape, g) for g in opt.param_groups for p in g["params"])
        assert grassopt.state_bytes(opt) == expected, preset
        if preset != "adamw":
            full = sum(2 * 4 * p.numel() for p in model.parameters())
            assert grassopt.state_bytes(opt) < full
        model.zero_grad()


def test_bf16_parameters_train_and_stay_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)).to(torch.bfloat16)
    opt = grassopt.make_optimizer(model, "subtrack++", lr=3e-2, rank=4, update_interval=10)
    x = torch.randn(128, 32).bfloat16()
    y = torch.randn(128, 8).bfloat16()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(s["Q"].dtype == torch.float32 for s in opt.state.values() if "Q" in s)


def test_nonfinite_gradient_raises_naming_the_parameter_and_changes_nothing():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    opt = grassopt.make_optimizer(model, "subtrack++", lr=1e-2, rank=3)
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    model(torch.randn(2, 10)).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"1\.weight.*nothing was updated"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])
    for p, s in opt.state.items():
        for k, v in s.items():
            assert (torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k])


def test_diagnostics_report_angle_residual_and_limiter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 6))
    opt = grassopt.make_optimizer(model, "subtrack++", lr=1e-2, rank=4, update_interval=2, step_size=0.3)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 30)).square().mean().backward()
        opt.step()
    d = opt.diagnostics()
    assert set(d) == {"0.weight", "2.weight"}
    for v in d.values():
        assert 0 < v["angle_deg"] <= math.degrees(0.3) + 1e-4
        assert v["last_update"] == 4 and v["step"] == 5
        assert 0 <= v["residual_ratio"] <= 1 and v["residual_norm"] > 0
        assert 0 < v["limiter"] <= 1


def test_limiter_never_lets_the_recovered_residual_grow_faster_than_zeta():
    p = nn.Parameter(torch.zeros(20, 30))
    opt = SubspaceAdamW([{"params": [p], "rank": 3, "rule": "svd", "zeta": 1.01}], lr=1e-3)
    prev, acted = None, 0
    for t in range(12):
        p.grad = torch.randn(20, 30) * (3.0**t)  # exploding gradients
        opt.step()
        g = opt.state[p]["residual_norm"].item()
        if prev is not None:
            assert g <= 1.01 * prev * (1 + 1e-5)
        prev = g
        acted += opt.diagnostics()["param 0"]["limiter"] < 1
    assert acted >= 3


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("group, match", [
    ({"rank": 0}, r"rank=0 must be an integer >= 1"),
    ({"rank": 20}, r"rank=20 must be < min\(20, 30\)=20 for w.*lower the rank"),
    ({"rank": 2, "update_interval": 0}, r"update_interval=0 must be an integer >= 1"),
    ({"rank": 2, "rule": "magic"}, r"unknown subspace rule 'magic'"),
    ({"rank": 2, "transport": "teleport"}, r"unknown transport 'teleport'"),
    ({"rank": 2, "zeta": 0.9}, r"zeta=0.9 must be >= 1"),
    ({"rank": 2, "lr": -1.0}, r"lr=-1.0 must be >= 0"),
    ({"rank": 2, "eps": -1e-8}, r"eps=-1e-08 must be > 0 and finite"),
    ({"rank": 2, "rule": "track", "jump_prob": 0.5}, r"option 'jump_prob' is not used by subspace rule 'track'"),
    ({"rank": 2, "updte_interval": 5}, r"unknown param-group option 'updte_interval'.*did you mean 'update_interval'"),
    ({"rule": "svd"}, r"subspace options need a 'rank'"),
    ({"rank": 2, "step_mode": "fast"}, r"step_mode='fast' is not valid for subspace rule 'track': use one of 'normalized', 'raw'"),
])
def test_bad_group_settings_raise_clear_errors(group, match):
    w = nn.Parameter(torch.randn(20, 30))
    with pytest.raises(ValueError, match=match):
        SubspaceAdamW([{"params": [("w", w)], **group}])


def test_one_dimensional_tensor_in_projected_group_is_named():
    with pytest.raises(ValueError, match=r"norm.weight has shape \(8,\): only 2-D weights can be projected"):
        SubspaceAdamW([{"params": [("norm.weight", nn.Parameter(torch.ones(8)))], "rank": 2}])


def test_failed_add_param_group_leaves_the_optimizer_unchanged():
    opt = SubspaceAdamW([nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "rank": 9})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [nn.Parameter(torch.randn(10, 12))], "rank": 3})
    assert opt.param_groups[1]["rule"] == "track" and opt.param_groups[1]["step_size"] == 0.5


def test_load_state_dict_rejects_mismatched_or_garbage_input():
    w = nn.Parameter(torch.randn(10, 12))
    opt = SubspaceAdamW([{"params": [w], "rank": 3}])
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        opt.load_state_dict({"weights": 1})
    other = SubspaceAdamW([{"params": [w], "rank": 4}])
    with pytest.raises(ValueError, match="rank=4 but this one has rank=3"):
        opt.load_state_dict(other.state_dict())


# ---------------------------------------------------------------------------- param_groups
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(32, 32, bias=False), "o_proj": nn.Linear(32, 32)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(32, 64, bias=False), "down_proj": nn.Linear(64, 32, bias=False)})
        self.norm = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 50, bias=False)
        self.tiny = nn.Linear(32, 4)


def names(groups, projected=True):
    return sorted(n for g in groups if ("rank" in g) == projected for n, _ in g["params"])


def test_param_groups_all_linear_excludes_head_embeddings_and_small_matrices():
    with pytest.warns(UserWarning, match=r"tiny.weight \(4, 32\): rank 8 >= min\(m, n\) = 4"):
        groups = grassopt.param_groups(Block(), "galore", rank=8)
    assert names(groups) == ["mlp.down_proj.weight", "mlp.up_proj.weight", "self_attn.o_proj.weight",
                             "self_attn.q_proj.weight"]
    plain = names(groups, projected=False)
    assert "lm_head.weight" in plain and "embed.weight" in plain and "self_attn.o_proj.bias" in plain
    assert "tiny.weight" in plain
    total = sum(p.numel() for g in groups for _, p in g["params"])
    assert total == sum(p.numel() for p in Block().parameters())


def test_param_groups_targets_by_substring_and_regex():
    groups = grassopt.param_groups(Block(), "fira", rank=4, targets=["attn"])
    assert names(groups) == ["self_attn.o_proj.weight", "self_attn.q_proj.weight"]
    groups = grassopt.param_groups(Block(), "fira", rank=4, targets=r"mlp\.(up|down)_proj")
    assert names(groups) == ["mlp.down_proj.weight", "mlp.up_proj.weight"]
    groups = grassopt.param_groups(Block(), "adamw", rank=4)
    assert names(groups) == [] and len(groups) == 1


def test_param_groups_overrides_weight_decay_and_unknown_preset():
    groups = grassopt.param_groups(Block(), "subtrack++", rank=4, update_interval=50, transport="keep",
                                   step_size=0.1, weight_decay=0.1)
    proj = groups[0]
    assert proj["transport"] == "keep" and proj["update_interval"] == 50 and proj["step_size"] == 0.1
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert no_decay and all(p.dim() < 2 for g in no_decay for _, p in g["params"])
    with pytest.raises(ValueError, match=r"unknown preset 'galore2'; choose one of"):
        grassopt.param_groups(Block(), "galore2")
    with pytest.raises(ValueError, match=r"unknown subspace option 'stepsize'"):
        grassopt.param_groups(Block(), "subtrack++", stepsize=0.1)
    with pytest.raises(ValueError, match=r"rank=0 must be an integer >= 1"):
        grassopt.param_groups(Block(), "galore", rank=0)


def test_step_parameters_one_at_a_time_equals_one_step():
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 12), nn.LayerNorm(12))
        return model, grassopt.make_optimizer(model, "subtrack++", lr=1e-2, rank=3, update_interval=2)

    (m1, o1), (m2, o2) = make(), make()
    for i in range(5):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(i))
        for m in (m1, m2):
            m.zero_grad()
            m(x).square().mean().backward()
        o1.step()
        for p in reversed(list(m2.parameters())):  # the order backward would produce them in
            o2.step_parameters([p])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_svd_failure_falls_back_is_counted_and_never_crashes_or_gives_nan(monkeypatch):
    # LAPACK's SVD can fail to converge on ill-conditioned gradients (a known GaLore failure); force it
    real_svd = torch.linalg.svd

    def failing_svd(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, *args, **kwargs)

    w0 = 0.1 * torch.randn(24, 40)
    runs = {}
    for fail in (False, True):
        if fail:
            monkeypatch.setattr(torch.linalg, "svd", failing_svd)
        p = nn.Parameter(w0.clone())
        opt = SubspaceAdamW([{"params": [("w", p)], "rank": 5, "update_interval": 3, **grassopt.PRESETS["galore"]}],
                            lr=1e-2)
        for G in grads((24, 40), 7):
            p.grad = G
            opt.step()
        assert bool(p.isfinite().all())
        runs[fail] = (p.detach().clone(), opt.diagnostics()["w"].get("svd_fallbacks", 0))
    assert runs[False][1] == 0
    assert runs[True][1] == 3  # the first basis and the updates at steps 3 and 6
    # the float64 fallback finds the same subspaces (signs are fixed by the factorisation of G as stored)
    assert torch.allclose(runs[True][0], runs[False][0], atol=1e-5)


def test_finite_check_by_sums_has_no_false_alarm_on_overflowing_sums_and_names_the_culprit():
    big = nn.Parameter(torch.zeros(64, 8))
    other = nn.Parameter(torch.zeros(20, 30))
    opt = SubspaceAdamW([{"params": [("big", big)]}, {"params": [("other", other)], "rank": 4}], lr=1e-3)
    big.grad = torch.full((64, 8), 3e37)  # every element finite, their sum is inf in float32
    other.grad = torch.randn(20, 30)
    opt.step()  # no error: the non-finite sum is confirmed element by element
    assert bool(big.isfinite().all()) and bool(other.isfinite().all()) and float(other.abs().max()) > 0
    before = [big.detach().clone(), other.detach().clone()]
    g = torch.randn(20, 30)
    g[3, 7] = float("-inf")
    other.grad = g
    big.grad = torch.ones(64, 8)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient \(NaN or inf\) in other; nothing was updated"):
        opt.step()
    assert torch.equal(big, before[0]) and torch.equal(other, before[1])
