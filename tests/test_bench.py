import json

import pytest

from grassopt.bench import cli


def test_bench_writes_a_side_by_side_report_and_reuses_finished_runs(tmp_path, sotu_1k, capsys):
    out = tmp_path / "bench"
    argv = ["--model", "nano", "--vocab-size", "1024", "--seq-len", "32", "--batch-size", "2", "--steps", "6",
            "--rank", "8", "--update-interval", "3", "--eval-every", "3", "--threads", "1", "--no-progress",
            "--presets", "adamw-torch", "subtrack++", "--no-refs", "--seeds", "0", "1",
            "--lrs", "subtrack++=0.01", "--out", str(out), "--cache-dir", str(sotu_1k.cache_dir.parent.parent)]
    assert cli.main(argv) == 0
    report = (out / "report.md").read_text()
    assert "| adamw-torch |" in report and "| subtrack++ | 0.01 |" in report
    res = json.loads((out / "results.json").read_text())
    rows = {r["preset"]: r for r in res["rows"]}
    assert rows["adamw-torch"]["state_ratio"] == pytest.approx(1.0)
    assert rows["subtrack++"]["state_ratio"] < 1.0  # rank 8 of 64-wide matrices
    assert len(rows["subtrack++"]["eval_losses"]) == 2
    for png in ("loss_vs_step.png", "loss_vs_time.png"):
        assert (out / png).stat().st_size > 10_000
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().err.count("reusing the finished run") == 4
    assert json.loads((out / "results.json").read_text())["rows"][1]["eval_loss"] == rows["subtrack++"]["eval_loss"]


def test_a_bench_folder_copied_elsewhere_reuses_its_finished_runs(tmp_path, sotu_1k, capsys, monkeypatch):
    import shutil

    first = tmp_path / "a"
    argv = ["--model", "nano", "--vocab-size", "1024", "--seq-len", "32", "--batch-size", "2", "--steps", "2",
            "--eval-every", "2", "--threads", "1", "--no-progress", "--presets", "adamw-torch", "--no-refs",
            "--seeds", "0", "--cache-dir", str(sotu_1k.cache_dir.parent.parent)]
    assert cli.main([*argv, "--out", str(first)]) == 0
    summary = (first / "runs" / "adamw-torch-s0" / "summary.json").read_bytes()
    shutil.copytree(first, tmp_path / "b")  # cp -r runs/a runs/b
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main([*argv, "--out", "b"]) == 0  # the copy, named by a relative path
    err = capsys.readouterr().err
    assert err.count("reusing the finished run") == 1, err
    assert (tmp_path / "b" / "runs" / "adamw-torch-s0" / "summary.json").read_bytes() == summary  # not rerun
    # a setting that changes the numbers still reruns the copied run
    assert cli.main([*argv, "--out", "b", "--lr", "0.002"]) == 0
    assert "reusing" not in capsys.readouterr().err


def test_bench_rejects_unknown_presets(tmp_path, capsys):
    assert cli.main(["--presets", "adamw-torch", "nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'nonsense'" in capsys.readouterr().err


def test_widen_steps_beyond_the_edge_holding_the_best_rate_and_stops_at_an_interior_optimum():
    assert cli.widen({1e-3: 5.0, 3e-3: 5.1, 1e-2: 5.3}) == pytest.approx(1e-3 / 3)
    assert cli.widen({1e-3: 5.3, 3e-3: 5.1, 1e-2: 5.0}) == pytest.approx(1e-2 * 10 / 3)
    assert cli.widen({1e-3: 5.3, 3e-3: 5.0, 1e-2: 5.2}) is None
    assert cli.widen({1e-3: 5.3, 3e-3: 5.0, 1e-2: float("nan")}) is None  # a diverged top edge is no optimum
    assert cli.widen({1e-3: 5.3, 3e-3: float("nan")}) == pytest.approx(1e-3 / 3)
    assert cli.widen({2e-3: 5.0}) == pytest.approx(6e-3)
    assert cli.widen({1e-3: None, 3e-3: float("nan")}) is None
    # scores compared in order (fine-tuning: minus the validation accuracy, then the validation loss)
    assert cli.widen({1e-3: (-0.60, 1.1), 3e-3: (-0.62, 1.2), 1e-2: (-0.62, 1.0)}) == pytest.approx(1e-2 * 10 / 3)
    assert cli.widen({1e-3: (-0.60, 1.1), 3e-3: (-0.62, 1.0), 1e-2: (-0.62, float("nan"))}) is None


def test_variants_parse_into_config_fields_and_subspace_options():
    name, fields, options = cli.parse_variant("subtrack++:transport=keep,recovery=False,update_interval=50,lr=0.01")
    assert name == "subtrack++"
    assert fields == {"update_interval": 50, "lr": 0.01}
    assert options == {"transport": "keep", "recovery": False}
    assert cli.parse_variant("galore") == ("galore", {}, {})
    # a bracketed value keeps its commas, and a preset's betas option is every group's betas
    name, fields, options = cli.parse_variant("subtrack++:state_dtype=factored-no-m,betas=(0.0,0.999),rank=8")
    assert fields == {"state_dtype": "factored-no-m", "rank": 8} and options == {"betas": (0.0, 0.999)}
    from grassopt import registry
    from grassopt.train.model import Llama, config
    opt = registry.build(name, Llama(config("nano", vocab_size=257)), rank=8, state_dtype="factored-no-m",
                         plain_state_dtype="factored-no-m", options=options)
    assert {tuple(g["betas"]) for g in opt.param_groups} == {(0.0, 0.999)}


def test_sweep_per_preset_rates_borrowed_and_a_report_beside_shared_runs(tmp_path, sotu_1k, capsys):
    out, rep = tmp_path / "bench", tmp_path / "report"
    argv = ["--model", "nano", "--vocab-size", "1024", "--seq-len", "32", "--batch-size", "2", "--steps", "4",
            "--rank", "8", "--eval-every", "4", "--eval-tokens", "512", "--threads", "1", "--no-progress",
            "--presets", "adamw-torch", "galore", "galore:update_interval=2", "--no-refs",
            "--sweep-lrs", "adamw-torch=1e-3,3e-2", "galore=1e-4,1e-2", "--sweep-steps", "3", "--widen", "1",
            "--lrs-from", "galore:update_interval=2=galore",
            "--out", str(out), "--report-dir", str(rep), "--cache-dir", str(sotu_1k.cache_dir.parent.parent)]
    assert cli.main(argv) == 0
    res = json.loads((rep / "results.json").read_text())
    swept = {(s["preset"], s["lr"]): s["final_eval_loss"] for s in res["sweep"]}
    for p, (lo, hi) in {"adamw-torch": (1e-3, 3e-2), "galore": (1e-4, 1e-2)}.items():
        # two rates: the best is at an edge, so --widen 1 sweeps one more, one grid step beyond it
        first = min((lo, hi), key=lambda lr: swept[(p, lr)])
        beyond = float(f"{(lo * lo / hi if first == lo else hi * hi / lo):.3g}")
        assert {lr for q, lr in swept if q == p} == {lo, hi, beyond}
    lrs = {r["preset"]: r["lr"] for r in res["rows"]}
    for p in ("adamw-torch", "galore"):  # each preset at the rate of its best sweep run
        assert lrs[p] == min((lr for q, lr in swept if q == p), key=lambda lr: swept[(p, lr)])
    assert lrs["galore:update_interval=2"] == lrs["galore"]
    assert (rep / "report.md").is_file() and not (out / "report.md").exists() and (out / "runs").is_dir()
    capsys.readouterr()
    assert cli.main([*argv[:argv.index("--lrs-from")], "--lrs-from", "nonsense=galore", "--out", str(out)]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_a_stopped_run_is_resumed_by_the_next_bench_and_ends_as_an_uninterrupted_one(tmp_path, sotu_1k, capsys):
    """A bench run stopped with a checkpoint (as Ctrl-C leaves it) is resumed, not restarted, by the next
    invocation with the same settings, and ends bit for bit where an uninterrupted run ends."""
    import dataclasses

    from grassopt.train.loop import train

    argv = ["--model", "nano", "--vocab-size", "1024", "--seq-len", "32", "--batch-size", "2", "--steps", "6",
            "--rank", "8", "--update-interval", "2", "--eval-every", "3", "--threads", "1", "--no-progress",
            "--presets", "subtrack++", "--no-refs", "--seeds", "0", "--cache-dir", str(sotu_1k.cache_dir.parent.parent)]
    assert cli.main([*argv, "--out", str(tmp_path / "straight")]) == 0
    straight = (tmp_path / "straight" / "runs" / "subtrack++-s0" / "metrics.jsonl").read_text()
    stopped = tmp_path / "stopped"
    assert cli.main([*argv, "--out", str(stopped)]) == 0
    run = stopped / "runs" / "subtrack++-s0"
    cfg = json.loads((run / "config.json").read_text())
    for name in ("summary.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.pt.sha256"):
        (run / name).unlink()
    from grassopt.train.loop import TrainConfig
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    first = train(TrainConfig(**{**{k: v for k, v in cfg.items() if k in fields}, "stop_after": 3, "overwrite": True,
                                 "betas": tuple(cfg["betas"])}))
    assert not first["finished"] and (run / "checkpoint.pt").is_file()
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(stopped)]) == 0
    assert "resuming the stopped run" in capsys.readouterr().err
    resumed = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in straight.splitlines()]
    # the evaluations equal bit for bit (the weights do); a logged training loss is a mean since the last
    # line, whose window a resume restarts
    key = ("step", "eval_loss")
    assert [{k: r.get(k) for k in key} for r in resumed] == [{k: r.get(k) for k in key} for r in want]
