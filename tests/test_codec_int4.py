"""4-bit moments (``state_dtype="int4"``): the maps against a float64 computation of their own definition,
the packing, no V rounded to zero, the chunked load and store, bit-identical resume, bytes by formula
against the live state, training, and what the format costs against int8 on the toy problem."""

import pytest
import torch

import grassopt
from grassopt.codecs import CODECS
from grassopt.codecs import int4
from grassopt.memory import param_state_bytes, state_breakdown
from resume import assert_resumes_bit_identically
from toy import toy_data, toy_model, toy_train


def _blocks64(x):
    n = x.numel()
    return torch.nn.functional.pad(x, (0, -n % 64)).view(-1, 64), n


def test_maps_follow_their_definition_in_float64():
    """M: ``max|M| c|c| / 49`` with ``c = round(7 sign(u) sqrt|u|)``; V: ``max V ((c + 1) / 16)^4`` with
    ``c = clamp(round(16 u^(1/4)) - 1, 0, 15)``, per block of 64 (a partial last block too)."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(200, generator=g) * torch.rand(200, generator=g) ** 3
    v = torch.rand(200, generator=g) ** 6
    b, n = _blocks64(m.double())
    s = b.abs().amax(dim=1, keepdim=True)
    c = torch.round(7 * torch.sign(b) * torch.sqrt(b.abs() / s))
    want_m = (s * c * c.abs() / 49).flatten()[:n]
    codes, scale = int4.encode_signed(m)
    assert codes.max() <= 15 and codes.min() >= 1
    torch.testing.assert_close(int4.decode_signed(codes, scale).double(), want_m, rtol=1e-6, atol=1e-12)
    b, n = _blocks64(v.double())
    s = b.amax(dim=1, keepdim=True)
    c = torch.clamp(torch.round(16 * (b / s) ** 0.25) - 1, 0, 15)
    want_v = (s * ((c + 1) / 16) ** 4).flatten()[:n]
    codes, scale = int4.encode_unsigned(v)
    assert codes.max() <= 15
    got = int4.decode_unsigned(codes, scale)
    torch.testing.assert_close(got.double(), want_v, rtol=1e-6, atol=0)
    # no V decodes to zero in a block with a non-zero maximum: the smallest level is (1/16)^4 of it
    v[5] = 0.0
    codes, scale = int4.encode_unsigned(v)
    assert int4.decode_unsigned(codes, scale)[5] == pytest.approx(scale[0].item() / 16**4, rel=1e-6)
    zero_codes, zero_scale = int4.encode_unsigned(torch.zeros(70))
    assert torch.equal(int4.decode_unsigned(zero_codes, zero_scale), torch.zeros(70))


@pytest.mark.parametrize("n", [1, 63, 64, 129, 1000])
def test_packing_round_trips_and_the_layout_is_half_a_byte_an_element(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = int4._pack(codes)
    assert packed.numel() == -(-n // 2) and torch.equal(int4._unpack(packed, n), codes)
    lay = CODECS["int4"].layout((n,))
    assert lay["exp_avg"] == (torch.uint8, (-(-n // 2),)) and lay["exp_avg_scale"] == (torch.float32, (-(-n // 64),))


def test_chunked_load_and_store_equal_one_pass(monkeypatch):
    codec = CODECS["int4"]
    g = torch.Generator().manual_seed(1)
    m, v = torch.randn(999, generator=g), torch.rand(999, generator=g)
    whole, parts = {}, {}
    for st in (whole, parts):
        codec.init(st, (27, 37), "cpu")
    assert codec.shape(whole) == torch.Size((27, 37))
    codec.store(whole, m, v)
    monkeypatch.setattr(grassopt.codecs._base, "CHUNK", 128)
    for lo, hi in codec.chunks(999):
        codec.store(parts, m[lo:hi], v[lo:hi], lo)
    for k in ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale"):
        assert torch.equal(whole[k], parts[k]), k
    for lo, hi in codec.chunks(999):
        a, b = codec.load(parts, lo, hi)
        c, d = codec.load(whole)
        assert torch.equal(a, c[lo:hi]) and torch.equal(b, d[lo:hi])


@pytest.mark.parametrize("preset", ["adamw", "subtrack++", "apollo"])
def test_resume_bit_identically(preset, tmp_path):
    def build():
        model = toy_model()
        return model, grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=3, seed=3,
                                              state_dtype="int4")

    ckpt = assert_resumes_bit_identically(build, toy_train, toy_data(10), 4, tmp_path / "c.pt")
    assert all(st["exp_avg"].dtype == torch.uint8 and "int4_shape" in st for st in ckpt["opt"]["state"].values())


@pytest.mark.parametrize("preset", ["adamw", "galore", "subtrack++"])
def test_state_bytes_by_formula_equal_the_live_bytes(preset):
    model = toy_model()
    opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=3, state_dtype="int4")
    toy_train(model, opt, toy_data(4))
    want = {"bases": 0, "moments": 0, "other": 0}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in param_state_bytes(p.shape, group, "int4").items():
                want[k] += v
    assert state_breakdown(opt) == want
    int8 = sum(param_state_bytes(p.shape, g, "int8")["moments"] for g in opt.param_groups for p in g["params"])
    assert want["moments"] < 0.6 * int8


def test_trains_and_costs_more_than_int8_on_the_toy_problem():
    """The toy regression learns in int4, and ends within a measured factor of int8 and float32 (subtrack++,
    40 steps): the price of 16 levels, recorded here so that a change to the maps shows."""
    ends = {}
    for fmt in ("float32", "int8", "int4"):
        model = toy_model()
        opt = grassopt.make_optimizer(model, "subtrack++", lr=1e-2, rank=4, update_interval=10, state_dtype=fmt)
        losses = toy_train(model, opt, toy_data(40))
        ends[fmt] = losses[-1]
        assert losses[-1] < 0.5 * losses[0], (fmt, losses[0], losses[-1])
    assert ends["int4"] < 1.5 * ends["float32"], ends
