"""Compressed bases (the group option ``basis_dtype``, grassopt.bases): the error of a stored basis as
principal angles to the float32 one, re-orthonormalisation at basis updates, training, resume, the load
check and the bytes against the live state."""

import math

import pytest
import torch

import grassopt
from grassopt.bases import layout, load, principal_angles, store
from grassopt.linalg import haar, largest_angle, orthonormality_error, reorthonormalize
from grassopt.memory import state_breakdown
from resume import assert_resumes_bit_identically
from toy import toy_data, toy_model, toy_train

#: the largest principal angle to the float32 basis (degrees) each format must stay under: measured 0.12
#: (bf16), 0.55-0.70 (int8) and 10-12.6 (int4) from 255 x 32 to 4096 x 1024 (benchmarks/low_bit.md)
BOUND_DEG = {"bfloat16": 0.2, "int8": 1.0, "int4": 15.0}
BYTES = {"bfloat16": lambda d, r: 2 * d * r, "int8": lambda d, r: d * r + 4 * r, "int4": lambda d, r: (d + 1) // 2 * r + 4 * r}


def test_principal_angles_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    a = haar(40, 5, g, "cpu", torch.float64)
    theta = torch.tensor([1e-4, 0.01, 0.3, 0.9, 1.4], dtype=torch.float64)
    perp = torch.linalg.qr(torch.randn(40, 5, generator=g, dtype=torch.float64) - a @ (a.mT @ torch.randn(
        40, 5, generator=g, dtype=torch.float64))).Q
    perp = torch.linalg.qr(perp - a @ (a.mT @ perp)).Q
    b = a * theta.cos() + perp * theta.sin()  # column j turned by theta_j towards a direction outside span(a)
    assert torch.allclose(principal_angles(a, 3 * b), theta, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("basis_dtype", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("shape", [(255, 32), (1024, 128)])
def test_a_stored_basis_is_within_its_bound_and_reorthonormalises_to_the_same_span(basis_dtype, shape):
    q = haar(*shape, torch.Generator().manual_seed(1), "cpu")
    st: dict = {}
    store(st, q, basis_dtype)
    assert {k: (v.dtype, tuple(v.shape)) if torch.is_tensor(v) else (type(v), None) for k, v in st.items()} == \
        layout(basis_dtype, *shape)
    assert sum(v.nbytes for v in st.values() if torch.is_tensor(v)) == BYTES[basis_dtype](*shape)
    dec = load(st)
    angles = principal_angles(q, dec)
    assert 0 < math.degrees(angles.max()) < BOUND_DEG[basis_dtype]
    fixed = reorthonormalize(dec, tol=0.0)
    assert orthonormality_error(fixed) < 1e-5 < orthonormality_error(dec)
    assert torch.allclose(principal_angles(q, fixed), angles, atol=1e-5)  # the same span
    assert abs(float(largest_angle(q, fixed)) - float(angles.max())) < 1e-4


@pytest.mark.parametrize("preset", ["galore", "subtrack++", "grassjump"])
def test_compressed_bases_train_like_float32_ones(preset):
    data = toy_data(120)
    final = {}
    for bd in ("float32", "bfloat16", "int8", "int4"):
        model = toy_model()
        opt = grassopt.make_optimizer(model, preset, lr=3e-3, rank=4, update_interval=20, basis_dtype=bd)
        final[bd] = sum(toy_train(model, opt, data)[-20:]) / 20
        st = opt.state[model[0].weight]
        assert st["Q"].dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8,
                                 "int4": torch.uint8}[bd]
    for bd in ("bfloat16", "int8", "int4"):
        assert final[bd] < 1.01 * final["float32"], final  # no worse than float32 by 1% (int4 ends 1% lower on grassjump)


@pytest.mark.parametrize("basis_dtype", ["bfloat16", "int8", "int4"])
def test_compressed_bases_resume_bit_identically_and_refuse_another_format(basis_dtype, tmp_path):
    data = toy_data(14)

    def build(bd=basis_dtype):
        model = toy_model()
        return model, grassopt.make_optimizer(model, "subtrack++", lr=3e-3, rank=4, update_interval=4, seed=1,
                                              basis_dtype=bd)

    ckpt = assert_resumes_bit_identically(build, toy_train, data, 6, tmp_path / "c.pt")
    _, other = build("float32")
    with pytest.raises(ValueError, match=f"basis_dtype={basis_dtype!r} but this one has basis_dtype='float32'"):
        other.load_state_dict(ckpt["opt"])
    with pytest.raises(ValueError, match="basis_dtype='int2' must be one of"):
        grassopt.make_optimizer(toy_model(), "subtrack++", rank=4, basis_dtype="int2")


@pytest.mark.parametrize("preset", ["galore", "subtrack++", "ldadam"])
@pytest.mark.parametrize("basis_dtype", ["bfloat16", "int8", "int4"])
def test_memory_estimate_prices_compressed_bases_as_allocated(preset, basis_dtype, capsys):
    from grassopt.train.estimate import estimate
    from grassopt.train.memory_cli import main
    from grassopt.train.model import Llama, config
    cfg = config("nano", vocab_size=256)
    torch.manual_seed(0)
    model = Llama(cfg)
    opt = grassopt.make_optimizer(model, preset, lr=1e-3, rank=8, basis_dtype=basis_dtype, state_dtype="int8")
    idx = torch.randint(0, 256, (1, 8))
    model(idx, idx)[1].backward()
    opt.step()
    t = estimate(cfg, preset, 8, state_dtype="int8", basis_dtype=basis_dtype).totals()
    live = state_breakdown(opt)
    assert {k: t[k] for k in live} == live
    qs = [(min(p.shape), 8) for g in opt.param_groups if "rank" in g for p in g["params"]]
    by_hand = sum(BYTES[basis_dtype](d, r) for d, r in qs)
    assert live["bases"] == by_hand
    assert main(["nano", "--vocab-size", "256", "--preset", preset, "--rank", "8", "--state-dtype", "int8",
                 "--basis-dtype", basis_dtype, "--json"]) == 0
    assert '"bases": %d' % by_hand in capsys.readouterr().out
