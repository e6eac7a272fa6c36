"""The param-group options declared once (grassopt.options.OPTIONS), and the rounding generator kept
apart from the rules' (stochastic rounding never moves a basis)."""

import copy
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import grassopt
from grassopt import SubspaceAdamW
from grassopt.optim._projected import mix_seed
from grassopt.options import OPTIONS, STRUCTURAL_KEYS, SUBSPACE_DEFAULTS, UNSET, markdown, preset_option_names
from grassopt.rules import all_rule_options
from resume import assert_resumes_bit_identically

DOCS = Path(__file__).resolve().parent.parent / "docs" / "algorithms.md"


# ---------------------------------------------------------------------------- the table
def test_the_docs_show_the_table():
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(r"<!-- options table:[^\n]*-->\n(.*?)<!-- end of options table -->", text, re.S)
    assert found, "docs/algorithms.md lost its options table markers"
    assert found.group(1) == markdown(), "docs/algorithms.md#options is stale: paste grassopt.options.markdown()"


def test_the_constructor_defaults_are_the_tables():
    sig = inspect.signature(SubspaceAdamW)
    for name, par in sig.parameters.items():
        if name != "params":
            assert OPTIONS[name].default == par.default, name
            assert OPTIONS[name].scope in ("group", "optimizer"), name
    assert SUBSPACE_DEFAULTS == {k: o.default for k, o in OPTIONS.items() if o.scope == "subspace" and k != "rank"}


@pytest.mark.parametrize("preset", [p for p in grassopt.PRESETS if grassopt.PRESETS[p] is not None])
def test_every_key_of_a_completed_group_is_declared(preset):
    model = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 4))
    opt = grassopt.make_optimizer(model, preset, rank=2)
    declared = set(OPTIONS) | all_rule_options() | STRUCTURAL_KEYS
    for group in opt.param_groups:
        assert set(group) <= declared, sorted(set(group) - declared)
    assert set(grassopt.PRESETS[preset]) <= set(preset_option_names())


ALTERNATIVES = {"state_dtype": "int8", "rank": 3, "rule": "svd", "transport": "keep", "recovery": False,
                "scaling": "channel", "error_feedback": True, "basis_dtype": "int8"}


def test_every_option_that_fixes_the_states_meaning_is_checked_on_load():
    assert set(ALTERNATIVES) == {k for k, o in OPTIONS.items() if o.changes_state_meaning}
    w = nn.Parameter(torch.randn(10, 12))
    opt = SubspaceAdamW([{"params": [w], "rank": 4}])
    w.grad = torch.randn(10, 12)
    opt.step()
    for key, value in ALTERNATIVES.items():
        sd = copy.deepcopy(opt.state_dict())
        sd["param_groups"][0][key] = value
        with pytest.raises(ValueError, match=f"param group 0: the saved (optimizer|state) has .*{key}") as info:
            opt.load_state_dict(sd)
        assert "\n" not in str(info.value)


def test_every_checked_option_refuses_a_wrong_type_in_one_line():
    w = nn.Parameter(torch.randn(10, 12))
    for key, o in OPTIONS.items():
        if o.scope == "optimizer" or (o.check is None and o.choices is None):
            continue
        group = {"params": [w], "rank": 4, key: object()}
        with pytest.raises(ValueError, match=f"param group 0: .*{key}") as info:
            SubspaceAdamW([group])
        assert "\n" not in str(info.value), key
    with pytest.raises(ValueError, match=r"^fused=1 must be None \(automatic\), True or False$"):
        SubspaceAdamW([w], fused=1)
    assert all(o.default is UNSET or o.message(k, o.default) is None for k, o in OPTIONS.items())


# ---------------------------------------------------------------------------- the rounding generator
def _bf16_run(rule, stochastic_rounding, steps=6):
    """Bases (every step) of two bf16 matrices under ``rule`` with a basis update at every step."""
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(12, 20).bfloat16()), nn.Parameter(torch.randn(20, 12).bfloat16())]
    opt = SubspaceAdamW([{"params": ps, "rank": 3, "rule": rule, "update_interval": 1}], lr=1e-2, seed=5,
                        stochastic_rounding=stochastic_rounding)
    g = torch.Generator().manual_seed(1)
    bases = []
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).bfloat16()
        opt.step()
        bases.append([opt.basis(p).clone() for p in ps])
    return bases, [p.detach().clone() for p in ps]


@pytest.mark.parametrize("rule", ["walk", "jump"])
def test_stochastic_rounding_does_not_change_the_bases(rule):
    nearest, w_nearest = _bf16_run(rule, False)
    rounded, w_rounded = _bf16_run(rule, True)
    for step, (a, b) in enumerate(zip(nearest, rounded)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {step}"
    assert any(not torch.equal(x, y) for x, y in zip(w_nearest, w_rounded))  # the rounding did act


def test_a_stochastically_rounded_run_resumes_bit_identically(tmp_path):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 12), nn.Tanh(), nn.Linear(12, 4))
        model = model.to(torch.bfloat16)
        return model, grassopt.make_optimizer(model, "grasswalk", lr=1e-2, rank=3, update_interval=2, seed=7,
                                              stochastic_rounding=True)

    data = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)).bfloat16(),
             torch.randn(8, 4, generator=torch.Generator().manual_seed(100 + i)).bfloat16()) for i in range(9)]

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.mse_loss(model(x).float(), y.float()).backward()
            opt.step()

    ckpt = assert_resumes_bit_identically(build, train, data, 5, tmp_path / "ckpt.pt")
    states = ckpt["opt"]["state"].values()
    assert all("rounding_rng_state" in s for s in states)  # every parameter is bf16: all round
    assert any("rng_state" in s for s in states)  # the walk's draws, apart


def test_a_checkpoint_without_a_rounding_generator_reseeds_it():
    p = nn.Parameter(torch.randn(12, 20).bfloat16())
    q = nn.Parameter(torch.randn(5).bfloat16())

    def make():
        return SubspaceAdamW([{"params": [p], "rank": 3, "rule": "walk", "update_interval": 1}, {"params": [q]}],
                             lr=1e-2, seed=9, stochastic_rounding=True)

    opt = make()
    for t in range(2):
        p.grad, q.grad = torch.ones(12, 20).bfloat16() * (t + 1), torch.ones(5).bfloat16()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        del st["rounding_rng_state"]  # as written before the rounding generator existed
    fresh = make()
    fresh.load_state_dict(sd)
    for index, t in enumerate((p, q)):
        want = torch.Generator().manual_seed(mix_seed(mix_seed(9, index), 1)).get_state()
        assert torch.equal(fresh._rounding_generator(t).get_state(), want)
        assert torch.equal(fresh._generator(t).get_state(), opt._generator(t).get_state())
