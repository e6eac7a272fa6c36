"""grassopt.analysis: the measurements against float64 references, the training hook (which must
leave a run bit-identical), the analyze CLI, and the Ackley demo."""

import json
import math

import pytest
import torch

import grassopt
from grassopt.analysis import (SubspaceAnalyzer, SubspaceQuality, basis_energy_share, derivative_spectrum,
                               energy_profile, estimation_error_derivative, layer_depth, layer_kind,
                               principal_angles, read_records, summarize_quality, svd_energy_share)
from grassopt.analysis import ackley as ack
from grassopt.analysis import cli as analyze_cli
from grassopt.linalg import orient
from grassopt.rules import get_rule
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
    an = SubspaceAnalyzer(every=2, out=tmp_path / "an" / "analysis", top=5, energy_ranks=(2, 32), quality=True,
                          plot=False)
    probe = _Probe(capture_every=1)
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
    # GrassWalk turns every basis by exactly its step size at steps 2 and 4 (update_interval 2)
    assert sorted({r["step"] for r in bases}) == [2, 4] and len(bases) == 2 * n_mat
    for r in bases:
        assert r["angle_max_deg"] == pytest.approx(math.degrees(get_rule("walk").OPTIONS["step_size"]), abs=1e-3)
        assert 0 < r["angle_mean_deg"] < r["angle_max_deg"]  # the other angles: smaller, not all zero
    # quality=True: per basis interval, the capture of the following gradients, with the update's angles
    quality = [r for r in an.records if r["type"] == "quality"]
    assert len(quality) == 3 * n_mat and {r["rule"] for r in quality} == {"walk"}
    for r in quality:
        key = (r["interval_start"], r["step"], r["steps"], r["complete"])
        assert key in [(0, 2, 2, True), (2, 4, 2, True), (4, 5, 1, False)]
        shares = [_share64(*probe.captured[s][r["name"]]) for s in range(r["interval_start"] + 1, r["step"] + 1)]
        assert r["capture_next"] == pytest.approx(sum(shares) / len(shares), abs=1e-5)
        basis = next((b for b in bases if b["name"] == r["name"] and b["step"] == r["step"]), None)
        assert r["angle_max_deg"] == (basis and basis["angle_max_deg"])  # None for the interval still open
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


def test_analyze_cli_quality_only_records_the_intervals_and_refuses_a_full_rank_optimizer(tmp_path, sotu_1k, capsys):
    out = tmp_path / "q"
    argv = ["--model", "nano", "--vocab-size", "1024", "--seq-len", "64", "--batch-size", "2", "--steps", "6",
            "--rank", "8", "--update-interval", "2", "--threads", "1", "--no-progress", "--eval-every", "1000",
            "--cache-dir", str(sotu_1k.cache_dir.parent.parent)]
    assert analyze_cli.main([*argv, "--preset", "subtrack++", "--quality-only", "--out", str(out)]) == 0
    recs = read_records(out / "analysis.jsonl")
    assert {r["type"] for r in recs} == {"quality"} and len(recs) == 3 * 14  # (0, 2], (2, 4], (4, 5] x 14 matrices
    intervals = {(r["interval_start"], r["step"], r["complete"]) for r in recs}
    assert intervals == {(0, 2, True), (2, 4, True), (4, 5, False)}
    assert (out / "capture_next.png").stat().st_size > 10_000 and not (out / "energy_svd.png").exists()
    printed = capsys.readouterr().out
    assert "| track | q | 6 |" in printed and "| track | **all** | 42 |" in (out / "analysis.md").read_text()
    assert analyze_cli.main([*argv, "--preset", "adamw-torch", "--quality", "--out", str(tmp_path / "full")]) == 2
    assert "projected param groups" in capsys.readouterr().err


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


# ---------------------------------------------------------------------------------------- subspace quality
def _mlp_run(preset, steps, hooks=(), rule=None, update_interval=3, cfg=None, model_opt=None, start=0):
    """A short run of an MLP of three projected Linears (40x24, 32x40, 12x32 at rank 4) on random data,
    calling the hooks like ``train`` does; returns ``(model, optimizer, probe)`` where ``probe`` holds,
    per step, the float64 gradients and bases before the step and the bases after it."""
    if model_opt is None:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 12))
        kw = {} if rule is None else {"rule": rule}
        opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=update_interval, **kw)
    else:
        model, opt = model_opt
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 24, generator=gen), torch.randn(16, 12, generator=gen)) for _ in range(start + steps)]
    mats = {f"{i}.weight": model[i].weight for i in (0, 2, 4)}
    basis = lambda p: None if opt.basis(p) is None else opt.basis(p).double().clone()  # noqa: E731
    probe = {"grad": {}, "before": {}, "after": {}}
    for h in hooks:
        h.on_start(model, opt, cfg)
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        x, y = data[step]
        (model(x) - y).square().mean().backward()
        probe["grad"][step] = {n: p.grad.double().clone() for n, p in mats.items()}
        probe["before"][step] = {n: basis(p) for n, p in mats.items()}
        for h in hooks:
            h.after_backward(step, model, opt)
        opt.step()
        probe["after"][step] = {n: basis(p) for n, p in mats.items()}
        for h in hooks:
            h.after_step(step + 1, model, opt, None)
    for h in hooks:
        h.on_end(model, opt, None)
    return model, opt, probe


def _share64(g, q):
    """||Q^T X||^2 / ||X||^2 in float64."""
    x = short_rows(g)
    return float((q.T @ x).square().sum() / x.square().sum())


def _check_quality_records(recs, probe):
    """Every record against a float64 recomputation from the probe's gradients and bases."""
    for r in recs:
        start, end, name = r["interval_start"], r["step"], r["name"]
        first = min(probe["grad"]) if start is None else start + 1
        steps = range(first, end + 1)
        assert r["steps"] == len(steps)
        q = probe["before"][first][name]
        if start is not None:  # the basis the update at ``start`` built (or the first gradient built)
            assert torch.equal(q, probe["after"][start][name])
        for s in steps:  # one basis over the whole interval
            assert torch.equal(probe["before"][s][name], q)
        span = q if (q.T @ q - torch.eye(q.shape[1], dtype=q.dtype)).norm() < 1e-5 else torch.linalg.qr(q)[0]
        shares = [_share64(probe["grad"][s][name], span) for s in steps]
        assert r["capture_next"] == pytest.approx(sum(shares) / len(shares), abs=1e-6)
        assert r["capture_min"] == pytest.approx(min(shares), abs=1e-6)
        assert r["capture_last"] == pytest.approx(shares[-1], abs=1e-6)
        if r["complete"] and torch.equal(probe["after"][end][name], q):  # an update that kept the basis
            assert r["angle_max_deg"] == 0.0 and r["angle_mean_deg"] == 0.0
        elif r["complete"]:  # replaced by the update at ``end``: its angles, in float64
            new = probe["after"][end][name]
            ang = principal_angles(q, new)
            assert r["angle_max_deg"] == pytest.approx(math.degrees(float(ang.max())), abs=1e-9)
            assert r["angle_mean_deg"] == pytest.approx(math.degrees(float(ang.mean())), abs=1e-9)
        else:
            assert r["angle_max_deg"] is None and r["angle_mean_deg"] is None


@pytest.mark.parametrize("preset,rule", [("galore", "svd"), ("subtrack++", "track"), ("apollo", "gaussian")])
def test_quality_records_equal_a_float64_recomputation_from_the_same_gradients_and_bases(tmp_path, preset, rule):
    hook = SubspaceQuality(out=tmp_path / "q")
    _, _, probe = _mlp_run(preset, 11, hooks=[hook])
    recs = hook.records
    assert all(r["type"] == "quality" and r["rule"] == rule and r["rank"] == 4 for r in recs)
    # updates at steps 3, 6, 9 (update_interval 3): intervals (0, 3], (3, 6], (6, 9] and (9, 10] still open
    for name in ("0.weight", "2.weight", "4.weight"):
        mine = [r for r in recs if r["name"] == name]
        assert [(r["interval_start"], r["step"], r["steps"], r["complete"]) for r in mine] == [
            (0, 3, 3, True), (3, 6, 3, True), (6, 9, 3, True), (9, 10, 1, False)]
    _check_quality_records(recs, probe)
    # the first interval excludes the gradient that built the basis: in-sample, it would score higher
    # (apollo: a Gaussian projection, regenerated from its seed and measured by its span, built from no gradient)
    for r in (r for r in recs if r["interval_start"] == 0 and rule != "gaussian"):
        in_sample = _share64(probe["grad"][0][r["name"]], probe["after"][0][r["name"]])
        assert in_sample > r["capture_next"] + 0.05
        if rule == "svd":  # the first basis is the SVD basis of the first gradient
            assert in_sample == pytest.approx(reference_share(probe["grad"][0][r["name"]], 4), abs=1e-6)
    # the file holds the records; the report summarises them per rule and layer type, and plots them
    assert read_records(tmp_path / "q" / "analysis.jsonl") == recs
    rows = summarize_quality(recs)
    assert [row["kind"] for row in rows] == ["0", "2", "4", "all"] and rows[-1]["intervals"] == 12
    assert rows[-1]["capture_next"] == pytest.approx(sum(r["capture_next"] for r in recs) / 12)
    assert (tmp_path / "q" / "capture_next.png").stat().st_size > 10_000
    assert f"| {rule} | **all** | 12 |" in (tmp_path / "q" / "analysis.md").read_text()


def test_quality_a_frozen_basis_closes_an_interval_at_every_scheduled_update_with_angle_zero():
    hook = SubspaceQuality()
    _, _, probe = _mlp_run("galore", 8, hooks=[hook], rule="frozen")  # updates at steps 3 and 6
    names = ("0.weight", "2.weight", "4.weight")
    got = sorted((r["name"], r["interval_start"], r["step"], r["steps"], r["complete"], r["angle_max_deg"])
                 for r in hook.records)
    assert got == sorted([(n, 0, 3, 3, True, 0.0) for n in names] + [(n, 3, 6, 3, True, 0.0) for n in names]
                         + [(n, 6, 7, 1, False, None) for n in names])
    _check_quality_records(hook.records, probe)
    track = SubspaceQuality()  # the same interval boundaries as a rule that moves its basis
    _mlp_run("subtrack++", 8, hooks=[track])
    assert sorted((r["name"], r["interval_start"], r["step"]) for r in track.records) == sorted(g[:3] for g in got)


def test_quality_hook_leaves_the_run_bit_identical_and_needs_a_projecting_optimizer():
    plain_model, plain_opt, _ = _mlp_run("subtrack++", 7)
    rng_plain = torch.get_rng_state()
    hook = SubspaceQuality()
    model, opt, _ = _mlp_run("subtrack++", 7, hooks=[hook])
    assert torch.equal(torch.get_rng_state(), rng_plain) and hook.records
    for a, b in zip(plain_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    sa, sb = plain_opt.state_dict(), opt.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sa["state"].items():
        assert st.keys() == sb["state"][i].keys()
        for k, v in st.items():
            assert torch.equal(v, sb["state"][i][k]) if torch.is_tensor(v) else v == sb["state"][i][k]
    with pytest.raises(ValueError, match="projected param groups"):
        _mlp_run("adamw", 1, hooks=[SubspaceQuality()])
    lenient = SubspaceQuality(strict=False)
    _mlp_run("adamw", 3, hooks=[lenient])
    assert lenient.records == []


def test_quality_after_a_resumption_drops_the_open_interval_and_continues_from_an_unknown_start(tmp_path):
    from types import SimpleNamespace

    first = SubspaceQuality(out=tmp_path, plot=False)
    model, opt, probe = _mlp_run("galore", 8, hooks=[first])  # steps 0-7; (6, 7] is open at the interruption
    assert [(r["interval_start"], r["step"], r["complete"]) for r in first.records[-3:]] == [(6, 7, False)] * 3
    second = SubspaceQuality(out=tmp_path, plot=False)
    _, _, probe2 = _mlp_run("galore", 3, hooks=[second], cfg=SimpleNamespace(resume=True), model_opt=(model, opt),
                            start=8)  # steps 8-10
    recs = read_records(tmp_path / "analysis.jsonl")
    assert [(r["interval_start"], r["step"], r["steps"], r["complete"]) for r in recs if r["name"] == "2.weight"] == [
        (0, 3, 3, True), (3, 6, 3, True), (None, 9, 2, True), (9, 10, 1, False)]
    _check_quality_records(second.records, probe2)


def test_train_subspace_quality_option_records_intervals_and_refuses_full_rank(tmp_path, sotu_1k):
    from grassopt.analysis.hook import read_records
    from grassopt.train.loop import TrainConfig, train

    base = dict(model="nano", vocab_size=1024, seq_len=32, batch_size=2, steps=7, lr=3e-3, rank=8,
                update_interval=3, eval_every=1000, log_every=1, progress=False, plot=False, threads=1)
    plain = train(TrainConfig(preset="galore", out=str(tmp_path / "a"), **base), dataset=sotu_1k)
    with_q = train(TrainConfig(preset="galore", out=str(tmp_path / "b"), subspace_quality=True, **base),
                   dataset=sotu_1k)
    assert plain["final_train_loss"] == with_q["final_train_loss"]  # a read-only diagnostic
    recs = [r for r in read_records(tmp_path / "b" / "analysis.jsonl") if r.get("type") == "quality"]
    assert recs and all(0.0 < r["capture_next"] <= 1.0 for r in recs if r["capture_next"] is not None)
    assert {r["interval_start"] for r in recs} >= {0, 3}
    with pytest.raises(ValueError, match="subspace_quality=True reads the bases"):
        TrainConfig(preset="adamw", subspace_quality=True, **base).validate()
