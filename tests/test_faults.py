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
