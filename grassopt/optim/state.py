"""One declaration of a parameter's optimizer state: :func:`state_spec`.

It is read by the optimizer when it creates state (:func:`init_state`), by ``load_state_dict``'s
checks, and by the memory accounting (``grassopt.memory.param_state_bytes``, hence
``grassopt.train.estimate``): no other copy of a layout or of a byte count exists.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..codecs import get_codec
from ..rules import get_rule, rule_flag

__all__ = ["state_spec", "spec_bytes", "category", "moment_shape", "init_state"]

#: a spec entry: ``(torch dtype, shape)`` for a tensor, ``(int, None)`` for a count or seed,
#: ``(str, None)`` for a codec's checkpoint field
Spec = dict[str, tuple[Any, tuple[int, ...] | None]]


def moment_shape(group: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a parameter's Adam moments: ``k x r`` when projected (``k`` its long side), else
    the parameter's."""
    if group.get("rank") is None:
        return tuple(shape)
    return (max(shape), group["rank"])


def state_spec(group: dict[str, Any], shape: tuple[int, ...] | torch.Size) -> Spec:
    """``{key: (dtype, shape)}`` of the state of a parameter of ``shape`` in ``group`` (a complete
    group: every option present, as the optimizer holds it), once it has been stepped.

    Plain: ``step`` and the moments of the parameter's shape. Projected ``m x n`` at rank ``r``
    (``d = min``, ``k = max``): ``step``, ``adam_step``; the basis ``Q`` (``d x r``) or, for a rule
    that regenerates it, its ``seed``; the moments (``k x r``); ``residual_norm`` (the limiter's
    previous norm) with recovery or APOLLO's scaling; ``error`` (``m x n``) with error feedback. The
    moments are stored as the group's ``state_dtype`` codec lays them out (with its fields).
    """
    shape = tuple(shape)
    codec = get_codec(group.get("state_dtype", "float32"))
    f32 = torch.float32
    spec: Spec = {"step": (int, None)}
    if group.get("rank") is not None:
        rank = group["rank"]
        spec["adam_step"] = (int, None)
        if rule_flag(get_rule(group["rule"]), "FROM_SEED"):
            spec["seed"] = (int, None)
        else:
            spec["Q"] = (f32, (min(shape), rank))
        if group["recovery"] or group["scaling"] is not None:
            spec["residual_norm"] = (f32, ())
        if group["error_feedback"]:
            spec["error"] = (f32, shape)
    spec.update(codec.layout(moment_shape(group, shape)))
    spec.update({k: (str, None) for k in codec.FIELDS})
    return spec


def category(key: str, group: dict[str, Any]) -> str:
    """``bases`` (``Q``), ``moments`` (what the codec stores) or ``other`` (the limiter's norm,
    LDAdam's error buffer)."""
    if key == "Q":
        return "bases"
    return "moments" if key in get_codec(group.get("state_dtype", "float32")).layout((1,)) else "other"


def spec_bytes(group: dict[str, Any], shape: tuple[int, ...] | torch.Size,
               element_size: int | None = None) -> dict[str, int]:
    """Bytes of the tensors of :func:`state_spec` by category (``bases``, ``moments``, ``other``);
    with ``element_size``, every element priced at that size instead of its dtype's."""
    out = {"bases": 0, "moments": 0, "other": 0}
    for key, (dtype, shp) in state_spec(group, shape).items():
        if isinstance(dtype, torch.dtype):
            size = element_size if element_size is not None else dtype.itemsize
            out[category(key, group)] += math.prod(shp) * size
    return out


def init_state(state: dict, group: dict[str, Any], p: torch.Tensor) -> None:
    """The state of :func:`state_spec` at a parameter's first step, but for what the step itself
    computes (the basis ``Q`` or its ``seed``, the error buffer): zero step counts, zero moments in the
    group's codec (a plain parameter's float32 moments follow its layout and tensor type), and the
    limiter's previous norm at zero."""
    spec = state_spec(group, tuple(p.shape))
    for key in ("step", "adam_step"):
        if key in spec:
            state[key] = 0
    projected = group.get("rank") is not None
    get_codec(group["state_dtype"]).init(state, moment_shape(group, tuple(p.shape)), p.device,
                                         like=None if projected else p)
    if "residual_norm" in spec:
        dtype, shape = spec["residual_norm"]
        state["residual_norm"] = torch.zeros(shape, dtype=dtype, device=p.device)
