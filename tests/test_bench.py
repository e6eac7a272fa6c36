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


def test_bench_rejects_unknown_presets(tmp_path, capsys):
    assert cli.main(["--presets", "adamw-torch", "nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'nonsense'" in capsys.readouterr().err


def test_variants_parse_into_config_fields_and_subspace_options():
    name, fields, options = cli.parse_variant("subtrack++:transport=keep,recovery=False,update_interval=50,lr=0.01")
    assert name == "subtrack++"
    assert fields == {"update_interval": 50, "lr": 0.01}
    assert options == {"transport": "keep", "recovery": False}
    assert cli.parse_variant("galore") == ("galore", {}, {})
