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
    ({"state_dtype": None}, "param group 0: state_dtype=None must be one of ['float32', 'int8']"),
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
