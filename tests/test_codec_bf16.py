"""The bfloat16 moment codec (``state_dtype="bfloat16"``): M and V stored as bf16, decoded to float32 for
the step, encoded back by rounding to nearest. Its own update against float64, bit-identical resume,
and its bytes by formula against the live state."""

import math

import pytest
import torch
from torch import nn

import grassopt
from grassopt.codecs import CODECS
from grassopt.memory import param_state_bytes, state_breakdown
from reference import ReferenceStep
from resume import assert_resumes_bit_identically
from toy import toy_data, toy_model, toy_train








def test_bf16_is_a_registered_codec():
    assert "bfloat16" in CODECS and "bfloat16" in grassopt.functional.STATE_DTYPES


def test_plain_step_follows_float64_adam_on_the_decoded_moments():
    """Step 2 of a plain parameter: float64 Adam from the bf16 moments stored by step 1; the stored
    moments are then the float64 ones rounded to bf16 (to one bf16 ulp: float32, then bf16)."""
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(300, generator=g))
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.99), 1e-6, 0.1
    opt = grassopt.SubspaceAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, state_dtype="bfloat16")
    for t in (1, 2):
        grad = torch.randn(300, generator=g) * 10.0 ** torch.randint(-3, 1, (300,), generator=g)
        st = opt.state.get(p, {})
        m = st["exp_avg"].double() if st else torch.zeros(300, dtype=torch.float64)
        v = st["exp_avg_sq"].double() if st else torch.zeros(300, dtype=torch.float64)
        w = p.detach().double().clone()
        p.grad = grad
        opt.step()
        m = b1 * m + (1 - b1) * grad.double()
        v = b2 * v + (1 - b2) * grad.double() ** 2
        w = w - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
        w = w - lr * wd * w
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-6, atol=1e-7)
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
        for stored, exact in ((st["exp_avg"], m), (st["exp_avg_sq"], v)):
            ulp = exact.abs() * 2.0**-7
            assert bool(((stored.double() - exact).abs() <= ulp).all())


def test_projected_step_follows_the_float64_reference_on_the_decoded_moments():
    """GaLore (SVD basis, no recovery) with bf16 moments: each step against the float64 reference
    (tests/reference.py) started from the moments the optimizer stored, decoded."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(40, 24, generator=g) * 0.1
    p = nn.Parameter(w0.clone())
    opt = grassopt.SubspaceAdamW([{"params": [p], "rank": 4, "rule": "svd", "transport": "keep",
                                   "recovery": False, "update_interval": 100}],
                                 lr=1e-2, weight_decay=0.01, state_dtype="bfloat16")
    ref = ReferenceStep(w0, 4, lr=1e-2, wd=0.01, recovery=False, transport="keep", update_interval=100)
    for _ in range(3):
        grad = torch.randn(40, 24, generator=g)
        if opt.state.get(p):  # the reference continues from the stored (decoded) moments, r x k
            ref.W = p.detach().double().clone()
            ref.M = opt.state[p]["exp_avg"].double().T.clone()
            ref.V = opt.state[p]["exp_avg_sq"].double().T.clone()
        p.grad = grad
        opt.step()
        want = ref.step(grad, opt.basis(p))
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("preset", ["adamw", "subtrack++", "apollo", "ldadam"])
def test_bf16_moments_resume_bit_identically(preset, tmp_path):
    def build():
        model = toy_model()
        return model, grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=3, seed=3,
                                              state_dtype="bfloat16")

    ckpt = assert_resumes_bit_identically(build, toy_train, toy_data(10), 4, tmp_path / "c.pt")
    assert all(st["exp_avg"].dtype == torch.bfloat16 for st in ckpt["opt"]["state"].values())


@pytest.mark.parametrize("preset", ["adamw", "galore", "subtrack++", "apollo", "ldadam"])
def test_bf16_state_bytes_by_formula_equal_the_live_bytes(preset):
    model = toy_model()
    opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=3, state_dtype="bfloat16")
    toy_train(model, opt, toy_data(4))
    want = {"bases": 0, "moments": 0, "other": 0}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in param_state_bytes(p.shape, group, "bfloat16").items():
                want[k] += v
    assert state_breakdown(opt) == want
    f32 = sum(param_state_bytes(p.shape, g, "float32")["moments"] for g in opt.param_groups for p in g["params"])
    assert want["moments"] * 2 == f32  # half of float32's moments


def test_bf16_state_trains_and_refuses_float32_state():
    model = toy_model()
    opt = grassopt.make_optimizer(model, "subtrack++", lr=1e-2, rank=4, update_interval=10, state_dtype="bfloat16")
    losses = toy_train(model, opt, toy_data(40))
    assert losses[-1] < 0.5 * losses[0]
    other = grassopt.make_optimizer(model, "subtrack++", lr=1e-2, rank=4, update_interval=10)
    with pytest.raises(ValueError, match="bfloat16 moments but its group has state_dtype='float32'"):
        other.load_state_dict(opt.state_dict())
