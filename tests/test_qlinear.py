"""int8 weights that learn (grassopt.qlinear): the grid and its rounding (unbiased, seeded), the products
against float64, the optimizer's write-back (stochastic rounding keeps updates below half a grid step,
rounding to nearest loses them), bit-identical resume, layer-wise updates and activation checkpointing,
a real training run, and the errors."""

import math

import pytest
import torch
from torch import nn

import grassopt
from grassopt.qlinear import QMAX, Int8Linear, dequantize, int8_module, quantize_, quantize_linears, round_to_grid
from resume import assert_resumes_bit_identically
from toy import toy_data, toy_model, toy_train


def _block_with_known_scale(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, float]:
    """A block whose first entry is its max |w| = 127 s (s = 2^-7, exact), the others anywhere inside."""
    g = torch.Generator().manual_seed(seed)
    s = 2.0 ** -7
    w = (torch.rand(n, generator=g) * 2 - 1) * 0.99 * QMAX * s
    w[0] = QMAX * s
    return w, s


def test_grid_to_nearest_equals_a_float64_reference():
    w, s = _block_with_known_scale()
    w = torch.cat([w, 3 * w[:100]])  # a second, partial block (100 elements) with its own scale
    codes, scales = torch.empty(356, dtype=torch.int8), torch.empty(2)
    quantize_(codes, scales, w, 256)
    ref_scales = [w[:256].double().abs().max() / QMAX, w[256:].double().abs().max() / QMAX]
    assert torch.allclose(scales.double(), torch.stack(ref_scales), rtol=1e-7, atol=0)
    ref = torch.cat([torch.round(w[:256].double() / ref_scales[0]), torch.round(w[256:].double() / ref_scales[1])])
    assert torch.equal(codes.double(), ref)  # (no value lies within float rounding of a half step here)
    deq = dequantize(codes, scales, 256)
    assert (deq - w).abs().max() <= 3 * s / 2 * (1 + 1e-6)  # half a step of the coarser block
    assert deq[0] == w[0] and deq[256 + 0] == w[256]  # each block's max is exact


def test_stochastic_rounding_is_unbiased_against_its_standard_error_and_seeded():
    w, s = _block_with_known_scale()
    k = 4000
    g = torch.Generator().manual_seed(1)
    total = torch.zeros(256, dtype=torch.float64)
    codes, scales = torch.empty(256, dtype=torch.int8), torch.empty(1)
    for _ in range(k):
        quantize_(codes, scales, w, 256, generator=g)
        assert scales.item() == s
        total += codes.double()
    u = w.double() / s
    frac = u - u.floor()
    se = (frac * (1 - frac)).sqrt() / math.sqrt(k)  # per element, exactly from the rounding's law
    z = (total / k - u)[se > 0] / se[se > 0]
    assert z.abs().max() < 5.0, z.abs().max()  # 255 elements, each within 5 standard errors
    assert abs(float(z.mean())) * math.sqrt(z.numel()) < 4.0  # and their mean within 4 of its own
    # nearest rounding is biased by up to half a step; stochastic rounding's mean is not
    assert (torch.round(u) - u).abs().max() > 0.4 and (total / k - u).abs().max() < 0.05
    # deterministic for a seed, different for another
    a, b, c = (torch.empty(256, dtype=torch.int8) for _ in range(3))
    for out, seed in ((a, 7), (b, 7), (c, 8)):
        quantize_(out, torch.empty(1), w, 256, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_round_to_grid_probability_is_the_remainder():
    u = torch.full((200_000,), 2.3)
    up = round_to_grid(u.clone(), torch.Generator().manual_seed(0)) == 3.0
    p = up.double().mean().item()
    assert abs(p - 0.3) < 5 * math.sqrt(0.3 * 0.7 / u.numel())
    assert torch.equal(round_to_grid(torch.tensor([2.5, -2.5, 2.51]), None), torch.tensor([2.0, -2.0, 3.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_match_float64_and_save_no_full_precision_weight(dtype):
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(70, 33), block=64).to(dtype)  # 2310 elements: a partial last block
    x = torch.randn(4, 5, 70, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not any(t.is_floating_point() and t.shape == (33, 70) for t in saved)  # x, codes, scales only
    gy = torch.randn_like(y)
    y.backward(gy)
    w64 = dequantize(q.codes.view(-1), q.scales, 64).double().view(33, 70)
    x64, gy64 = x.detach().double(), gy.double()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    ref_y = x64 @ w64.mT + q.bias.detach().double()
    assert torch.allclose(y.double(), ref_y, **tol)
    assert torch.allclose(x.grad.double(), gy64 @ w64, **tol)
    ref_gw = gy64.reshape(-1, 33).mT @ x64.reshape(-1, 70)
    assert q.weight.grad.shape == (33, 70) and q.weight.grad.dtype == dtype
    assert torch.allclose(q.weight.grad.double(), ref_gw, **tol)
    assert torch.allclose(q.bias.grad.double(), gy64.reshape(-1, 33).sum(0), **tol)
    assert q.weight.untyped_storage().nbytes() == dtype.itemsize and q.scales.dtype == torch.float32


def _int8_toy(block=16):
    model = toy_model()
    quantize_linears(model, targets=["0", "2", "4"], block=block)
    return model


@pytest.mark.parametrize("preset", ["adamw", "subtrack++"])
def test_updates_below_half_a_step_survive_stochastic_rounding_only(preset):
    """A small learning rate (1e-4): every update is below half a grid step. To nearest, no code moves; with
    stochastic rounding the weights move, and on average by the float32 update."""
    data = toy_data(1)
    moved = {}
    for sr in (False, True):
        model = _int8_toy()
        ref = toy_model()  # the same weights, float32, rounded to the same grid
        with torch.no_grad():
            for a, b in zip(ref, model):
                if isinstance(b, Int8Linear):
                    a.weight.copy_(b.dequantized())
        before = [m.read().clone() for m in model if isinstance(m, Int8Linear)]
        codes = [m.codes.clone() for m in model if isinstance(m, Int8Linear)]
        opt = grassopt.make_optimizer(model, preset, lr=1e-4, rank=4, stochastic_rounding=sr, weight_decay=0.0)
        ref_opt = grassopt.make_optimizer(ref, preset, lr=1e-4, rank=4, weight_decay=0.0)
        toy_train(model, opt, data)
        toy_train(ref, ref_opt, data)
        after = [m.read() for m in model if isinstance(m, Int8Linear)]
        want = [(a.weight.detach().reshape(-1) - w0) for a, w0 in zip((m for m in ref if isinstance(m, nn.Linear)),
                                                                       before)]
        got = [w1 - w0 for w0, w1 in zip(before, after)]
        # (a block's scale follows its max |w|, so its values move a little even where no code does)
        moved[sr] = sum(int((c != m.codes).sum()) for c, m in zip(codes, (m for m in model if isinstance(m, Int8Linear))))
        if sr:  # unbiased: the sum of (got - want) within 5 standard errors
            err = sum(float((g - w).sum()) for g, w in zip(got, want))
            var = 0.0  # each element: s' Bernoulli(p) on the new grid s' (its block's new max / 127), p = frac(w / s')
            for m, w0, w in zip((m for m in model if isinstance(m, Int8Linear)), before, want):
                s_new = m.scales.double().repeat_interleave(16)[:m.codes.numel()]
                u = (w0 + w).double() / s_new
                p = u - u.floor()
                var += float((s_new.square() * p * (1 - p)).sum())
            assert 0 < abs(err) < 5 * math.sqrt(var), (err, var)
    assert moved[False] == 0 and moved[True] > 0


@pytest.mark.parametrize("preset", ["subtrack++", "adamw", "apollo-mini"])
def test_int8_weights_resume_bit_identically(preset, tmp_path):
    data = toy_data(12)

    def build():
        model = _int8_toy()
        return model, grassopt.make_optimizer(model, preset, lr=3e-3, rank=4, update_interval=5, seed=3,
                                              stochastic_rounding=True, state_dtype="int8")

    ckpt = assert_resumes_bit_identically(build, toy_train, data, 7, tmp_path / "ckpt.pt")
    assert {"0.codes", "0.scales"} <= set(ckpt["model"]) and "0.weight" not in ckpt["model"]
    m1, o1 = build()
    m2, o2 = build()
    toy_train(m1, o1, data)
    toy_train(m2, o2, data)
    assert torch.equal(m1[0].codes, m2[0].codes)  # parameters are placeholders: compare the codes too
    m3 = _int8_toy()
    m3.load_state_dict(m1.state_dict())
    assert torch.equal(m3[2].codes, m1[2].codes) and torch.equal(m3[2].scales, m1[2].scales)


def test_layerwise_and_activation_checkpointing_give_the_same_codes():
    from grassopt.layerwise import LayerwiseUpdater
    from grassopt.train.model import Llama, config
    idx = torch.randint(0, 256, (3, 2, 17), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, kw in (("plain", {}), ("layerwise", {}), ("checkpointed", {"checkpoint_activations": True})):
        torch.manual_seed(0)
        model = quantize_linears(Llama(config("nano", vocab_size=256, **kw))).to(torch.bfloat16)
        opt = grassopt.make_optimizer(model, "subtrack++", lr=3e-3, rank=8, update_interval=2,
                                      stochastic_rounding=True)
        lw = LayerwiseUpdater(opt) if name == "layerwise" else None
        for b in idx:
            model(b[:, :-1], b[:, 1:])[1].backward()
            if lw is None:
                opt.step()
                opt.zero_grad()
        out[name] = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("codes") for k in out["plain"])
    for name in ("layerwise", "checkpointed"):
        for k, v in out["plain"].items():
            assert torch.equal(v, out[name][k]), (name, k)


def test_a_real_run_learns_and_the_cli_knows_int8(tmp_path, sotu_1k):
    from grassopt.train.cli import config_from_args, parser
    from grassopt.train.loop import TrainConfig, train
    c = config_from_args(parser().parse_args(["--param-dtype", "int8", "--stochastic-rounding"]))
    assert c.param_dtype == "int8" and c.stochastic_rounding
    cfg = TrainConfig(model="nano", vocab_size=1024, seq_len=64, batch_size=4, steps=40, lr=3e-3, rank=16, eval_tokens=4096,
                      update_interval=7, eval_every=1000, log_every=5, progress=False, plot=False, threads=1,
                      out=str(tmp_path / "run"), param_dtype="int8-fp32", stochastic_rounding=True, layerwise=True,
                      clip_mode="per-parameter", checkpoint_activations=True)
    s = train(cfg, dataset=sotu_1k)
    import json
    hist = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert hist[-1] < hist[0] - 0.5, hist
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert state["layers.0.mlp.up_proj.codes"].dtype == torch.int8 and "layers.0.mlp.up_proj.weight" not in state
    assert state["embed_tokens.weight"].dtype == torch.float32  # int8-fp32: float32 around the int8 weights
    assert s["final_eval_loss"] < 6.5  # ln(1024) = 6.93 at init


def test_mistakes_give_one_line_errors(tmp_path):
    from grassopt.train.loop import TrainConfig
    with pytest.raises(ValueError, match="block=100 must be a power of two"):
        Int8Linear(8, 8, block=100)
    q = Int8Linear(8, 8)
    with pytest.raises(RuntimeError, match="full-precision weight cannot load into an int8 layer"):
        q.load_state_dict(nn.Linear(8, 8).state_dict())
    with pytest.raises(ValueError, match="must start at a multiple of block=256"):
        Int8Linear(16, 32).write_(torch.zeros(10), lo=3)
    for kw, msg in (({"preset": "adamw-torch"}, "'adamw-torch' cannot"), ({"sketch": "haar"}, "drop --sketch"),
                    ({"bf16": True}, "drop --bf16"), ({"param_dtype": "int4"}, "param_dtype='int4' must be one of")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**{"param_dtype": "int8", "out": str(tmp_path / "r"), **kw}).validate()
    assert int8_module(q.weight) is q and int8_module(q.bias) is None


@pytest.mark.parametrize("param_dtype", ["int8", "int8-fp32"])
def test_an_int8_training_run_resumes_bit_for_bit(param_dtype, tmp_path, sotu_1k):
    """grassopt train, stopped after 5 steps and resumed: the same codes, scales and bf16 (or float32) rest as
    an uninterrupted run (the checkpoint holds the codes and the optimizer's rounding generators)."""
    from grassopt.train.loop import TrainConfig, train
    kw = dict(model="nano", vocab_size=1024, seq_len=32, batch_size=2, steps=10, lr=3e-3, rank=8, update_interval=3,
              eval_every=1000, eval_tokens=256, log_every=1, progress=False, plot=False, threads=1, param_dtype=param_dtype,
              stochastic_rounding=True, options={"basis_dtype": "int8"}, state_dtype="int8")
    train(TrainConfig(out=str(tmp_path / "full"), **kw), dataset=sotu_1k)
    first = train(TrainConfig(out=str(tmp_path / "part"), stop_after=5, **kw), dataset=sotu_1k)
    assert first["steps"] == 5 and not first["finished"]
    train(TrainConfig(out=str(tmp_path / "part"), resume=True, **kw), dataset=sotu_1k)
    ckpt = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    dtypes = {k: v.dtype for st in ckpt["optimizer"]["state"].values() for k, v in st.items() if k in ("Q", "exp_avg")}
    assert dtypes == {"Q": torch.int8, "exp_avg": torch.int8}  # --opt basis_dtype=int8 and --state-dtype int8 reached it
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("full", "part"))
    assert a.keys() == b.keys() and "layers.1.self_attn.q_proj.codes" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("preset", list(grassopt.PRESETS))
def test_every_preset_trains_int8_weights(preset):
    """Every preset steps int8 weights (projected and, for adamw or too small a rank, plain), and learns."""
    data = toy_data(40)
    model = _int8_toy()
    codes = [m.codes.clone() for m in model if isinstance(m, Int8Linear)]
    rank = None if preset in ("apollo", "apollo-mini") else 4
    opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=rank, update_interval=10, stochastic_rounding=True)
    losses = toy_train(model, opt, data)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], (losses[0], losses[-5:])
    assert all(not torch.equal(c, m.codes) for c, m in zip(codes, (m for m in model if isinstance(m, Int8Linear))))


def test_write_in_chunks_equals_one_pass():
    """write_ requantizes 2^20 elements at a time; the codes, scales and random stream are those of one pass."""
    w = torch.randn(2 * (1 << 20) + 300, generator=torch.Generator().manual_seed(0))
    m = Int8Linear(w.numel(), 1, bias=False)
    m.write_(w, generator=torch.Generator().manual_seed(4))
    codes, scales = torch.empty(w.numel(), dtype=torch.int8), torch.empty(math.ceil(w.numel() / 256))
    quantize_(codes, scales, w, 256, torch.Generator().manual_seed(4))
    assert torch.equal(codes, m.codes.view(-1)) and torch.equal(scales, m.scales)
