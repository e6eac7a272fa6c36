"""grassopt.analysis: the measurements against float64 references, the training hook (which must
leave a run bit-identical), the analyze CLI, and the Ackley demo."""

import json
import math

import pytest
import torch

from grassopt.analysis import (SubspaceAnalyzer, basis_energy_share, derivative_spectrum, energy_profile,
                               estimation_error_derivative, layer_depth, layer_kind, principal_angles,
                               svd_energy_share)
from grassopt.analysis import ackley as ack
from grassopt.analysis import cli as analyze_cli
from grassopt.linalg import orient
from grassopt.train.loop import TrainConfig, load_checkpoint, train


def low_rank_plus_noise(m, n, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(10.0, 2.0, rank, dtype=torch.float64)
    return (u * s) @ v.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


def short_rows(g):
    """The gradient with the short side as rows, in its own dtype (linalg.orient casts to float32)."""
    return g if g.shape[0] < g.shape[1] else g.T


def reference_share(g64, r):
    """||U_r^T X||^2 / ||X||^2 by explicit projection, in float64, with U_r from the short side."""
    x = short_rows(g64)
    u = torch.linalg.svd(x, full_matrices=False)[0][:, :r]
    return float((u.T @ x).square().sum() / x.square().sum())


# ---------------------------------------------------------------------------------------- energy share
@pytest.mark.parametrize("shape", [(40, 120), (120, 40), (64, 64)])
@pytest.mark.parametrize("noise", [0.05, 0.5])
def test_energy_share_equals_a_float64_reference_on_low_rank_plus_noise(shape, noise):
    g64 = low_rank_plus_noise(*shape, rank=6, noise=noise, seed=shape[0] + int(100 * noise))
    x = orient(g64.float())  # float32, short side as rows: what the hook measures
    for r in (1, 3, 6, 10):
        assert svd_energy_share(x, r) == pytest.approx(reference_share(g64, r), abs=2e-6)
    _, shares = energy_profile(x, [1, 3, 6, 10, 1000])
    ref = torch.tensor([reference_share(g64, r) for r in (1, 3, 6, 10)], dtype=torch.float64)
    assert torch.allclose(shares[:4].double(), ref, atol=2e-6)
    assert shares[-1] == pytest.approx(1.0)  # a rank beyond min(m, n) captures everything
    assert bool((shares[1:] >= shares[:-1]).all()) and shares[1] < shares[2] - 0.05  # rank 6 > rank 3
    if noise < 0.1:  # little noise: the rank-6 share is the planted signal's share of the energy
        planted = float(torch.linspace(10.0, 2.0, 6, dtype=torch.float64).square().sum())
        assert shares[2] == pytest.approx(planted / float(g64.square().sum()), abs=0.02)


def test_basis_energy_share_of_a_given_basis_equals_a_float64_reference():
    g64 = low_rank_plus_noise(48, 100, rank=5, noise=0.3, seed=3)
    x64 = short_rows(g64)
    gen = torch.Generator().manual_seed(1)
    q64 = torch.linalg.qr(torch.randn(48, 7, generator=gen, dtype=torch.float64))[0]
    ref = float((q64.T @ x64).square().sum() / x64.square().sum())
    assert basis_energy_share(orient(g64.float()), q64.float()) == pytest.approx(ref, abs=2e-6)
    # the top singular basis captures exactly the SVD share, a random one much less
    u = torch.linalg.svd(x64, full_matrices=False)[0][:, :7]
    assert basis_energy_share(x64, u) == pytest.approx(reference_share(g64, 7), abs=1e-12)
    assert ref < 0.5 * reference_share(g64, 7)
    assert basis_energy_share(torch.zeros(4, 6), torch.eye(4)[:, :2]) == 0.0


# ---------------------------------------------------------------------------------------- angles
def test_principal_angles_are_zero_for_the_same_subspace_and_pi_over_2_for_orthogonal_ones():
    gen = torch.Generator().manual_seed(0)
    full = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))[0]
    q = full[:, :4]
    assert principal_angles(q, q).abs().max() < 1e-7
    q32 = q.float()
    assert principal_angles(q32, q32).abs().max() < 1e-7
    # another basis of the same span (rotation and a sign flip inside it) is the same subspace
    rot = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))[0]
    assert principal_angles(q, (q @ rot) * torch.tensor([1.0, -1, 1, -1], dtype=torch.float64)).max() < 1e-7
    orth = principal_angles(q, full[:, 4:8])
    assert torch.allclose(orth, torch.full((4,), math.pi / 2, dtype=torch.float64), atol=1e-12)


def test_principal_angles_recover_planted_angles_including_tiny_ones():
    gen = torch.Generator().manual_seed(2)
    full = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))[0]
    q1, perp = full[:, :3], full[:, 3:6]
    theta = torch.tensor([1.2, 0.5, 1e-6], dtype=torch.float64)
    q2 = q1 * torch.cos(theta) + perp * torch.sin(theta)
    got = principal_angles(q1, q2)
    assert torch.allclose(got[:2], theta[:2], atol=1e-12)
    assert got[2] == pytest.approx(1e-6, rel=1e-6)  # acos alone would give ~1e-8 resolution here
    assert got[0] >= got[1] >= got[2]  # descending


# ---------------------------------------------------------------------------------------- derivative
def test_estimation_error_derivative_is_the_gradient_of_F_and_vanishes_at_the_svd_basis():
    g64 = low_rank_plus_noise(24, 60, rank=4, noise=0.2, seed=5)
    x = short_rows(g64)
    gen = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(24, 4, generator=gen, dtype=torch.float64))[0].requires_grad_(True)
    f = (x - q @ (q.T @ x)).square().sum()  # F(Q) with A = Q^T X eliminated
    (auto,) = torch.autograd.grad(f, q)
    q = q.detach()
    auto = auto - q @ (q.T @ auto)  # the Riemannian gradient: tangent part
    df = estimation_error_derivative(x, q)
    assert torch.allclose(df, auto, atol=1e-10)
    assert torch.allclose(q.T @ df, torch.zeros(4, 4, dtype=torch.float64), atol=1e-10)
    sv = derivative_spectrum(x, q)
    assert torch.allclose(sv, torch.linalg.svdvals(auto), atol=1e-10)
    assert float(sv[0]) <= float(x.square().sum())  # sigma_1 <= ||X||^2 (docs/algorithms.md#track)
    u = torch.linalg.svd(x, full_matrices=False)[0][:, :4]
    assert derivative_spectrum(x, u).max() < 1e-9 * float(x.square().sum())
    assert derivative_spectrum(x, q, top=2).shape == (2,)


def test_layer_kind_and_depth_from_parameter_names():
    assert layer_kind("layers.3.self_attn.q_proj.weight") == "q"
    assert layer_kind("layers.0.self_attn.o_proj.weight") == "o"
    assert layer_kind("model.layers.11.mlp.down_proj.weight") == "down"
    assert layer_kind("layers.2.mlp.gate_proj") == "gate"
    assert layer_kind("transformer.h.1.attn.c_attn.weight") == "c_attn"
    assert layer_depth("model.layers.11.mlp.down_proj.weight") == 11
    assert layer_depth("transformer.h.1.attn.c_attn.weight") == 1
    assert layer_depth("lm_head.weight") is None


# ---------------------------------------------------------------------------------------- the hook
class _Probe:
    """Records the global RNG state after every step, and copies of gradients and bases when asked."""

    def __init__(self, capture_every=None):
        self.rng, self.capture_every, self.captured = [], capture_every, {}

    def after_backward(self, step, model, opt):
        if self.capture_every and step % self.capture_every == 0:
            names = {id(p): n for n, p in model.named_parameters()}
            self.captured[step] = {
                names[id(p)]: (p.grad.double().clone(), None if not opt.state.get(p) else opt.state[p]["Q"].double().clone())
                for g in opt.param_groups if g.get("rank") for p in g["params"]}

    def after_step(self, step, model, opt, record):
        self.rng.append(torch.get_rng_state().clone())


def _nano(tmp_path, name, steps=6, **kw):
    return TrainConfig(model="nano", vocab_size=1024, seq_len=64, batch_size=4, steps=steps, threads=1,
                       progress=False, plot=False, eval_every=1000, rank=8, update_interval=2,
                       out=str(tmp_path / name), **kw)


def test_the_analyze_hook_leaves_a_training_run_bit_identical(tmp_path, sotu_1k):
    # GrassWalk: a random rule (the optimizer's generators) with frequent basis updates
    base = dict(preset="grasswalk")
    plain_probe = _Probe()
    s_plain = train(_nano(tmp_path, "plain", **base), sotu_1k, hooks=[plain_probe])
    an = SubspaceAnalyzer(every=2, out=tmp_path / "an" / "analysis", top=5, energy_ranks=(2, 32), plot=False)
    probe = _Probe(capture_every=2)
    s_an = train(_nano(tmp_path, "an", **base), sotu_1k, hooks=[an, probe])

    a, b = load_checkpoint(tmp_path / "plain" / "checkpoint.pt"), load_checkpoint(tmp_path / "an" / "checkpoint.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        assert b["optimizer"]["state"][i].keys() == st.keys()  # the hook added no state entry
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]) if torch.is_tensor(v) else v == b["optimizer"]["state"][i][k]
    assert s_plain["final_eval_loss"] == s_an["final_eval_loss"]
    assert all(torch.equal(x, y) for x, y in zip(plain_probe.rng, probe.rng)) and len(probe.rng) == 6

    grads = [r for r in an.records if r["type"] == "grad"]
    bases = [r for r in an.records if r["type"] == "basis"]
    n_mat = 2 * 7  # nano: 2 blocks x (q, k, v, o, gate, up, down)
    assert sorted({r["step"] for r in grads}) == [0, 2, 4, 5] and len(grads) == 4 * n_mat
    assert {r["kind"] for r in grads} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert {r["depth"] for r in grads} == {0, 1}
    # the records are what a float64 reference computes from the same gradients and bases
    for r in grads:
        g, q = probe.captured[r["step"]][r["name"]] if r["step"] in probe.captured else (None, None)
        if g is None:
            continue
        assert r["energy_svd"] == pytest.approx(reference_share(g, 8), abs=1e-5)
        assert r["energy_svd_at"]["2"] == pytest.approx(reference_share(g, 2), abs=1e-5)
        assert r["energy_svd_at"]["32"] == pytest.approx(reference_share(g, 32), abs=1e-5)
        if r["step"] == 0:  # no basis yet: the first gradient initialises it
            assert r["energy_basis"] is None and r["df_sv"] is None
        else:
            x = short_rows(g)
            ref = float((q.T @ x).square().sum() / x.square().sum())
            assert r["basis_source"] == "optimizer"
            assert r["energy_basis"] == pytest.approx(ref, abs=1e-5)
            ref_sv = torch.linalg.svdvals(estimation_error_derivative(x, q))[:5]
            assert torch.allclose(torch.tensor(r["df_sv"], dtype=torch.float64), ref_sv, rtol=1e-3, atol=1e-12)
            assert r["svd_drift_max_deg"] is not None and 0 <= r["svd_drift_mean_deg"] <= r["svd_drift_max_deg"] <= 90
    # GrassWalk turns every basis by exactly step_size = 0.1 rad at steps 2 and 4 (update_interval 2)
    assert sorted({r["step"] for r in bases}) == [2, 4] and len(bases) == 2 * n_mat
    for r in bases:
        assert r["angle_max_deg"] == pytest.approx(math.degrees(0.1), abs=1e-3)
        assert r["angle_mean_deg"] < r["angle_max_deg"]  # rank-1 step: the other angles are 0
    lines = (tmp_path / "an" / "analysis" / "analysis.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == an.records


def test_analyze_cli_writes_records_plots_and_report_even_for_a_full_rank_optimizer(tmp_path, sotu_1k, capsys):
    out = tmp_path / "an"
    argv = ["--model", "nano", "--vocab-size", "1024", "--seq-len", "64", "--batch-size", "4", "--steps", "5",
            "--rank", "8", "--preset", "adamw-torch", "--every", "2", "--top", "4", "--threads", "1", "--no-progress",
            "--eval-every", "1000", "--out", str(out), "--cache-dir", str(sotu_1k.cache_dir.parent.parent)]
    assert analyze_cli.main(argv) == 0
    recs = [json.loads(x) for x in (out / "analysis.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in recs}) == [0, 2, 4]
    assert all(r["energy_basis"] is None for r in recs)  # no optimizer basis
    later = [r for r in recs if r["step"] > 0]
    assert later and all(r["basis_source"] == "previous_svd" and len(r["df_sv"]) == 4 for r in later)
    for png in ("energy_svd.png", "df_spectrum.png", "df_spectrum_rel.png", "svd_drift.png"):
        assert (out / png).stat().st_size > 10_000, png
    assert not (out / "energy_basis.png").exists()
    assert "| q |" in (out / "analysis.md").read_text()
    (out / "energy_svd.png").unlink()
    assert analyze_cli.main(["--replot", "--out", str(out)]) == 0
    assert (out / "energy_svd.png").is_file()
    assert analyze_cli.main(["--replot", "--out", str(tmp_path / "nothing")]) == 2


# ---------------------------------------------------------------------------------------- Ackley
def test_ackley_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    for w in 3 * torch.randn(5, 2, generator=gen, dtype=torch.float64):
        w = w.requires_grad_(True)
        (auto,) = torch.autograd.grad(ack.ackley(w), w)
        assert torch.allclose(ack.ackley_grad(w.detach()), auto, atol=1e-12)
    assert float(ack.ackley(torch.zeros(2, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)


def test_ackley_runs_are_deterministic_and_move_inside_the_rules_subspace():
    cfg = dict(start=(-2.2, 1.5), steps=100, update_interval=10)
    for rule in ("track", "svd"):
        a, b = ack.run(ack.AckleyConfig(rule=rule, **cfg)), ack.run(ack.AckleyConfig(rule=rule, **cfg))
        assert torch.equal(a["path"], b["path"]) and torch.equal(a["bases"], b["bases"])
        assert a["path"].shape == (101, 2) and len(a["update_angles_deg"]) == 9
        # every move is along the current 1-D basis
        moves, q = a["path"].diff(dim=0), a["bases"]
        assert (moves[:, 0] * q[:, 1] - moves[:, 1] * q[:, 0]).abs().max() < 1e-12
        # the basis only changes at updates (steps 10, 20, ...)
        changes = [i for i in range(1, 100) if not torch.equal(q[i], q[i - 1])]
        assert set(changes) <= set(range(10, 100, 10)) and changes
    track, svd = (ack.run(ack.AckleyConfig(rule=r, **cfg)) for r in ("track", "svd"))
    # both start from the SVD basis of the first gradient (its direction), then part at the first update
    assert torch.equal(track["path"][:11], svd["path"][:11])
    g0 = ack.ackley_grad(torch.tensor(cfg["start"], dtype=torch.float64))
    assert abs(float(svd["bases"][0] @ g0)) == pytest.approx(float(g0.norm()), rel=1e-12)
    assert not torch.equal(track["path"][11:], svd["path"][11:])
    # svd jumps to the current gradient's direction; track turns by at most eta = 0.5 rad
    assert max(track["update_angles_deg"]) <= math.degrees(0.5) + 1e-9
    g10 = ack.ackley_grad(svd["path"][10])
    assert abs(float(svd["bases"][10] @ g10)) == pytest.approx(float(g10.norm()), rel=1e-12)


def test_ackley_cli_writes_the_png_and_the_distances(tmp_path, capsys):
    out = tmp_path / "ack"
    assert ack.main(["--out", str(out)]) == 0
    assert (out / "ackley.png").stat().st_size > 20_000
    rep = json.loads((out / "ackley.json").read_text())
    assert [r["label"] for r in rep["runs"]] == ["track SF1", "svd SF1", "track SF3", "svd SF3"]
    direct = ack.run(ack.AckleyConfig(rule="svd", scale=3.0))
    assert rep["runs"][3]["final_distance"] == direct["final_distance"]
    assert "| track SF1 |" in capsys.readouterr().out
    assert ack.main(["--out", str(out), "--rules", "nonsense"]) == 2
