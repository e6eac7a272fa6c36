"""Tests of grassopt.sketch: the sketched linear layer, the laws of P, the estimator, RSO, the
saved-activation accounting. The maths is docs/algorithms.md section 5."""

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


def test_rso_on_a_bf16_model_keeps_b_float32_and_merges_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16, bias=False)).to(torch.bfloat16)
    w0 = model[0].weight.detach().float()
    opt = gs.rso(model, rank=8, inner_steps=1, lr=0.05, inner="sgd")
    assert model[0].B.dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    model(x).float().square().sum().backward()
    assert model[0].B.grad.dtype == torch.float32
    b1 = -0.05 * model[0].B.grad
    p = model[0].projection_matrix()
    assert p.dtype == torch.float32
    opt.step()
    torch.testing.assert_close(model[0].weight.float(), (w0 + b1 @ p.T).bfloat16().float())


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
    Summed over entries these give (n+1)/r ||G||^2 and (n/r - 1) ||G||^2 (docs/algorithms.md#sketches).
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
        assert str(err.value).startswith("0: ")  # the layer's name
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


def test_estimator_under_a_subspace_optimizer():
    """Any optimizer runs on top of the estimator: here SubspaceAdamW on the lifted gradients."""
    import grassopt

    model = gs.sketch(Llama(config("nano", vocab_size=64)), rank=0.25)
    opt = grassopt.SubspaceAdamW(grassopt.param_groups(model, "grassjump", rank=4), lr=1e-3)
    q = model.layers[0].self_attn.q_proj
    before = q.weight.detach().clone()
    idx = torch.randint(64, (2, 8))
    model(idx, idx)[1].backward()
    opt.step()
    assert not torch.equal(before, q.weight)


@pytest.mark.slow  # importing transformers takes most of its time
def test_transformers_llama_gets_the_same_sharing():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    idx = torch.randint(64, (2, 8))
    plain = gs.saved_activation_bytes(model, lambda: model(input_ids=idx, labels=idx).loss)
    gs.sketch(model, rank=0.25)
    layer = model.model.layers[0]
    rep = gs.saved_activation_bytes(model, lambda: model(input_ids=idx, labels=idx).loss)
    rep.output.backward()
    assert layer.self_attn.q_proj.group is layer.self_attn.k_proj.group is layer.self_attn.v_proj.group
    assert layer.mlp.gate_proj.group is layer.mlp.up_proj.group
    assert rep.prefixed("model.layers.0") < plain.prefixed("model.layers.0")
    assert layer.self_attn.q_proj.weight.grad is not None
    gs.unsketch(model)
    assert not gs.sketched_layers(model) and type(layer.self_attn.q_proj) is nn.Linear


def test_checkpoint_with_other_settings_is_refused():
    a = gs.sketch(linear_model(), rank=6)
    b = gs.sketch(linear_model(), rank=4)
    with pytest.raises(ValueError, match="rank=6 .*this model: 4"):
        b.load_state_dict(a.state_dict())
    c = gs.sketch(linear_model(), rank=6, law="gaussian")
    with pytest.raises(ValueError, match="law='haar'"):
        c.load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------- data parallel
_DDP_WORKER = r'''
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import grassopt.sketch as gs
from grassopt.train.model import Llama, config

rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
data = torch.Generator().manual_seed(100 + rank)  # every rank sees other data
result = {}


def record(tag, model):
    for name, layer in gs.sketched_layers(model):
        result[f"{tag}.{name}"] = layer.projection_matrix().clone()


torch.manual_seed(rank)  # different initial weights: DDP broadcasts rank 0's
model = gs.sketch(Llama(config("nano", vocab_size=64)), rank=0.25, seed=5)
ddp = DDP(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(3):
    idx = torch.randint(64, (2, 16), generator=data)
    ddp(idx, idx)[1].backward()
    record(f"estimator.P.{step}", model)
    opt.step()
    opt.zero_grad()
    gs.next_step(model)
result.update({f"estimator.W.{k}": v for k, v in model.state_dict().items()})

torch.manual_seed(rank)
model = Llama(config("nano", vocab_size=64))
opt = gs.rso(model, rank=0.25, inner_steps=2, lr=1e-2, seed=5)
ddp = DDP(model)
for step in range(5):  # merges after steps 2 and 4
    idx = torch.randint(64, (2, 16), generator=data)
    ddp(idx, idx)[1].backward()
    record(f"rso.P.{step}", model)
    opt.step()
    opt.zero_grad()
result.update({f"rso.W.{k}": v for k, v in model.state_dict().items()})
torch.save(result, out)
dist.destroy_process_group()
'''


@pytest.mark.distributed
def test_ddp_ranks_draw_identical_projections(tmp_path):
    """Two gloo processes with different data and different initial weights draw the same P at
    every step (no communication), and end with identical weights (estimator and RSO)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), "2", str(port), str(tmp_path / f"{rank}.pt")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"
    r0, r1 = (torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2))
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    q = "layers.0.self_attn.q_proj"
    assert not torch.equal(r0[f"estimator.P.0.{q}"], r0[f"estimator.P.1.{q}"])  # fresh P each step
    assert torch.equal(r0[f"rso.P.0.{q}"], r0[f"rso.P.1.{q}"])  # one P per outer iteration
    assert not torch.equal(r0[f"rso.P.1.{q}"], r0[f"rso.P.2.{q}"])


# ---------------------------------------------------------------------------- training on SOTU
SEQ, BATCH = 64, 8


@pytest.fixture(scope="session")
def sotu_1k(tmp_path_factory):
    from grassopt.train.data import prepare

    # The same cache folder as tests/test_data.py, so the tokenizer trains once per session.
    return prepare(vocab_size=1024, cache_dir=tmp_path_factory.getbasetemp() / "grassopt-cache", progress=False)


def nano(corpus, seed=0):
    torch.manual_seed(seed)
    return Llama(config("nano", vocab_size=corpus.vocab_size, max_seq_len=SEQ))


def val_loss(model, corpus, batches=4):
    from grassopt.train.data import iter_eval_batches

    losses = []
    with torch.no_grad():
        for i, (x, y) in enumerate(iter_eval_batches(corpus.val, BATCH, SEQ)):
            if i == batches:
                break
            losses.append(float(model(x, y)[1]))
    return sum(losses) / len(losses)


def train(model, opt, sampler, steps, sched=None, estimator=False):
    for _ in range(steps):
        x, y = sampler.next()
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if estimator:
            gs.next_step(model)


def test_rso_lowers_the_loss_on_sotu(sotu_1k):
    model = nano(sotu_1k)
    before = val_loss(model, sotu_1k)
    opt = gs.rso(model, rank=0.25, inner_steps=10, lr=3e-3, weight_decay=0.01, seed=0)
    train(model, opt, sotu_1k.sampler(BATCH, SEQ, seed=0), 40)
    after = val_loss(model, sotu_1k)
    assert opt.outer_step == 4
    assert after < before - 0.8, (before, after)


def test_estimator_with_adamw_lowers_the_loss_on_sotu(sotu_1k):
    model = gs.sketch(nano(sotu_1k), rank=0.25, law="haar", seed=0)
    before = val_loss(model, sotu_1k)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gs.attach(model, opt)  # next_step after every opt.step()
    train(model, opt, sotu_1k.sampler(BATCH, SEQ, seed=0), 40)
    assert gs.current_step(model) == 40
    after = val_loss(model, sotu_1k)
    assert after < before - 0.8, (before, after)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rso_resume_mid_outer_iteration_is_bit_identical(sotu_1k):
    def setup():
        model = nano(sotu_1k)
        opt = gs.rso(model, rank=0.25, inner_steps=5, lr=3e-3, weight_decay=0.1, mu=0.01, seed=3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        return model, opt, sched, sotu_1k.sampler(BATCH, SEQ, seed=1)

    model, opt, sched, sampler = setup()
    train(model, opt, sampler, 12, sched)  # merges after steps 5 and 10
    reference = model.state_dict()

    model, opt, sched, sampler = setup()
    train(model, opt, sampler, 7, sched)  # 2 inner steps into the second outer iteration
    assert opt.inner_step == 2 and model.layers[0].mlp.up_proj.B.any()
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                       "sampler": sampler.state_dict()})
    del model, opt, sched, sampler
    model, opt, sched, sampler = setup()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    sampler.load_state_dict(ckpt["sampler"])
    assert opt.outer_step == 1 and gs.current_step(model) == 1
    assert model.layers[0].self_attn.k_proj.group is model.layers[0].self_attn.q_proj.group  # before any forward
    train(model, opt, sampler, 5, sched)
    _assert_same_state(model.state_dict(), reference)


def test_estimator_resume_is_bit_identical(sotu_1k):
    def setup():
        model = gs.sketch(nano(sotu_1k), rank=0.25, law="gaussian", seed=4)
        return model, torch.optim.AdamW(model.parameters(), lr=3e-3), sotu_1k.sampler(BATCH, SEQ, seed=2)

    model, opt, sampler = setup()
    train(model, opt, sampler, 6, estimator=True)
    reference = model.state_dict()
    model, opt, sampler = setup()
    train(model, opt, sampler, 3, estimator=True)
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sampler": sampler.state_dict()})
    model, opt, sampler = setup()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sampler.load_state_dict(ckpt["sampler"])
    assert gs.current_step(model) == 3
    train(model, opt, sampler, 3, estimator=True)
    _assert_same_state(model.state_dict(), reference)
