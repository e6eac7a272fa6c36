"""Tests of grassopt.sketch: the sketched linear layer, the laws of P, the estimator, RSO, the
saved-activation accounting. The maths is ALGORITHMS.md section 5."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grassopt.sketch as gs
from grassopt.sketch import laws
from grassopt.train.model import Llama, config

LAWS = ("gaussian", "haar", "coordinate")


def linear_model(n=24, m=10, bias=True, dtype=torch.float64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, m, bias=bias, dtype=dtype))


def plain_grads(w, b, x, dy):
    """dx, dW, db of y = x W^T + b under the upstream gradient dy, by plain autograd."""
    w = w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    y = F.linear(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


# ---------------------------------------------------------------------------- the layer's gradients
def test_estimator_gradients_against_autograd():
    model = linear_model()
    lin = model[0]
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    gs.sketch(model, rank=6, law="haar", seed=3)
    layer = model[0]
    assert isinstance(layer, gs.SketchedLinear) and layer.weight is lin.weight and layer.bias is lin.bias
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 10, dtype=torch.float64)
    y = model(x)
    y.backward(dy)
    p = layer.projection_matrix()
    y_ref, dx_ref, g, db_ref = plain_grads(w0, b0, x, dy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(x.grad, dx_ref, rtol=0, atol=1e-13)        # input gradient: exact
    torch.testing.assert_close(lin.weight.grad, g @ p @ p.T, rtol=1e-12, atol=1e-12)  # G P P^T
    torch.testing.assert_close(lin.bias.grad, db_ref, rtol=0, atol=1e-13)
    assert not torch.allclose(lin.weight.grad, g)  # it is an estimate, not G itself


def test_rso_layer_gradients_against_autograd():
    model = linear_model()
    gs.sketch(model, rank=6, mode="rso", seed=1)
    layer = model[0]
    assert not layer.weight.requires_grad and layer.B.shape == (10, 6)
    x = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 10, dtype=torch.float64)
    with torch.no_grad():
        model(x)  # forms the layer's group, so that P exists
        layer.B.normal_()
    p = layer.projection_matrix()
    w_eff = layer.weight.detach() + layer.B.detach() @ p.T
    y = model(x)
    y.backward(dy)
    y_ref, dx_ref, g_eff, db_ref = plain_grads(w_eff, layer.bias, x, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(x.grad, dx_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer.B.grad, g_eff @ p, rtol=1e-12, atol=1e-12)  # dB = G P
    torch.testing.assert_close(layer.bias.grad, db_ref, rtol=0, atol=1e-13)
    assert layer.weight.grad is None


def test_micro_batches_share_p_and_next_step_draws_a_new_one():
    model = linear_model(bias=False)
    w0 = model[0].weight.detach().clone()
    gs.sketch(model, rank=5)
    xs = [torch.randn(7, 24, dtype=torch.float64) for _ in range(2)]
    for x in xs:  # gradient accumulation: two micro-batches, one step
        model(x).square().sum().backward()
    p = model[0].projection_matrix()
    g = sum(plain_grads(w0, None, x, 2 * F.linear(x, w0))[2] for x in xs)
    torch.testing.assert_close(model[0].weight.grad, g @ p @ p.T, rtol=1e-12, atol=1e-12)
    assert gs.current_step(model) == 0
    assert gs.next_step(model) == 1
    model(xs[0]).sum().backward()
    assert not torch.equal(model[0].projection_matrix(), p)


def test_autocast_bf16_runs_and_keeps_the_weight_gradient_float32():
    model = linear_model(n=32, m=16, dtype=torch.float32)
    gs.sketch(model, rank=8)
    x = torch.randn(6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    p = model[0].projection_matrix()
    g = torch.ones(6, 16).T @ x.detach()
    assert model[0].weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(model[0].weight.grad, g @ p @ p.T, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------- laws of P
@pytest.mark.parametrize("law", LAWS)
def test_law_shapes_and_structure(law):
    n, r = 20, 5
    p = laws.projection(law, n, r, seed=1, step=2, index=3, dtype=torch.float64)
    assert p.shape == (n, r) and p.dtype == torch.float64
    torch.testing.assert_close(p, laws.projection(law, n, r, seed=1, step=2, index=3, dtype=torch.float64))
    for other in ((2, 2, 3), (1, 3, 3), (1, 2, 4)):
        assert not torch.equal(p, laws.projection(law, n, r, *other, dtype=torch.float64))
    if law == "haar":  # sqrt(n/r) times orthonormal columns
        torch.testing.assert_close(p.T @ p, (n / r) * torch.eye(r, dtype=torch.float64))
    if law == "coordinate":  # r distinct coordinates, columns sqrt(n/r) e_i
        nz = p.nonzero()
        assert len(nz) == r and len(set(nz[:, 0].tolist())) == r and sorted(nz[:, 1].tolist()) == list(range(r))
        torch.testing.assert_close(p[p != 0], torch.full((r,), math.sqrt(n / r), dtype=torch.float64))


def entry_variance(law: str, g: torch.Tensor, r: int) -> torch.Tensor:
    """Var[(G P P^T)_ij] for one draw of P (n x r), from the law (derivation in the comments).

    gaussian, A = P P^T = Z Z^T / r with Z i.i.d. N(0,1): Var(A_jj) = 2/r, E A_kj^2 = 1/r (k != j),
    and distinct entries of a column are uncorrelated, so Var = (||G_i||^2 + G_ij^2) / r.
    haar, A = (n/r) Pi with Pi a uniform rank-r projection: E Pi_jj = r/n, E Pi_jj^2 =
    r(r+2)/(n(n+2)) (Pi_jj ~ Beta(r/2, (n-r)/2)); from Pi^2 = Pi, sum_k Pi_kj^2 = Pi_jj, so
    E Pi_kj^2 = r(n-r)/(n(n+2)(n-1)) for k != j; cross terms vanish (flip the sign of one
    coordinate). Var = (n/r)^2 [(||G_i||^2 - G_ij^2) E Pi_kj^2 + G_ij^2 E Pi_jj^2] - G_ij^2.
    coordinate, A = (n/r) diag(1[j in S]) with P(j in S) = r/n: Var = G_ij^2 (n/r - 1).
    Summed over entries these give (n+1)/r ||G||^2 and (n/r - 1) ||G||^2 (ALGORITHMS.md 5).
    """
    n = g.shape[1]
    row2 = g.square().sum(1, keepdim=True)
    if law == "gaussian":
        return (row2 + g.square()) / r
    if law == "haar":
        off = r * (n - r) / (n * (n + 2) * (n - 1))
        diag = r * (r + 2) / (n * (n + 2))
        return (n / r) ** 2 * ((row2 - g.square()) * off + g.square() * diag) - g.square()
    return g.square() * (n / r - 1)


@pytest.mark.parametrize("law", LAWS)
def test_unbiased_by_monte_carlo(law):
    n, m, r, draws = 12, 5, 3, 20000
    g = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    var = entry_variance(law, g, r)
    torch.testing.assert_close(var.sum() / g.square().sum(),
                               torch.tensor((n + 1) / r if law == "gaussian" else n / r - 1, dtype=torch.float64))
    total = torch.zeros_like(g)
    for step in range(draws):  # the seeded per-step draws the layers use
        p = laws.projection(law, n, r, seed=11, step=step, index=0, dtype=torch.float64)
        total += g @ p @ p.T
    mean = total / draws
    # The mean of `draws` independent estimates has per-entry standard error sqrt(var / draws) and,
    # by the central limit theorem, is close to normal: allow 5 standard errors per entry (a false
    # alarm has probability about 60 entries x 6e-7 = 4e-5).
    se = (var / draws).sqrt()
    z = (mean - g).abs() / se
    assert float(z.max()) < 5.0, f"{law}: max |mean - G| is {float(z.max()):.1f} standard errors"
    # and the test has power: a law off by 10% in scale (a wrong sqrt(n/r) is off by far more)
    # would put the largest entries beyond 6 standard errors
    assert float((0.1 * g.abs() / se).max()) > 6.0


def test_estimator_layer_is_unbiased_across_steps():
    """The same check through the layer: fresh P per next_step, E[W.grad] = G."""
    n, m, r, draws = 10, 4, 3, 3000
    model = linear_model(n=n, m=m, bias=False)
    w0 = model[0].weight.detach().clone()
    gs.sketch(model, rank=r, law="haar", seed=2)
    x = torch.randn(6, n, dtype=torch.float64)
    g = plain_grads(w0, None, x, torch.ones(6, m, dtype=torch.float64))[2]
    total = torch.zeros_like(g)
    for _ in range(draws):
        model[0].weight.grad = None
        model(x).sum().backward()
        total += model[0].weight.grad
        gs.next_step(model)
    se = (entry_variance("haar", g, r) / draws).sqrt()
    assert float(((total / draws - g).abs() / se).max()) < 5.0


def test_variance_ratio_gaussian_to_haar():
    """E||G P P^T - G||^2 is (n+1)/r ||G||^2 (gaussian) and (n/r - 1) ||G||^2 (haar): ratio (n+1)/(n-r)."""
    n, m, r, draws = 16, 64, 4, 4000
    g = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    err = {}
    for law in ("gaussian", "haar"):
        s = torch.empty(draws, dtype=torch.float64)
        for step in range(draws):
            p = laws.projection(law, n, r, seed=4, step=step, index=1, dtype=torch.float64)
            s[step] = (g @ p @ p.T - g).square().sum()
        err[law] = (s.mean(), s.std() / s.mean() / math.sqrt(draws))  # mean and relative standard error
    (mg, rg), (mh, rh) = err["gaussian"], err["haar"]
    ratio, rel_se = float(mg / mh), math.sqrt(rg**2 + rh**2)
    expected = (n + 1) / (n - r)
    assert 5 * rel_se < 0.05, f"Monte Carlo too noisy: relative standard error {rel_se:.4f}"
    assert abs(ratio / expected - 1) < 0.05, f"ratio {ratio:.4f}, expected {expected:.4f}"
    g2 = g.square().sum()
    assert abs(float(mg / g2) / ((n + 1) / r) - 1) < 4 * float(rg) + 1e-12
    assert abs(float(mh / g2) / (n / r - 1) - 1) < 4 * float(rh) + 1e-12


# ---------------------------------------------------------------------------- saved activations
@pytest.mark.parametrize("mode", ["estimator", "rso"])
def test_saved_bytes_of_a_covered_layer_drop_by_n_over_r(mode):
    n, r = 48, 6
    model = linear_model(n=n, m=20, bias=True, dtype=torch.float32)
    x = torch.randn(4, 9, n, requires_grad=True)
    plain = gs.saved_activation_bytes(model, lambda: model(x).sum())
    assert plain.total == x.numel() * 4 and plain.by_module == {"0": x.numel() * 4}
    gs.sketch(model, rank=r, mode=mode)
    sk = gs.saved_activation_bytes(model, lambda: model(x).sum())
    assert sk.total * (n // r) == plain.total and sk.by_module == {"0": 4 * 9 * r * 4}
    assert sk.resident > 0  # W and P are saved too, but they are model state
    sk.output.backward()
    assert x.grad is not None


def test_layers_reading_one_input_share_p_and_one_stored_xp():
    model = Llama(config("nano", vocab_size=128))
    gs.sketch(model, rank=8)
    idx = torch.randint(128, (2, 16))
    rep = gs.saved_activation_bytes(model, lambda: model(idx, idx)[1])
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.q_proj.group is attn.k_proj.group is attn.v_proj.group
    assert mlp.gate_proj.group is mlp.up_proj.group
    assert len({id(attn.q_proj.group), id(attn.o_proj.group), id(mlp.gate_proj.group), id(mlp.down_proj.group)}) == 4
    tokens = 2 * 16
    assert rep.by_module["layers.0.self_attn.q_proj"] == tokens * 8 * 4
    assert "layers.0.self_attn.k_proj" not in rep.by_module and "layers.0.mlp.up_proj" not in rep.by_module
    assert rep.by_module["layers.0.mlp.down_proj"] == tokens * 8 * 4
    rep.output.backward()
    # without sharing every layer stores its own x P
    model2 = gs.sketch(Llama(config("nano", vocab_size=128)), rank=8, share=None)
    rep2 = gs.saved_activation_bytes(model2, lambda: model2(idx, idx)[1])
    assert rep2.by_module["layers.0.self_attn.k_proj"] == tokens * 8 * 4


@pytest.mark.parametrize("mode", ["estimator", "rso"])
def test_saved_bytes_per_block_at_rank_n_over_8(mode):
    """Per block, the saving is exactly what the covered layers stop storing.

    Plain, q/k/v store one shared input (d per token), gate/up one (d), down_proj its input (f);
    o_proj's input is the attention output, which scaled_dot_product_attention saves anyway (same
    storage), so it costs nothing plain and r sketched. The rest of the block (RMSNorm: 2d + 1,
    attention: about 4d, SwiGLU: 3f) is untouched. At n/8 on `tiny` this is a saving of about 19%.
    """
    torch.manual_seed(0)
    cfg = config("tiny", vocab_size=256)
    d, f = cfg.hidden_size, cfg.intermediate_size
    model = Llama(cfg)
    idx = torch.randint(256, (2, 64))
    tokens = idx.numel()
    plain = gs.saved_activation_bytes(model, lambda: model(idx, idx)[1]).by_block()
    gs.sketch(model, rank=0.125, mode=mode)
    sk = gs.saved_activation_bytes(model, lambda: model(idx, idx)[1]).by_block()
    r, rf = d // 8, round(f / 8)
    for i in range(cfg.num_layers):
        saved = plain[f"layers.{i}"] - sk[f"layers.{i}"]
        assert saved == 4 * tokens * ((d - r) + (d - r) + (f - rf) - r)
        assert saved / plain[f"layers.{i}"] > 0.18


def test_accounting_dedupes_storage_and_attributes_to_the_innermost_module():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.a(x) * self.b(x)  # a and b save the same x; mul saves both outputs

    m = nn.Sequential(Two())
    x = torch.randn(5, 8, requires_grad=True)
    rep = gs.saved_activation_bytes(m, lambda: m(x).sum())
    assert rep.by_module == {"0.a": 5 * 8 * 4, "0": 2 * 5 * 8 * 4}
    assert rep.total == 3 * 5 * 8 * 4 and rep.tensors == 3
    assert rep.by_block() == {"0": rep.total}
    dropped = gs.saved_activation_bytes(m, lambda: m(x).sum().item())  # the graph is discarded
    assert dropped.total == 0


# ---------------------------------------------------------------------------- RSO
def test_one_inner_sgd_step_from_zero_is_the_projected_gradient_step():
    model = linear_model(n=20, m=7, bias=False)
    w0 = model[0].weight.detach().clone()
    lr = 0.3
    opt = gs.rso(model, rank=5, inner_steps=1, lr=lr, inner="sgd", seed=8)
    x = torch.randn(9, 20, dtype=torch.float64)
    dy = torch.randn(9, 7, dtype=torch.float64)
    model(x).backward(dy)
    p = model[0].projection_matrix()
    g = plain_grads(w0, None, x, dy)[2]
    opt.step()  # K = 1: the inner step, then the merge W <- W + B P^T
    torch.testing.assert_close(model[0].weight.detach(), w0 - lr * g @ p @ p.T, rtol=1e-13, atol=1e-13)
    assert opt.outer_step == 1 and opt.inner_step == 0 and not model[0].B.any()
    assert gs.current_step(model) == 1


def test_rso_inner_steps_then_merge_with_weight_decay_and_proximal_term():
    model = linear_model(n=16, m=6, bias=True)
    w0 = model[0].weight.detach().clone()
    lr, wd, mu = 0.1, 0.5, 0.7
    opt = gs.rso(model, rank=4, inner_steps=2, lr=lr, weight_decay=wd, mu=mu, inner="sgd")
    x = torch.randn(5, 16, dtype=torch.float64)
    model(x).sum().backward()
    p = model[0].projection_matrix()
    b1 = -lr * model[0].B.grad.clone()
    opt.step()
    opt.zero_grad()
    torch.testing.assert_close(model[0].B.detach(), b1)
    torch.testing.assert_close(model[0].weight.detach(), w0)  # frozen until the merge
    model(x).sum().backward()
    b2 = b1 - lr * (model[0].B.grad + mu * b1)
    opt.step()
    c = (1 - lr * wd) ** 2
    torch.testing.assert_close(model[0].weight.detach(), c * w0 + b2 @ p.T)
    with pytest.raises(ValueError, match="RSO advances"):
        gs.next_step(model)


def test_unsketch_restores_plain_layers_and_merges_b():
    model = linear_model(n=16, m=6, bias=True)
    lin = model[0]
    keys = set(model.state_dict())
    gs.rso(model, rank=4, inner_steps=100, lr=0.05)
    x = torch.randn(5, 16, dtype=torch.float64)
    model(x).sum().backward()
    torch.optim.SGD([model[0].B], lr=0.1).step()  # a pending B
    assert model[0].B.any()
    with torch.no_grad():
        y = model(x)
    gs.unsketch(model)
    assert type(model[0]) is nn.Linear and model[0].weight is lin.weight and model[0].bias is lin.bias
    assert model[0].weight.requires_grad and set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-13, atol=1e-13)
    gs.sketch(model, rank=4)  # and it can be sketched again
    gs.unsketch(model)
    assert type(model[0]) is nn.Linear


def test_rso_state_dict_is_weights_only_loadable():
    model = linear_model(n=16, m=6)
    opt = gs.rso(model, rank=4, inner_steps=3)
    model(torch.randn(3, 16, dtype=torch.float64)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["inner_step"] == 1
    assert "0.B" in ckpt["model"] and "0._extra_state" in ckpt["model"]


# ---------------------------------------------------------------------------- errors
def test_bad_ranks_name_the_layer_and_the_fix():
    for rank, match in ((0, "rank=0 must be >= 1"), (24, "rank=24 must be < in_features=24"),
                        (30, "lower the rank"), (2.5, "fraction"), ("8", "integer")):
        with pytest.raises(ValueError, match=match) as err:
            gs.sketch(linear_model(n=24), rank=rank)
        assert "0:" in str(err.value) or "'0'" in str(err.value) or str(err.value).startswith("0")
    model = Llama(config("nano", vocab_size=64))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj: rank=64 must be < in_features=64"):
        gs.sketch(model, rank=64)
    assert not gs.sketched_layers(model)  # nothing was swapped


def test_non_linear_targets_and_unknown_settings_are_clear_errors():
    model = Llama(config("nano", vocab_size=64))
    with pytest.raises(ValueError, match=r"input_layernorm \(RMSNorm\), which is not an nn.Linear"):
        gs.sketch(model, rank=4, targets=["layers.0.input_layernorm"])
    with pytest.raises(ValueError, match=r"embed_tokens \(Embedding\)"):
        gs.sketch(model, rank=4, targets="embed_tokens")
    with pytest.raises(ValueError, match="matches no module"):
        gs.sketch(model, rank=4, targets=["nonexistent_proj"])
    with pytest.raises(ValueError, match="unknown sketch law 'orthogonal'"):
        gs.sketch(model, rank=4, law="orthogonal")
    with pytest.raises(ValueError, match="unknown sketch mode 'lora'"):
        gs.sketch(model, rank=4, mode="lora")
    gs.sketch(model, rank=4, targets=["q_proj", r"layers\.1\.mlp\..*"])
    assert [n for n, _ in gs.sketched_layers(model)] == [
        "layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj",
        "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="already sketched"):
        gs.sketch(model, rank=4)
    with pytest.raises(ValueError, match="mode='rso'"):
        gs.RSO(model)


def test_checkpoint_with_other_settings_is_refused():
    a = gs.sketch(linear_model(), rank=6)
    b = gs.sketch(linear_model(), rank=4)
    with pytest.raises(ValueError, match="rank=6 .*this model: 4"):
        b.load_state_dict(a.state_dict())
    c = gs.sketch(linear_model(), rank=6, law="gaussian")
    with pytest.raises(ValueError, match="law='haar'"):
        c.load_state_dict(a.state_dict())
