"""The parameters of a new param group: normalised (:func:`normalize_params`) and checked
(:func:`check_params`) before :class:`grassopt.SubspaceAdamW` adds the group. The options' checks
are :mod:`grassopt.options`'."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .._dtensor import check_params as check_sharding  # FSDP2 shards: a clear error now, not wrong maths later

__all__ = ["normalize_params", "check_params"]


def normalize_params(param_group: dict[str, Any], where: str) -> dict[str, Any]:
    """A new dict: ``params`` a list of tensors, the names of ``(name, tensor)`` pairs moved to
    ``param_names``. Changes nothing."""
    group = dict(param_group)
    if "params" not in group:
        raise ValueError(f"{where} has no 'params': give a list of tensors or (name, tensor) pairs")
    params = group["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, (set, frozenset)):
        raise TypeError(f"{where}: params must be an ordered collection such as a list, not a set "
                        "(the order of a set changes between runs)")
    elif isinstance(params, (dict, str)) or not isinstance(params, Iterable):
        raise TypeError(f"{where}: params must be a list of tensors or (name, tensor) pairs, got "
                        f"{type(params).__name__} (use model.parameters() or model.named_parameters())")
    params = list(params)
    named = [isinstance(p, tuple) for p in params]
    if any(named):
        if not all(named) or not all(len(p) == 2 and isinstance(p[0], str) for p in params):
            raise ValueError(f"{where}: params must be all tensors or all (name, tensor) pairs")
        group["param_names"] = [n for n, _ in params]
        params = [p for _, p in params]
    group["params"] = params
    return group


def _param_error(name: str, p: Any, shapes_only: bool) -> str | None:
    if p.is_meta and not shapes_only:
        return (f"{name} is on the meta device (it has no data); materialize the model "
                "(module.to_empty(device=...) then initialize it) before building the optimizer")
    if p.layout != torch.strided:
        return f"{name} has layout {p.layout}; only dense (strided) tensors can be trained (convert it with .to_dense())"
    if p.is_complex():
        return (f"{name} has dtype {p.dtype}; complex parameters are not supported "
                "(train torch.view_as_real of it instead)")
    if not p.dtype.is_floating_point:
        return (f"{name} has dtype {p.dtype}; only floating-point tensors can be trained (leave it out of the "
                "optimizer, or make it a float tensor)")
    if not (p.is_leaf or p.retains_grad):
        return f"{name} is not a leaf tensor (it was computed from others); pass the nn.Parameter it comes from"
    return None


def check_params(group: dict[str, Any], where: str, others: list[dict[str, Any]], shapes_only: bool) -> None:
    """The parameters of a new group: dense floating-point leaf tensors with data (``shapes_only``: meta
    tensors too), each in one group once (``others``: the groups already added). Raises before
    anything changes."""
    params = group["params"]
    names = group.get("param_names")
    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != len(params)
                              or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"{where}: param_names must be a list of {len(params)} strings, one per parameter")
    names = names or [f"parameter {j}" for j in range(len(params))]
    seen: dict[int, str] = {}
    for name, p in zip(names, params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{where}: {name} is a {type(p).__name__}, not a tensor; pass tensors or "
                            "(name, tensor) pairs (model.parameters() or model.named_parameters())")
        msg = _param_error(name, p, shapes_only)
        if msg:
            raise ValueError(f"{where}: {msg}")
        if id(p) in seen:
            raise ValueError(f"{where}: {name} is listed twice in the group (also as {seen[id(p)]}); "
                             "list each parameter once")
        seen[id(p)] = name
    for gj, other in enumerate(others):
        for j, q in enumerate(other["params"]):
            if id(q) in seen:
                as_ = other["param_names"][j] if other.get("param_names") else f"its parameter {j}"
                raise ValueError(f"{where}: {seen[id(q)]} is already in param group {gj} ({as_}); "
                                 "a parameter may belong to one group only")
    if "rank" in group:
        check_sharding(group)
