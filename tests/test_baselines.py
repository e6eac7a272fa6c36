"""APOLLO, APOLLO-Mini and LDAdam as configurations of SubspaceAdamW (docs/algorithms.md#apollo).

The step maths of every preset is checked against the float64 reference in test_optimizer.py; here:
the ``gaussian`` rule, the validation of the new components, ``"d/4"`` ranks, the reference
package ``apollo-torch`` (same projection: equal updates; own seeds: equal update norms; the same
loss curve on a nano SOTU run), and LDAdam's one full-size buffer.
"""

import math
import warnings

import pytest
import torch
from torch import nn

import grassopt
from grassopt import SubspaceAdamW
from grassopt.presets import default_rank
from grassopt.targets import resolve_rank, select_targets

NEW = ["apollo", "apollo-mini", "ldadam"]


def structured_grads(shape, steps, seed=0):
    """Gradients with a dominant rank-1 part and a scale that changes (so the limiter acts)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) + 3 * torch.outer(torch.randn(shape[0], generator=g),
                                                               torch.randn(shape[1], generator=g)))
            * (1 + 0.5 * math.sin(t)) for t in range(steps)]


# ---------------------------------------------------------------------------- the gaussian rule
def test_gaussian_basis_is_regenerated_from_a_stored_seed_and_never_stored():
    p = nn.Parameter(torch.zeros(96, 200))
    opt = SubspaceAdamW([{"params": [p], "rank": 24, "update_interval": 3, **grassopt.PRESETS["apollo"]}],
                        lr=1e-3, seed=5)
    bases, seeds = [], []
    for G in structured_grads(p.shape, 7):
        p.grad = G
        opt.step()
        st = opt.state[p]
        assert "Q" not in st and isinstance(st["seed"], int)
        bases.append(opt.basis(p))
        seeds.append(st["seed"])
    # a new draw exactly at the basis updates (steps 3 and 6), the same one in between
    assert [torch.equal(a, b) for a, b in zip(bases, bases[1:])] == [True, True, False, True, True, False]
    assert len(set(seeds)) == 3
    q = bases[0]
    assert q.shape == (96, 24) and q.dtype == torch.float32
    # entries N(0, 1/r): not orthonormal, E[Q^T Q] = (d / r) I
    assert abs(q.mean().item()) < 0.02 and q.var().item() == pytest.approx(1 / 24, rel=0.1)
    assert (q.mT @ q).diagonal().mean().item() == pytest.approx(96 / 24, rel=0.1)
    # the seed depends on the optimizer's seed and the parameter index, never on the global RNG
    p2 = nn.Parameter(torch.zeros(96, 200))
    other = SubspaceAdamW([{"params": [p2], "rank": 24, **grassopt.PRESETS["apollo"]}], lr=1e-3, seed=6)
    p2.grad = torch.ones(96, 200)
    other.step()
    assert not torch.equal(other.basis(p2), bases[0])


@pytest.mark.parametrize("group, match", [
    ({"rule": "gaussian", "transport": "rotate", "recovery": False}, r"transport='rotate'.*projector"),
    ({"rule": "gaussian", "transport": "keep", "recovery": True}, r"recovery=True.*projector"),
    ({"rule": "gaussian", "transport": "keep", "recovery": False, "error_feedback": True},
     r"error_feedback=True.*projector"),
    ({"rule": "svd", "recovery": True, "scaling": "channel"}, r"scaling='channel'.*set recovery=False"),
    ({"rule": "svd", "recovery": False, "scaling": "channel", "error_feedback": True}, r"set error_feedback=False"),
    ({"rule": "svd", "recovery": False, "scaling": "row"}, r"scaling='row' must be None, 'channel' or 'tensor'"),
    ({"rule": "power", "error_feedback": 1}, r"error_feedback=1 must be True or False"),
])
def test_new_components_refuse_combinations_that_make_no_sense(group, match):
    w = nn.Parameter(torch.randn(20, 30))
    with pytest.raises(ValueError, match=match):
        SubspaceAdamW([{"params": [("w", w)], "rank": 4, **group}])


# ---------------------------------------------------------------------------- ranks "d/N"
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 32)   # d = 32 -> d/4 = 8
        self.b = nn.Linear(32, 128)  # d = 32 -> 8
        self.c = nn.Linear(128, 16)  # d = 16 -> 4
        self.lm_head = nn.Linear(16, 10)

    def forward(self, x):
        return self.lm_head(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def test_apollo_default_rank_is_a_quarter_of_each_short_side_in_plain_groups(tmp_path):
    groups = grassopt.param_groups(Net(), "apollo")
    ranks = {n: g["rank"] for g in groups if "rank" in g for n, _ in g["params"]}
    assert ranks == {"a.weight": 8, "b.weight": 8, "c.weight": 4}
    assert all(isinstance(g.get("rank", 0), int) for g in groups)
    assert {n: g["rank"] for g in grassopt.param_groups(Net(), "apollo-mini") if "rank" in g
            for n, _ in g["params"]} == {"a.weight": 1, "b.weight": 1, "c.weight": 1}
    assert {g["rank"] for g in grassopt.param_groups(Net(), "galore", rank="d/8") if "rank" in g} == {4, 2}
    assert {g["rank"] for g in grassopt.param_groups(Net(), "apollo", rank=3) if "rank" in g} == {3}
    assert resolve_rank("d/4", (3, 100)) == 1 and resolve_rank(" d / 2 ", (10, 7)) == 3
    for bad in ("d/0", "n/4", "quarter", 0, 2.5):
        with pytest.raises(ValueError, match="rank="):
            grassopt.param_groups(Net(), "apollo", rank=bad)
    # the state dict holds plain ints and resumes (several projected groups)
    model = Net()
    opt = grassopt.make_optimizer(model, "apollo", lr=1e-2)
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert sorted(g["rank"] for g in sd["param_groups"] if "rank" in g) == [4, 8]
    again = grassopt.make_optimizer(model, "apollo", lr=1e-2)
    again.load_state_dict(sd)
    assert again.state_dict()["state"].keys() == sd["state"].keys()


# ---------------------------------------------------------------------------- apollo-torch
apollo_torch = pytest.importorskip("apollo_torch", reason="install the bench extra: pip install -e .[bench]")


def _ref(param, preset, rank, T, lr, wd=0.0):
    s = grassopt.PRESETS[preset]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apollo_torch.APOLLOAdamW(
            [{"params": [param], "rank": rank, "proj": "random", "scale_type": s["scaling"], "update_proj_gap": T,
              "scale": s["alpha"] ** 2, "proj_type": "std"}], lr=lr, weight_decay=wd)


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
@pytest.mark.parametrize("shape", [(48, 120), (120, 48)], ids=["m<n", "m>n"])
def test_apollo_equals_apollo_torch_when_both_use_the_same_projection(preset, shape, monkeypatch):
    """With apollo-torch's random matrix replaced by ours, every update agrees to float rounding:
    the same scale (sqrt(scale)), the same norms (per slice along the long side, or per tensor),
    the same limiter, the same Adam and weight decay."""
    T, lr, wd = 4, 1e-2, 0.1
    rank = resolve_rank(default_rank(preset), shape)
    w0 = 0.02 * torch.randn(shape)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = SubspaceAdamW([{"params": [b], "rank": rank, "update_interval": T, **grassopt.PRESETS[preset]}],
                         lr=lr, weight_decay=wd)
    ref = _ref(a, preset, rank, T, lr, wd)
    calls = []

    def ours_instead(self, weights, rank_, type, seed):  # their layout: m x r (left) or r x n (right)
        calls.append(type)
        q = ours.basis(b)
        return q if type == "left" else q.mT.contiguous()

    monkeypatch.setattr(apollo_torch.random_projector.GradientProjector, "get_orthogonal_matrix", ours_instead)
    worst, limited = 0.0, 0
    for G in structured_grads(shape, 14, seed=2):
        a.grad, b.grad = G.clone(), G.clone()
        pa, pb = a.detach().clone(), b.detach().clone()
        ours.step()  # first: at a basis update it draws the basis apollo-torch then asks for
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.step()
        da, db = a.detach() - pa, b.detach() - pb
        worst = max(worst, ((da - db).norm() / da.norm()).item())
        limited += ours.diagnostics()["param 0"]["limiter"] < 1
    assert calls == ["left" if shape[0] < shape[1] else "right"] * 4  # steps 0, 4, 8, 12
    assert limited >= 3  # the limiter really acted
    assert worst < 2e-5


@pytest.mark.parametrize("preset, seeds", [("apollo", 1), ("apollo-mini", 16)])
def test_apollo_update_norms_match_apollo_torch_with_their_own_seeds(preset, seeds):
    """Different random projections, the same law. For APOLLO (rank d/4) each run's per-step update
    norm agrees within 5%; APOLLO-Mini's rank-1 scale carries ``1/||q||`` (``||q||^2 ~ chi2_d``),
    a ~4% spread per run at d = 512, so there the mean over runs agrees within 5%.
    (With gradients dominated by a few directions the spread is far larger, for apollo-torch
    against itself too: see benchmarks/apollo_parity.md.)"""
    shape, T, steps = (512, 1024), 10, 20
    rank = resolve_rank(default_rank(preset), shape)
    ours_norms = torch.zeros(seeds, steps)
    ref_norms = torch.zeros(seeds, steps)
    for s in range(seeds):
        g = torch.Generator().manual_seed(100 + s)
        a, b = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.zeros(shape))
        ours = SubspaceAdamW([{"params": [b], "rank": rank, "update_interval": T, **grassopt.PRESETS[preset]}],
                             lr=1e-2, seed=s)
        ref = _ref(a, preset, rank, T, 1e-2)
        for st in ref.state.values():
            st["seed"] += 7919 * s  # apollo-torch seeds by parameter index only: vary it per run
        for t in range(steps):
            G = torch.randn(shape, generator=g) * (1 + 0.5 * math.sin(t))
            a.grad, b.grad = G.clone(), G.clone()
            pa, pb = a.detach().clone(), b.detach().clone()
            ours.step()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref.step()
            ours_norms[s, t] = (b.detach() - pb).norm()
            ref_norms[s, t] = (a.detach() - pa).norm()
    ratio = ours_norms.mean(0) / ref_norms.mean(0)
    assert (ratio - 1).abs().max().item() < 0.05, ratio


def _nano_run(corpus, preset, reference, steps=100, lr=3e-3, T=20):
    """Train the nano LLaMA on SOTU for ``steps`` steps: ours, or apollo-torch with the same targets,
    ranks and plain group; the same initialisation and batches."""
    from grassopt.train.model import Llama, config

    torch.manual_seed(0)
    model = Llama(config("nano", vocab_size=corpus.vocab_size))
    if reference:
        s = grassopt.PRESETS[preset]
        by_rank = {}
        for _, mod in select_targets(model, "all-linear"):
            by_rank.setdefault(resolve_rank(default_rank(preset), mod.weight.shape), []).append(mod.weight)
        ids = {id(p) for ps in by_rank.values() for p in ps}
        groups = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
        groups += [{"params": ps, "rank": r, "proj": "random", "scale_type": s["scaling"], "update_proj_gap": T,
                    "scale": s["alpha"] ** 2, "proj_type": "std"} for r, ps in by_rank.items()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = apollo_torch.APOLLOAdamW(groups, lr=lr)
    else:
        opt = grassopt.make_optimizer(model, preset, lr=lr, update_interval=T)
    sampler = corpus.sampler(4, 64, seed=123)
    losses = []
    for _ in range(steps):
        x, y = sampler.next()
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        losses.append(loss.item())
    return torch.tensor(losses).view(-1, 10).mean(1)  # means over windows of 10 steps


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_apollo_loss_curve_on_nano_sotu_follows_apollo_torch(preset, sotu_1k):
    ours = _nano_run(sotu_1k, preset, reference=False)
    ref = _nano_run(sotu_1k, preset, reference=True)
    assert ours[-1] < ours[0] - 1.0 and ref[-1] < ref[0] - 1.0  # both learn
    # the same curve up to the randomness of the projections (measured: <= 0.05 nats)
    assert (ours - ref).abs().max().item() < 0.1, (ours, ref)


# ---------------------------------------------------------------------------- LDAdam
def test_ldadam_keeps_exactly_one_full_size_buffer_per_projected_matrix():
    torch.manual_seed(0)
    model = Net()
    opt = grassopt.make_optimizer(model, "ldadam", lr=1e-2, rank=4)
    x, y = torch.randn(64, 64), torch.randn(64, 10)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    assert len(projected) == 3
    for g in opt.param_groups:
        for p in g["params"]:
            full = [k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.numel() >= p.numel()]
            if "rank" in g:
                assert full == ["error"] and opt.state[p]["error"].shape == p.shape
                assert opt.state[p]["error"].dtype == torch.float32
                # E = X - Q Q^T X is orthogonal to the basis it was projected on
                q, e = opt.basis(p), opt.state[p]["error"]
                x_e = e.mT if p.shape[0] >= p.shape[1] else e
                assert (q.mT @ x_e).norm() < 1e-4 * x_e.norm()
                assert e.norm() > 0
            else:
                assert "error" not in opt.state[p]


def test_ldadam_updates_the_basis_every_step_by_warm_started_power_iteration():
    p = nn.Parameter(torch.zeros(30, 50))
    opt = SubspaceAdamW([{"params": [p], "rank": 3, **grassopt.PRESETS["ldadam"]}], lr=1e-2)
    gs = structured_grads(p.shape, 3, seed=4)
    p.grad = gs[0]
    opt.step()
    q0, e0 = opt.basis(p).clone(), opt.state[p]["error"].clone()
    p.grad = gs[1]
    opt.step()
    x = (gs[1] + e0)  # m < n: X = G + E, and Q' = qr(X X^T Q)
    expected, _ = torch.linalg.qr(x @ (x.mT @ q0))
    q1 = opt.basis(p)
    assert opt.diagnostics()["param 0"]["last_update"] == 1
    assert torch.allclose((q1 @ q1.mT), expected @ expected.mT, atol=1e-5)


def test_ldadam_lowers_the_loss_and_its_error_feedback_helps():
    def run(preset, **kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
        opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, **kw)
        x, y = torch.randn(256, 32), torch.randn(256, 8)
        losses = []
        for _ in range(80):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ld, no_feedback, galore = run("ldadam"), run("ldadam", error_feedback=False), run("galore")
    assert ld[-1] < 0.75 * ld[0]  # measured 0.74 from 1.10
    assert ld[-1] < no_feedback[-1] - 0.03  # 0.82 without the error buffer
    assert ld[-1] < galore[-1]  # 0.90


# ---------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("preset", NEW)
def test_nonfinite_gradient_changes_nothing_even_at_a_basis_update(preset):
    torch.manual_seed(0)
    model = Net()
    opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=2, update_interval=2)
    x = torch.randn(8, 64)
    for _ in range(2):  # the next step is a basis update (a new seed for apollo, and every step for ldadam)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    opt.zero_grad()
    model(x).square().mean().backward()
    model.b.weight.grad[3, 1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"b\.weight"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k], k


@pytest.mark.parametrize("preset", NEW)
def test_bf16_parameters_keep_float32_state_and_learn(preset):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)).to(torch.bfloat16)
    opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=5)
    x, y = torch.randn(128, 32).bfloat16(), torch.randn(128, 8).bfloat16()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.parametrize("preset", NEW)
def test_layerwise_step_parameters_equals_one_step(preset):
    def make():
        torch.manual_seed(0)
        model = Net()
        return model, grassopt.make_optimizer(model, preset, lr=1e-2, rank=2, update_interval=2)

    (m1, o1), (m2, o2) = make(), make()
    for i in range(4):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(i))
        for m in (m1, m2):
            m.zero_grad()
            m(x).square().mean().backward()
        o1.step()
        for p in reversed(list(m2.parameters())):
            o2.step_parameters([p])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
