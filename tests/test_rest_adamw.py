"""Hidden matrices + AdamW (grassopt.references.HiddenAndAdamW): ``ref-adafactor:rest=adamw`` trains the
hidden matrices with torch's Adafactor and everything else with torch's AdamW, each part stepping exactly
like the package's optimizer built by hand on its parameters; ``plain_lr`` / ``plain_weight_decay`` reach
the AdamW part, one LR schedule drives both, a state dict resumes bit for bit, ``adamw_eps`` sets the
AdamW part's eps (ref-muon's too) and bad settings are refused in one line. ``rest=adafactor`` (the
default) and ``ref-muon`` keep their numbers (tests/test_references.py builds them by hand)."""

import io

import pytest
import torch
from torch import nn

from grassopt import registry
from grassopt.bench.cli import parse_variant
from grassopt.references import AdafactorAdamW, HiddenAndAdamW, MuonAdamW
from grassopt.targets import hidden_matrices
from grassopt.train import cli as train_cli
from grassopt.train.loop import TrainConfig, build_optimizer, train

from test_references import VOCAB, assert_train_resumes, batch, nano, steps, tiny_corpus  # the nano Llama and its steps, shared

LR, WD = 1e-2, 0.1
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(model, lr=LR, wd=WD, plain_lr=None, plain_weight_decay=None, preset="ref-adafactor", **options):
    if preset == "ref-adafactor":
        options = {"rest": "adamw", **options}
    return build_optimizer(model, TrainConfig(preset=preset, lr=lr, weight_decay=wd, plain_lr=plain_lr,
                                              plain_weight_decay=plain_weight_decay, options=options))


def is_hidden(name):
    return name.split(".")[-2] in HIDDEN


def split(model):
    hidden = [p for n, p in model.named_parameters() if is_hidden(n)]
    rest = [p for n, p in model.named_parameters() if not is_hidden(n)]
    return hidden, rest


def one_line(e):
    return "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- what is built
def test_adafactor_on_the_hidden_matrices_adamw_on_the_rest_with_their_own_states():
    m = nano()
    opt = build(m)
    assert isinstance(opt, AdafactorAdamW) and isinstance(opt, HiddenAndAdamW)
    assert isinstance(opt.adafactor, torch.optim.Adafactor) and isinstance(opt.adamw, torch.optim.AdamW)
    assert opt.optimizers == [opt.adafactor, opt.adamw]
    # the hidden matrices: those ref-muon gives Muon, those grassopt's presets project
    names = {id(p): n for n, p in m.named_parameters()}
    ada = {names[id(p)] for g in opt.adafactor.param_groups for p in g["params"]}
    m2 = nano()
    names2 = {id(p): n for n, p in m2.named_parameters()}
    muon = {names2[id(p)] for g in build(m2, preset="ref-muon").muon.param_groups for p in g["params"]}
    assert ada == {n for n in names.values() if is_hidden(n)} == muon == {f"{n}.weight" for n, _ in hidden_matrices(m)}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert adamw == set(names.values()) - ada and {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= adamw
    # param_groups: Adafactor's own group dicts first, then AdamW's
    assert all(a is b for a, b in zip(opt.param_groups, opt.adafactor.param_groups + opt.adamw.param_groups))
    assert len(opt.param_groups) == len(opt.adafactor.param_groups) + len(opt.adamw.param_groups) == 3
    steps(m, opt, 1)
    for n, p in m.named_parameters():
        keys = set(opt.state[p])
        if is_hidden(n):  # factored second moment (a row and a column statistic), no first moment
            assert keys == {"step", "row_var", "col_var"}, n
            assert opt.state[p]["row_var"].shape == (p.shape[0], 1) and opt.state[p]["col_var"].shape == (1, p.shape[1])
        else:
            assert keys == {"step", "exp_avg", "exp_avg_sq"}, n
    assert len(opt.state) == len(list(m.parameters()))
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))]})


def test_rest_adafactor_is_the_default_and_unchanged():
    m = nano()
    default = build_optimizer(m, TrainConfig(preset="ref-adafactor", lr=LR, weight_decay=WD))
    given = build_optimizer(m, TrainConfig(preset="ref-adafactor", lr=LR, weight_decay=WD,
                                           options={"rest": "adafactor"}))
    assert type(default) is type(given) is torch.optim.Adafactor
    assert [len(g["params"]) for g in default.param_groups] == [len(g["params"]) for g in given.param_groups]
    a, b = nano(), nano()
    steps(a, build_optimizer(a, TrainConfig(preset="ref-adafactor", lr=LR, weight_decay=WD)), 3)
    steps(b, torch.optim.Adafactor([{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": WD},
                                    {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                   lr=LR), 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------------------- each part, by hand
def adamw_groups(rest, wd, lr=None):
    extra = {} if lr is None else {"lr": lr}
    return [g for g in ({"params": [p for p in rest if p.dim() >= 2], "weight_decay": wd, **extra},
                        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, **extra}) if g["params"]]


@pytest.mark.parametrize("kw", [{}, {"plain_lr": 3e-3, "plain_weight_decay": 0.0, "adamw_eps": 1e-6},
                                {"betas": (0.9, 0.95), "beta2_decay": -0.5, "d": 2.0}])
def test_each_part_steps_exactly_like_the_package_optimizer_on_its_parameters(kw):
    kw = dict(kw)
    plain_lr, plain_wd = kw.pop("plain_lr", None), kw.pop("plain_weight_decay", None)
    ours_model, hand_model = nano(), nano()
    ours = build(ours_model, plain_lr=plain_lr, plain_weight_decay=plain_wd, **kw)
    hidden, rest = split(hand_model)
    adafactor = torch.optim.Adafactor(hidden, lr=LR, weight_decay=WD, beta2_decay=kw.get("beta2_decay", -0.8),
                                      d=kw.get("d", 1.0))
    adamw = torch.optim.AdamW(adamw_groups(rest, WD if plain_wd is None else plain_wd, plain_lr), lr=LR,
                              betas=kw.get("betas", (0.9, 0.999)), eps=kw.get("adamw_eps", 1e-8))
    x, y = batch()
    for _ in range(3):  # the same gradients: both models stay equal at every step
        for model in (ours_model, hand_model):
            _, loss = model(x, y)
            loss.backward()
        ours.step()
        adafactor.step()
        adamw.step()
        for o in (ours, adafactor, adamw):
            o.zero_grad(set_to_none=True)
        for (n, a), b in zip(ours_model.named_parameters(), hand_model.parameters()):
            assert torch.equal(a, b), n
    assert all(not torch.equal(a, b) for a, b in zip(ours_model.parameters(), nano().parameters()))
    # and the states are those of the hand-built ones
    for (n, a), b in zip(ours_model.named_parameters(), hand_model.parameters()):
        mine, theirs = ours.state[a], (adafactor if is_hidden(n) else adamw).state[b]
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), n


def test_it_lowers_the_loss():
    m = nano()
    losses = steps(m, build(m, plain_lr=3e-3), 6)
    assert losses[-1] < losses[0] - 0.3, losses


# ---------------------------------------------------------------------------------------- rates, schedule, eps
def test_plain_rates_reach_the_adamw_groups_and_the_hidden_matrices_keep_lr():
    m = nano()
    opt = build(m, plain_lr=3e-3, plain_weight_decay=0.01)
    assert [(g["lr"], g["weight_decay"]) for g in opt.adafactor.param_groups] == [(LR, WD)]
    assert [(g["lr"], g["weight_decay"]) for g in opt.adamw.param_groups] == [(3e-3, 0.01), (3e-3, 0.0)]
    # through the registry too (grassopt.registry.build, as the bench and the library call it)
    opt = registry.build("ref-adafactor", nano(), lr=LR, weight_decay=WD, options={"rest": "adamw"}, plain_lr=2e-3)
    assert {g["lr"] for g in opt.adamw.param_groups} == {2e-3} and opt.adafactor.param_groups[0]["lr"] == LR
    assert [g["weight_decay"] for g in opt.adamw.param_groups] == [WD, 0.0]  # plain_weight_decay: None -> WD


def test_one_lr_schedule_scales_every_group_of_both_parts():
    m = nano()
    opt = build(m, plain_lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    steps(m, opt, 2, sched)
    assert [g["lr"] for g in opt.adafactor.param_groups] == [LR * 0.25]
    assert [g["lr"] for g in opt.adamw.param_groups] == [3e-3 * 0.25] * 2
    assert [g["lr"] for g in opt.param_groups] == [LR * 0.25] + [3e-3 * 0.25] * 2


def test_adamw_eps_reaches_the_adamw_part_of_both_references():
    m = nano()
    assert {g["eps"] for g in build(m).adamw.param_groups} == {1e-8}  # torch's default: unchanged numbers
    assert {g["eps"] for g in build(m, adamw_eps=1e-6).adamw.param_groups} == {1e-6}
    assert build(m, adamw_eps=1e-6).adafactor.param_groups[0]["eps"] == (None, 1e-3)  # Adafactor's own eps
    assert {g["eps"] for g in build(m, preset="ref-muon").adamw.param_groups} == {1e-8}
    muon = build(m, preset="ref-muon", adamw_eps=1e-6)
    assert isinstance(muon, MuonAdamW) and {g["eps"] for g in muon.adamw.param_groups} == {1e-6}
    # ref-muon's older name for it, eps, still works (a saved run's options), and the two agree
    assert {g["eps"] for g in build(m, preset="ref-muon", eps=1e-6).adamw.param_groups} == {1e-6}
    assert {g["eps"] for g in build(m, preset="ref-muon", eps=1e-6, adamw_eps=1e-6).adamw.param_groups} == {1e-6}
    with pytest.raises(ValueError, match="ref-muon: eps=1e-06 and adamw_eps=1e-07 are the same setting") as e:
        build(m, preset="ref-muon", eps=1e-6, adamw_eps=1e-7)
    assert one_line(e)


@pytest.mark.parametrize("options, message", [
    ({"rest": "sgd"}, r"ref-adafactor: rest='sgd' is not one of \['adafactor', 'adamw'\]"),
    ({"rest": "AdamW"}, r"ref-adafactor: rest='AdamW' is not one of"),
    ({"rest": None}, r"ref-adafactor: rest=None is not one of"),
    ({"rest": "adamw", "adamw_eps": -1.0}, r"ref-adafactor: adamw_eps=-1.0 must be a number >= 0 and finite"),
    ({"rest": "adamw", "adamw_eps": "small"}, r"ref-adafactor: adamw_eps='small' must be a number"),
    ({"adamw_eps": 1e-6}, r"ref-adafactor: adamw_eps is the eps of the AdamW part, which only rest=adamw has"),
    ({"rest": "adamw", "adamw_betas": (0.9, 0.95)}, r"unknown setting\(s\) \['adamw_betas'\] for ref-adafactor; "
                                                     r"it takes \['adamw_eps', 'beta2_decay', 'd', 'eps', 'rest'\]"),
])
def test_bad_settings_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as e:
        registry.build("ref-adafactor", nano(), lr=LR, options=options)
    assert one_line(e)


def test_bench_variant_and_train_opt_spell_it(tmp_path):
    name, fields, options = parse_variant("ref-adafactor:rest=adamw,adamw_eps=1e-6,plain_lr=3e-3")
    assert (name, fields, options) == ("ref-adafactor", {"plain_lr": 3e-3}, {"rest": "adamw", "adamw_eps": 1e-6})
    c = train_cli.config_from_args(train_cli.parser().parse_args(
        ["--preset", "ref-adafactor", "--opt", "rest=adamw", "--opt", "adamw_eps=1e-6"]))
    assert c.options == {"rest": "adamw", "adamw_eps": 1e-6}
    assert isinstance(build_optimizer(nano(), c), AdafactorAdamW)


# ---------------------------------------------------------------------------------------- checkpoints
def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_continues_bit_identically():
    def fresh():
        m = nano()
        opt = build(m, plain_lr=3e-3, adamw_eps=1e-6)
        return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))

    m, opt, sched = fresh()
    steps(m, opt, 3, sched)
    ckpt = save_load({"model": m.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    assert len(ckpt["opt"]["param_groups"]) == 3 and len(ckpt["opt"]["state"]) == len(list(m.parameters()))
    m2, opt2, sched2 = fresh()
    m2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert all(a is b for a, b in zip(opt2.param_groups, opt2.adafactor.param_groups + opt2.adamw.param_groups))
    steps(m, opt, 3, sched)
    steps(m2, opt2, 3, sched2)
    for (n, a), b in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups] == \
        pytest.approx([LR / 7, 3e-3 / 7, 3e-3 / 7])


def test_a_state_dict_of_another_shape_is_refused_in_one_line():
    m = nano()
    opt = build(m)
    steps(m, opt, 1)
    plain = torch.optim.Adafactor(m.parameters(), lr=LR)  # rest=adafactor's: one group
    with pytest.raises(ValueError, match="loaded state dict has 1 parameter groups, AdafactorAdamW has 3") as e:
        opt.load_state_dict(plain.state_dict())
    assert one_line(e)
    sd = opt.state_dict()
    moved = sd["param_groups"][0]["params"].pop()  # same number of groups, one parameter in the other part
    sd["param_groups"][1]["params"].insert(0, moved)
    n = len(split(m)[0])
    with pytest.raises(ValueError, match=f"loaded state dict's parameter group 0 has {n - 1} parameters, "
                                         f"AdafactorAdamW's has {n}") as e:
        opt.load_state_dict(sd)
    assert one_line(e)


def test_any_torch_optimizer_can_take_the_hidden_matrices():
    m = nano()
    hidden, rest = split(m)
    opt = HiddenAndAdamW(torch.optim.SGD(hidden, lr=0.1, momentum=0.9), torch.optim.AdamW(rest, lr=1e-3))
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1e-3]
    steps(m, opt, 2)
    assert set(opt.state[hidden[0]]) == {"momentum_buffer"} and "exp_avg" in opt.state[rest[0]]
    opt2 = HiddenAndAdamW(torch.optim.SGD(hidden, lr=0.1, momentum=0.9), None)  # nothing else to train
    assert opt2.adamw is None and opt2.optimizers == [opt2.hidden_optimizer]
    opt2.load_state_dict(HiddenAndAdamW(torch.optim.SGD(hidden, lr=0.1, momentum=0.9), None).state_dict())


# ---------------------------------------------------------------------------------------- grassopt train
def test_grassopt_train_resume_equals_one_run_bit_for_bit(tmp_path):
    data = tiny_corpus()

    def cfg(out, **kw):
        return TrainConfig(model="nano", vocab_size=VOCAB, seq_len=32, batch_size=2, steps=5, lr=LR, plain_lr=3e-3,
                           preset="ref-adafactor", options={"rest": "adamw", "adamw_eps": 1e-6}, eval_every=5,
                           eval_tokens=128, log_every=2, progress=False, plot=False, threads=1,
                           out=str(tmp_path / out), **kw)

    assert_train_resumes(cfg, data, tmp_path)


def test_grassopt_train_refuses_a_bad_rest_in_one_line(tmp_path, monkeypatch, capsys):
    data = tiny_corpus()
    monkeypatch.setattr(train_cli, "train", lambda c: train(c, dataset=data))
    code = train_cli.main(["--preset", "ref-adafactor", "--opt", "rest=sgd", "--model", "nano", "--vocab-size",
                           str(VOCAB), "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--no-progress",
                           "--no-plot", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("grassopt train: error: ref-adafactor: rest='sgd' is not one of"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written
