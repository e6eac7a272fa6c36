"""The one Adam (fused and foreach), int8 moments (grassopt.codecs.int8) and stochastic rounding (grassopt.functional)."""

import math

import pytest
import torch
from torch import nn

import grassopt
from grassopt import SubspaceAdamW
from grassopt import functional as F
from grassopt.codecs import CODECS, _base
from grassopt.codecs import int8 as I8
from grassopt.memory import state_bytes
from reference import ReferenceStep
from resume import assert_resumes_bit_identically
from toy import toy_data, toy_model, toy_train

PROJECTED = [p for p, v in grassopt.PRESETS.items() if v is not None]


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) + 2 * torch.outer(torch.randn(shape[0], generator=g),
                                                             torch.randn(shape[1], generator=g))
            for _ in range(steps)]


def test_fused_kernel_is_available_on_this_device():
    # the dispatch must pick torch's fused kernel for plain float32 tensors here (CPU has it)
    assert F.fused_available([torch.zeros(3), torch.zeros(3)])
    assert not F.fused_available([torch.zeros(3), torch.zeros(3, dtype=torch.float64)])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_adam_matches_float64_galore_convention_with_decay_after(fused):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (5,), (4, 4)]
    ws = [torch.randn(s, generator=g) for s in shapes]
    ps = [w.clone() for w in ws]
    ms = [torch.zeros(s) for s in shapes]
    vs = [torch.zeros(s) for s in shapes]
    lr, b1, b2, eps, wd = 3e-2, 0.8, 0.95, 1e-3, 0.1
    W = [w.double() for w in ws]
    M = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    V = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for t in range(1, 8):
        gs = [torch.randn(s, generator=g) for s in shapes]
        F.adam_(ps, gs, ms, vs, t, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, fused=fused)
        for i, G in enumerate(gs):
            M[i] = b1 * M[i] + (1 - b1) * G.double()
            V[i] = b2 * V[i] + (1 - b2) * G.double() ** 2
            W[i] = W[i] - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * M[i] / (V[i].sqrt() + eps)
            W[i] = W[i] - lr * wd * W[i]  # decay after the update, as galore-torch does
    for p, w, m, mm in zip(ps, W, ms, M):
        assert torch.allclose(p.double(), w, rtol=1e-6, atol=1e-7)
        assert torch.allclose(m.double(), mm, rtol=1e-6, atol=1e-8)


def test_fused_and_foreach_directions_agree_and_match_float64():
    g = torch.Generator().manual_seed(1)
    rs = [torch.randn(30, 6, generator=g) for _ in range(3)]
    out = {}
    for fused in (True, False):
        ms = [torch.zeros_like(r) for r in rs]
        vs = [torch.zeros_like(r) for r in rs]
        for t in range(1, 4):
            n = F.adam_direction_([r * t for r in rs], ms, vs, t, betas=(0.9, 0.999), eps=1e-6, scale=0.25,
                                  fused=fused)
        out[fused] = n
    M = V = 0
    for t in range(1, 4):
        R = rs[0].double() * t
        M = 0.9 * M + 0.1 * R
        V = 0.999 * V + 0.001 * R * R
    ref = 0.25 * M / (V.sqrt() + 1e-6)
    for a, b in zip(out[True], out[False]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    assert torch.allclose(out[True][0].double(), ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("preset", PROJECTED)
def test_every_preset_on_the_foreach_path_matches_the_float64_reference(preset):
    # the fused path is the default and is checked by test_optimizer; this is the other dispatch
    shape, T, rank, lr, wd = (24, 40), 4, 5, 1e-2, 0.05
    w0 = 0.1 * torch.randn(shape)
    p = nn.Parameter(w0.clone())
    opt = SubspaceAdamW([{"params": [p], "rank": rank, "update_interval": T, **grassopt.PRESETS[preset]}],
                        lr=lr, weight_decay=wd, fused=False)
    group = opt.param_groups[0]
    ref = ReferenceStep(w0, rank, lr, wd=wd, alpha=group["alpha"], transport=group["transport"],
                        recovery=group["recovery"], update_interval=group["update_interval"], scaling=group["scaling"],
                        error_feedback=group["error_feedback"])
    for G in _grads(shape, 10):
        p.grad = G
        opt.step()
        assert torch.allclose(p.detach().double(), ref.step(G, opt.basis(p)), atol=2e-6, rtol=1e-5), preset


@pytest.mark.parametrize("preset", ["adamw", "galore", "subtrack++", "apollo"])
def test_fused_and_foreach_optimizers_agree(preset):
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 12), nn.Linear(12, 4))
        opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=3, update_interval=3, seed=1, fused=fused,
                                      weight_decay=0.01)
        for i in range(7):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(i))
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- int8
def _bound_signed(x, s):
    """The documented bound of the signed map: |M' - M| <= max|M| (sqrt|u| / 127 + 1 / (4 127^2))."""
    u = (x / s).abs()
    return s * (u.sqrt() / 127 + 0.25 / 127**2)


def _bound_unsigned(x, s):
    """The documented bound of the map of V (c = 255 u^(1/4)): |V' - V| <= 2 max V (u^(1/4) + 0.5/255)^3 / 255."""
    u = (x / s).clamp(0, 1)
    return 2 * s * (u ** 0.25 + 0.5 / 255) ** 3 / 255


@pytest.mark.parametrize("n", [256 * 5, 1000, 17])  # full blocks, a partial last block, one partial block
def test_int8_round_trip_error_within_the_documented_bound(n):
    g = torch.Generator().manual_seed(n)
    # values over ten orders of magnitude, as Adam's second moment has
    x = torch.randn(n, generator=g) * torch.exp(torch.empty(n).uniform_(-12, 0, generator=g))
    codes = torch.empty(n, dtype=torch.int8)
    scales = torch.empty(math.ceil(n / I8.BLOCK))
    I8.quantize_signed_(codes, scales, x)
    y = I8.dequantize_signed(codes, scales)
    per = scales.repeat_interleave(I8.BLOCK)[:n]
    assert torch.equal(scales, torch.stack([b.abs().max() for b in x.split(I8.BLOCK)]))
    assert bool((y - x).abs().le(_bound_signed(x, per) * (1 + 1e-5)).all())
    assert torch.equal(y.sign() * (y != 0), x.sign() * (y != 0))  # never flips a sign
    v = x.square()
    ucodes = torch.empty(n, dtype=torch.uint8)
    I8.quantize_unsigned_(ucodes, scales, v)
    w = I8.dequantize_unsigned(ucodes, scales)
    per = scales.repeat_interleave(I8.BLOCK)[:n]
    assert bool((w - v).abs().le(_bound_unsigned(v, per) * (1 + 1e-5)).all())
    # the block maximum is exact, so a block that decays uniformly keeps its codes
    assert torch.allclose(torch.stack([b.max() for b in w.split(I8.BLOCK)]), scales, rtol=1e-6)
    I8.quantize_unsigned_(ucodes.clone(), scales, 0.999 * w)
    assert torch.allclose(I8.dequantize_unsigned(ucodes, scales), 0.999 * w, rtol=1e-5)


@pytest.mark.parametrize("code", ["pow4", "log"])
def test_int8_keeps_small_second_moments_nonzero_where_a_linear_code_does_not(code, monkeypatch):
    monkeypatch.setattr(I8, "V_CODE", code)
    v = torch.tensor([1.0] + [1e-8] * 255)  # one large entry in a block of tiny ones
    codes = torch.empty(256, dtype=torch.uint8)
    scales = torch.empty(1)
    I8.quantize_unsigned_(codes, scales, v)
    w = I8.dequantize_unsigned(codes, scales)
    assert float(w[0]) == 1.0 and bool((w[1:] > 0).all())
    # pow4: sqrt(V)'s relative error <= 1/c with c = 255 * 1e-2 = 2.55; log: <= 2^(32/1020) - 1
    bound = 1 / 2.55 if code == "pow4" else 2 ** (32 / 1020) - 1
    assert float((w[1:] / 1e-8).sqrt().sub(1).abs().max()) <= bound
    assert float(torch.round(v[1:] / v.max() * 255).max()) == 0  # a linear 8-bit code would store 0


def test_stochastic_rounding_of_v_is_unbiased(monkeypatch):
    monkeypatch.setattr(I8, "V_ROUNDING", "stochastic")
    v = torch.cat([torch.ones(1), torch.full((255,), 0.3)])
    codes = torch.empty(256, dtype=torch.uint8)
    scales = torch.empty(1)
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(400):
        I8.quantize_unsigned_(codes, scales, v, gen)
        draws.append(I8.dequantize_unsigned(codes, scales)[1:])
    d = torch.stack(draws).double()
    assert len(set(d.flatten().tolist())) == 2  # the two neighbouring levels
    se = d.std() / math.sqrt(d.numel())
    assert abs(float(d.mean()) - 0.3) < 4 * float(se)







def test_int8_chunks_in_reused_work_buffers_equal_fresh_tensors_and_a_float64_step(monkeypatch):
    """The chunked int8 step reuses per-thread work buffers; interleaving two tensors, over several
    chunks and a partial block, must give exactly what fresh tensors give, and follow the float64
    Adam step on the dequantized moments."""
    monkeypatch.setattr(_base, "CHUNK", 4 * I8.BLOCK)
    torch.manual_seed(0)
    shapes = [(37, 61), (5 * I8.BLOCK + 9,)]  # several chunks each, the last block partial
    grads = [[torch.randn(s) * 10.0 ** torch.randint(-4, 0, s) for s in shapes] for _ in range(4)]
    start = [torch.randn(s) * 0.02 for s in shapes]

    def run(reuse):
        if not reuse:
            monkeypatch.setattr(I8, "_scratch", lambda n, device, k: None)
        ps = [p.clone() for p in start]
        sts = [{} for _ in shapes]
        codec = CODECS["int8"]
        for st, s in zip(sts, shapes):
            codec.init(st, s, "cpu")
        for t, gs in enumerate(grads, 1):
            for p, g, st in zip(ps, gs, sts):
                if t == len(grads):  # the last step against float64 Adam (GaLore's eps) on the stored moments
                    m, v = (x.double().clone() for x in codec.load(st))
                    m, v = 0.9 * m + 0.1 * g.double().view(-1), 0.999 * v + 0.001 * g.double().view(-1) ** 2
                    want = p.double().view(-1) - 1e-3 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (v.sqrt() + 1e-8)
                F.adam_tensor_(p, g, st, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, codec=codec)
                if t == len(grads):
                    torch.testing.assert_close(p.double().view(-1), want, rtol=0, atol=1e-7)
        return ps, sts

    ps_a, sts_a = run(True)
    ps_b, sts_b = run(False)
    assert all(torch.equal(a, b) for a, b in zip(ps_a, ps_b))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(sts_a, sts_b) for k in CODECS["int8"].layout((1,)))



@pytest.mark.parametrize("preset", ["adamw", "galore", "subtrack++", "grassjump"])
def test_int8_state_trains_like_float32_and_counts_its_bytes_exactly(preset):
    data = toy_data()
    out = {}
    for dtype in ("float32", "int8"):
        model = toy_model()
        opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=10, state_dtype=dtype)
        out[dtype] = toy_train(model, opt, data)
    f32, i8 = out["float32"], out["int8"]
    assert i8[-1] < 0.5 * i8[0]  # it learns
    assert abs(sum(i8[-5:]) - sum(f32[-5:])) / sum(f32[-5:]) < 0.1
    expected = 0
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
            n = st["exp_avg"].numel()
            expected += 2 * (n + 4 * math.ceil(n / 256))  # the documented formula, by hand
            if "rank" in group:
                d, k = sorted(p.shape)
                assert n == k * group["rank"]
                expected += 4 * d * group["rank"] if "Q" in st else 0
                expected += 4 if "residual_norm" in st else 0
            else:
                assert n == p.numel()
    assert state_bytes(opt) == expected


@pytest.mark.parametrize("preset", ["adamw", "subtrack++", "grasswalk"])
def test_int8_run_resumes_bit_identically(preset, tmp_path):
    data = toy_data(12)

    def build():
        model = toy_model()
        return model, grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=3, seed=3,
                                              state_dtype="int8")

    assert_resumes_bit_identically(build, toy_train, data, 5, tmp_path / "c.pt")


def test_loading_float32_state_into_an_int8_optimizer_is_refused():
    model = toy_model()
    opt = grassopt.make_optimizer(model, "galore", lr=1e-2, rank=4)
    toy_train(model, opt, toy_data(2))
    other = grassopt.make_optimizer(model, "galore", lr=1e-2, rank=4, state_dtype="int8")
    with pytest.raises(ValueError, match="float32 moments but its group has state_dtype='int8'"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="state_dtype='int3' must be one of"):
        SubspaceAdamW(model.parameters(), state_dtype="int3")


# ------------------------------------------------------------------------- stochastic rounding
def test_stochastic_rounding_is_unbiased_and_deterministic_for_a_seed():
    x = torch.tensor([1.0 + 2**-10, -3.0 - 3 * 2**-11, 1e-3 * (1 + 2**-9), 7.0])  # between bf16 neighbours
    n = 20000
    src = x.repeat(n, 1)
    out = torch.empty_like(src, dtype=torch.bfloat16)
    F.stochastic_round_(out, src, torch.Generator().manual_seed(0))
    vals = out.double()
    mean, se = vals.mean(0), vals.std(0) / math.sqrt(n)
    assert bool(((mean - x.double()).abs() <= 4 * se + 1e-12).all()), (mean, x)
    # every draw is one of the two bf16 neighbours of x: x truncated to bf16 (towards zero), or the next
    # bf16 away from zero (one bf16 ulp further, 2^16 in the float32 bit pattern); both occur
    toward = x.view(torch.int32) & -(1 << 16)
    lo, hi = toward.view(torch.float32).double(), (toward + (1 << 16)).view(torch.float32).double()
    assert bool(((vals == lo) | (vals == hi)).all())
    assert bool(((vals == lo).any(0) & (vals == hi).any(0))[:3].all())
    assert torch.equal(vals[:, 3], torch.full((n,), 7.0, dtype=torch.float64))  # representable: exact
    again = torch.empty_like(out)
    F.stochastic_round_(again, src, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    sp = torch.empty(3, dtype=torch.bfloat16)
    F.stochastic_round_(sp, special, torch.Generator().manual_seed(1))
    assert sp[0] == float("inf") and sp[1] == float("-inf") and bool(sp[2].isnan())


def test_bf16_weights_learn_small_updates_only_with_stochastic_rounding():
    # an update of a tenth of a bf16 ulp, 200 times: lost to round-to-nearest, kept in expectation by SR
    results = {}
    for sr in (False, True):
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = SubspaceAdamW([p], lr=2**-7 / 10, betas=(0.0, 0.0), eps=1e-30, stochastic_rounding=sr, seed=0)
        for _ in range(200):
            p.grad = -torch.ones_like(p)  # Adam's normalised step is exactly lr
            opt.step()
        results[sr] = p.float().mean().item()
    expected = 1.0 + 200 * 2**-7 / 10
    assert results[False] == 1.0
    assert abs(results[True] - expected) < 0.01 * (expected - 1)


def test_stochastic_rounding_resumes_bit_identically():
    def run(stop=None, state=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 4)).to(torch.bfloat16)
        opt = grassopt.make_optimizer(model, "grassjump", lr=1e-2, rank=3, update_interval=2, seed=4,
                                      stochastic_rounding=True)
        if state:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        data = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16),) for i in range(8)]
        start = 0 if state is None else state[2]
        for i in range(start, stop or 8):
            opt.zero_grad()
            model(data[i][0]).float().square().mean().backward()
            opt.step()
        return model, opt

    m1, _ = run()
    m2, o2 = run(stop=3)
    m3, _ = run(state=(m2.state_dict(), o2.state_dict(), 3))
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_stochastic_rounding_into_fp16_rounds_to_nearest_and_says_so_once(monkeypatch):
    monkeypatch.setattr(F, "_FP16_WARNED", False)
    src = torch.tensor([1.0 + 2**-12, -3.0])
    dst = torch.empty(2, dtype=torch.float16)
    with pytest.warns(UserWarning, match="rounded to nearest"):
        F.stochastic_round_(dst, src, torch.Generator().manual_seed(0))
    assert torch.equal(dst, src.to(torch.float16))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.stochastic_round_(dst, src, torch.Generator().manual_seed(0))  # once only


def test_the_int8_code_map_is_saved_with_the_state_and_read_back_from_it(monkeypatch):
    """A state records the code that wrote it; changing the default later does not change how it reads."""
    model = toy_model()
    monkeypatch.setattr(I8, "V_CODE", "log")
    opt = grassopt.make_optimizer(model, "subtrack++", lr=1e-2, rank=4, update_interval=3, state_dtype="int8")
    toy_train(model, opt, toy_data(4))
    sd = opt.state_dict()
    assert {st["int8_code"] for st in sd["state"].values()} == {"log/nearest"}
    monkeypatch.setattr(I8, "V_CODE", "pow4")
    st = next(iter(opt.state.values()))
    m, v = CODECS["int8"].load(st)
    want = I8.dequantize_unsigned(st["exp_avg_sq"].view(-1), st["exp_avg_sq_scale"], code="log")
    assert torch.equal(v, want)
    bad = {**sd, "state": {k: {**s, "int8_code": "cube/nearest"} for k, s in sd["state"].items()}}
    with pytest.raises(ValueError, match="int8_code='cube/nearest' is not an int8 code map"):
        opt.load_state_dict(bad)
