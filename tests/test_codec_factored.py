"""The moment formats without a full ``V`` or without ``M``: ``factored`` (Adafactor's row and column
statistics of ``V``), ``no-m`` (``betas[0] == 0``: no first moment stored) and their combination
``factored-no-m``. Each against a float64 computation of its own update (plain and projected), the
factored algebra, bit-identical resume, bytes by formula against the live state, training, refusals."""

import math

import pytest
import torch
from torch import nn

import grassopt
from grassopt.codecs import CODECS
from grassopt.memory import param_state_bytes, state_breakdown
from grassopt.train import memory_cli
from resume import assert_resumes_bit_identically
from toy import toy_data, toy_model, toy_train

FORMATS = ["factored", "no-m", "factored-no-m"]
HAS_M = {"factored": True, "no-m": False, "factored-no-m": False}
FACTORED = {"factored": True, "no-m": False, "factored-no-m": True}


def _betas(fmt, b2=0.99):
    return (0.9 if HAS_M[fmt] else 0.0, b2)








class Reference:
    """The format's own Adam in float64, written from the maths (docs/algorithms.md): ``M`` (or ``G``
    when none is kept); ``V`` whole, or for a 2-D moment the EMAs of the row and column sums of
    ``G*G`` and ``V = R C^T / sum(R)`` reconstructed from the updated ones. Returns the direction
    ``M / (sqrt(V) + eps)`` and the step size ``lr sqrt(1 - b2^t) / (1 - b1^t)``."""

    def __init__(self, fmt, shape, lr, betas, eps):
        self.fmt, self.lr, (self.b1, self.b2), self.eps, self.t = fmt, lr, betas, eps, 0
        self.factored = FACTORED[fmt] and len(shape) == 2
        self.M = torch.zeros(shape, dtype=torch.float64)
        if self.factored:
            self.R = torch.zeros(shape[0], dtype=torch.float64)
            self.C = torch.zeros(shape[1], dtype=torch.float64)
        else:
            self.V = torch.zeros(shape, dtype=torch.float64)

    def step(self, G):
        G = G.double()
        self.t += 1
        self.M = self.b1 * self.M + (1 - self.b1) * G if HAS_M[self.fmt] else G
        if self.factored:
            self.R = self.b2 * self.R + (1 - self.b2) * (G * G).sum(dim=1)
            self.C = self.b2 * self.C + (1 - self.b2) * (G * G).sum(dim=0)
            V = self.R[:, None] * self.C[None, :] / self.R.sum()
        else:
            self.V = self.b2 * self.V + (1 - self.b2) * G * G
            V = self.V
        size = self.lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        return self.M / (V.sqrt() + self.eps), size


def test_the_formats_are_registered_codecs():
    for fmt in FORMATS:
        assert fmt in CODECS and fmt in grassopt.functional.STATE_DTYPES


def test_reencoding_the_adam_update_of_the_reconstruction_is_the_factored_ema():
    """``V = R C^T / sum(R)``, Adam's ``V' = b2 V + (1 - b2) G^2``, re-encoded by row and column sums,
    equals the factored EMA ``R' = b2 R + (1 - b2) rowsum(G^2)`` (and ``C'``) - in float64, and through
    the codec's own ``store`` (float32)."""
    g = torch.Generator().manual_seed(0)
    b2 = 0.95
    R = torch.rand(30, generator=g, dtype=torch.float64) * 3
    C = torch.rand(7, generator=g, dtype=torch.float64)
    C = C * R.sum() / C.sum()  # the sums of one V agree
    G = torch.randn(30, 7, generator=g, dtype=torch.float64)
    V2 = b2 * (R[:, None] * C[None, :] / R.sum()) + (1 - b2) * G * G
    torch.testing.assert_close(V2.sum(dim=1), b2 * R + (1 - b2) * (G * G).sum(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(V2.sum(dim=0), b2 * C + (1 - b2) * (G * G).sum(dim=0), rtol=1e-12, atol=0)
    codec, st = CODECS["factored"], {}
    codec.init(st, (30, 7), "cpu")
    st["exp_avg_sq_row"].copy_(R)
    st["exp_avg_sq_col"].copy_(C)
    m, v = codec.load(st)
    torch.testing.assert_close(v.double().view(30, 7), R[:, None] * C[None, :] / R.sum(), rtol=1e-6, atol=0)
    codec.store(st, m, (b2 * v.double() + (1 - b2) * G.flatten() ** 2).float())
    torch.testing.assert_close(st["exp_avg_sq_row"].double(), b2 * R + (1 - b2) * (G * G).sum(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(st["exp_avg_sq_col"].double(), b2 * C + (1 - b2) * (G * G).sum(dim=0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(37, 11), (300,)])
def test_plain_step_follows_its_float64_update(fmt, shape, monkeypatch):
    """Plain parameters (2-D: factored; 1-D: whole V), 5 steps against the float64 reference, with a
    chunk smaller than the tensor (the factored V is read a block of rows at a time)."""
    monkeypatch.setattr(grassopt.codecs._base, "CHUNK", 64)
    g = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.randn(shape, generator=g))
    lr, betas, eps, wd = 1e-2, _betas(fmt), 1e-6, 0.1
    opt = grassopt.SubspaceAdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, state_dtype=fmt)
    ref = Reference(fmt, shape, lr, betas, eps)
    w = p.detach().double().clone()
    for _ in range(5):
        grad = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-2, 1, shape, generator=g)
        p.grad = grad
        opt.step()
        n, size = ref.step(grad)
        w = w - size * n
        w = w - lr * wd * w
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    st = opt.state[p]
    assert ("exp_avg" in st) == HAS_M[fmt]
    assert ("exp_avg_sq_row" in st) == (FACTORED[fmt] and len(shape) == 2)
    if ref.factored:
        torch.testing.assert_close(st["exp_avg_sq_row"].double(), ref.R, rtol=1e-5, atol=0)
        torch.testing.assert_close(st["exp_avg_sq_col"].double(), ref.C, rtol=1e-5, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_projected_step_follows_its_float64_update(fmt, shape):
    """GaLore (SVD basis, no recovery, one basis): the k x r moments in the format, against the float64
    reference of the format's own Adam on R = Q^T X, back-projected."""
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(shape, generator=g) * 0.1
    p = nn.Parameter(w0.clone())
    lr, betas, eps, wd, alpha, rank = 1e-2, _betas(fmt), 1e-6, 0.01, 0.25, 4
    opt = grassopt.SubspaceAdamW([{"params": [p], "rank": rank, "rule": "svd", "transport": "keep",
                                   "recovery": False, "update_interval": 100}],
                                 lr=lr, betas=betas, eps=eps, weight_decay=wd, state_dtype=fmt)
    transposed = shape[0] >= shape[1]
    ref = Reference(fmt, (max(shape), rank), lr, betas, eps)
    w = w0.double().clone()
    for _ in range(4):
        grad = torch.randn(shape, generator=g)
        p.grad = grad
        opt.step()
        Q = opt.basis(p).double()  # d x r
        X = (grad.T if transposed else grad).double()  # d x k
        n, size = ref.step((Q.T @ X).T)  # k x r
        D = alpha * Q @ n.T  # d x k
        w = w - size * (D.T if transposed else D)
        w = w - lr * wd * w
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("preset", ["adamw", "subtrack++", "apollo", "ldadam"])
def test_resume_bit_identically(fmt, preset, tmp_path):
    def build():
        model = toy_model()
        return model, grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=3, seed=3,
                                              betas=_betas(fmt, 0.999), state_dtype=fmt)

    ckpt = assert_resumes_bit_identically(build, toy_train, toy_data(10), 4, tmp_path / "c.pt")
    states = ckpt["opt"]["state"].values()
    assert all(("exp_avg" in st) == HAS_M[fmt] for st in states)
    assert any("exp_avg_sq_row" in st for st in states) == FACTORED[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("preset", ["adamw", "galore", "subtrack++", "apollo", "ldadam"])
def test_state_bytes_by_formula_equal_the_live_bytes(fmt, preset):
    model = toy_model()
    opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=3, betas=_betas(fmt),
                                  state_dtype=fmt)
    toy_train(model, opt, toy_data(4))
    want = {"bases": 0, "moments": 0, "other": 0}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in param_state_bytes(p.shape, group, fmt).items():
                want[k] += v
    assert state_breakdown(opt) == want
    f32 = sum(param_state_bytes(p.shape, g, "float32")["moments"] for g in opt.param_groups for p in g["params"])
    assert want["moments"] < (f32 if HAS_M[fmt] else f32 / 2 + 1)
    if fmt == "no-m":
        assert want["moments"] * 2 == f32


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("preset", ["adamw", "subtrack++"])
def test_trains(fmt, preset):
    model = toy_model()
    opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=10, betas=_betas(fmt, 0.999),
                                  state_dtype=fmt)
    losses = toy_train(model, opt, toy_data(40))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("fmt", ["no-m", "factored-no-m"])
def test_no_m_refuses_a_first_moment(fmt):
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"stores no first moment, so it needs betas\[0\] == 0"):
        grassopt.SubspaceAdamW([p], state_dtype=fmt)
    opt = grassopt.SubspaceAdamW([p], betas=(0.0, 0.999), state_dtype=fmt)
    opt.param_groups[0]["betas"] = (0.9, 0.999)  # changed after construction (a scheduler, a user)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="stores no first moment"):
        opt.step()


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_another_formats_state(fmt):
    model = toy_model()
    opt = grassopt.make_optimizer(model, "subtrack++", lr=1e-2, rank=4, update_interval=10, betas=_betas(fmt),
                                  state_dtype=fmt)
    toy_train(model, opt, toy_data(2))
    other = grassopt.make_optimizer(model, "subtrack++", lr=1e-2, rank=4, update_interval=10)
    with pytest.raises(ValueError, match=f"state_dtype={fmt!r} but this one has state_dtype='float32'|"
                                         f"{fmt} moments but its group has state_dtype='float32'"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("fmt", FORMATS + ["int8"])
def test_memory_cli_prices_the_format(fmt, capsys):
    assert memory_cli.main(["tiny", "--preset", "subtrack++", "--rank", "64", "--state-dtype", fmt,
                            "--param-dtype", "bf16", "--json"]) == 0
    assert '"total"' in capsys.readouterr().out
