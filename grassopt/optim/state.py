"""One declaration of a parameter's optimizer state: :func:`state_spec`.

It is read by the optimizer when it creates state (:func:`init_state`), by ``load_state_dict``'s
checks (:func:`check_state_dict`, here), and by the memory accounting (``grassopt.memory.param_state_bytes``, hence
``grassopt.train.estimate``): no other copy of a layout or of a byte count exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from .. import bases
from ..codecs import MOMENT_KEYS, detect, fits, get_codec
from ..options import OPTIONS, SUBSPACE_DEFAULTS, check_group
from ..rules import get_rule, rule_flag

__all__ = ["state_spec", "spec_bytes", "category", "moment_shape", "init_state", "check_state_dict",
           "check_param_state", "RNG_KEYS"]

#: The generator states a parameter's saved state may carry besides :func:`state_spec`'s entries: the
#: rules' draws (``rng_state``) and the rounding's (``rounding_rng_state``: stochastic rounding of a
#: low-precision weight, a codec's stochastic rounding), two streams of ``(seed, parameter index)``.
RNG_KEYS = ("rng_state", "rounding_rng_state")
_NON_NEGATIVE = {"residual_norm", "Q_scale"}  # state keys besides the codecs' own (Codec.NON_NEGATIVE)

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
    (``d = min``, ``k = max``): ``step``, ``adam_step``; the basis ``Q`` (``d x r``, stored as the group's
    ``basis_dtype`` lays it out, :func:`grassopt.bases.layout`) or, for a rule
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
            spec.update(bases.layout(group.get("basis_dtype", "float32"), min(shape), rank))
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
    if key in bases.KEYS:
        return "bases"
    return "moments" if key in get_codec(group.get("state_dtype", "float32")).keys() else "other"


def spec_bytes(group: dict[str, Any], shape: tuple[int, ...] | torch.Size,
               element_size: int | None = None) -> dict[str, int]:
    """Bytes of the tensors of :func:`state_spec` by category (``bases``, ``moments``, ``other``);
    with ``element_size``, every element priced at that size instead of its dtype's."""
    out = {"bases": 0, "moments": 0, "other": 0}
    for key, (dtype, shp) in state_spec(group, shape).items():
        if isinstance(dtype, torch.dtype):
            size = element_size if element_size is not None else dtype.itemsize
            out[category(key, group)] += math.prod(shp or ()) * size
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
        state["residual_norm"] = torch.zeros(shape or (), dtype=dtype, device=p.device)


# ---------------------------------------------------------------------------- load_state_dict's checks
#: ``(group index, index in the group, saved state, {rng key: generator})`` for each saved state
Plan = list[tuple[int, int, dict[str, Any], dict[str, torch.Generator]]]


def check_state_dict(state_dict: Any, groups: list[dict[str, Any]], defaults: dict[str, Any],
                     name_of: Callable[[int, int], str]) -> Plan:
    """Check a state dict against an optimizer's complete ``groups`` (``defaults``: its constructor's;
    ``name_of(gi, i)`` names a parameter) without changing anything: the groups and their sizes, the
    options that fix what the state means (:data:`grassopt.options.OPTIONS`, ``changes_state_meaning``)
    equal, the saved options valid, every parameter's state complete and sound
    (:func:`check_param_state`). One-line ``ValueError`` otherwise."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"not an optimizer state dict: got {type(state_dict).__name__}")
    saved, theirs_all = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(saved, dict) or not isinstance(theirs_all, list) or not all(isinstance(g, dict) for g in theirs_all):
        raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
    if len(theirs_all) != len(groups):
        raise ValueError(f"the saved optimizer has {len(theirs_all)} param groups but this one has "
                         f"{len(groups)}; build the optimizer with the same groups before loading")
    id_map: dict[Any, tuple[int, int]] = {}
    for gi, (mine, theirs) in enumerate(zip(groups, theirs_all)):
        ids = theirs.get("params")
        if not isinstance(ids, list) or len(ids) != len(mine["params"]):
            n = len(ids) if isinstance(ids, list) else "no"
            raise ValueError(f"param group {gi}: the saved optimizer has {n} parameters but this one has "
                             f"{len(mine['params'])}; build the optimizer from the same model and groups")
        for i, k in enumerate(ids):
            id_map[k] = (gi, i)
        _check_saved_group(gi, mine, theirs, defaults)
    plan: Plan = []
    for key, st in saved.items():
        if key not in id_map:
            raise ValueError(f"the saved state has an entry for parameter {key!r} but the saved param groups "
                             f"list only {len(id_map)} parameters; the state dict is corrupt")
        gi, i = id_map[key]
        where = f"the saved state of {name_of(gi, i)}"
        if not isinstance(st, dict):
            raise ValueError(f"{where} is a {type(st).__name__}, not a dict; the state dict is corrupt")
        plan.append((gi, i, st, check_param_state(groups[gi], groups[gi]["params"][i], st, where)))
    return plan


def _check_saved_group(gi: int, mine: dict[str, Any], theirs: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A saved param group against this optimizer's: the options that fix the state's meaning equal
    (``rank`` first), the others valid (the table's checks)."""
    projected = "rank" in mine
    keys = ["rank"] + [k for k, o in OPTIONS.items() if o.changes_state_meaning and k != "rank"]
    for key in keys:
        opt = OPTIONS[key]
        if key == "rank":
            saved = theirs.get("rank")
            differs = ("rank" in theirs) != projected or saved != mine.get("rank")
        elif opt.scope == "subspace" and not projected:
            continue
        else:  # a state dict saved before the option existed has its default
            saved = theirs.get(key, opt.default)
            differs = saved != mine[key]
        if differs:
            msg = opt.mismatch or "the saved optimizer has {key}={saved!r} but this one has {key}={mine!r}"
            raise ValueError(f"param group {gi}: " + msg.format(key=key, saved=saved, mine=mine.get(key)))
    complete = {**defaults, **SUBSPACE_DEFAULTS, **theirs, "params": mine["params"],
                "param_names": mine.get("param_names")}
    if projected:
        complete = {**get_rule(mine["rule"]).OPTIONS, **complete}
    else:
        complete = {k: v for k, v in complete.items() if k not in SUBSPACE_DEFAULTS}
    try:
        check_group(complete, f"param group {gi}")
    except ValueError as e:
        raise ValueError(f"the saved optimizer state: {e}") from None


def _load_generator(v: Any, p: Tensor, key: str, where: str) -> torch.Generator:
    try:
        if not isinstance(v, Tensor):
            raise TypeError
        gen = torch.Generator(device=p.device)
        gen.set_state(v.to("cpu", torch.uint8))
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"{where}: {key} is not a generator state for {p.device}; the checkpoint is "
                         "corrupt or from another device") from None
    return gen


def check_param_state(group: dict[str, Any], p: Tensor, st: dict[str, Any], where: str) -> dict[str, torch.Generator]:
    """Check one parameter's saved state (``where`` names it) against :func:`state_spec`; return its
    saved generators (:data:`RNG_KEYS`)."""
    gens = {k: _load_generator(st[k], p, k, where) for k in RNG_KEYS if k in st}
    if set(st) <= set(RNG_KEYS):
        return gens  # never stepped
    codec = get_codec(group["state_dtype"])
    has = detect(st)
    # another codec's layout, unless the state only lacks some of this codec's keys (then: incomplete)
    if has is not None and has != codec.NAME and not fits(codec, st) and not set(st) & MOMENT_KEYS <= codec.keys():
        raise ValueError(f"{where} has {has} moments but its group has state_dtype={group['state_dtype']!r}; "
                         "build the optimizer with the state_dtype it was saved with")
    need = state_spec(group, tuple(p.shape))
    missing = [k for k in need if k not in st and k not in codec.FIELDS]
    extra = [k for k in st if k not in need and k not in RNG_KEYS]
    if missing or extra:
        what = (f"lacks {missing}" if missing else "") + (" and " if missing and extra else "") + \
               (f"has unexpected {extra}" if extra else "")
        raise ValueError(f"{where} {what}; the checkpoint is incomplete or from another optimizer or settings")
    for k, (dtype, shape) in need.items():
        if k in st:
            _check_state_value(k, st[k], dtype, shape, codec, p, where)
    if "adam_step" in need and st["adam_step"] > st["step"]:
        raise ValueError(f"{where}: adam_step={st['adam_step']} exceeds step={st['step']}; the state dict is corrupt")
    return gens


def _check_state_value(k: str, v: Any, dtype: Any, shape: tuple | None, codec, p: Tensor, where: str) -> None:
    """One saved state entry against its :func:`state_spec` entry."""
    if dtype is int:
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{where}: {k}={v!r} must be an integer >= 0; the state dict is corrupt")
        return
    if dtype is str:
        msg = codec.field_error(k, v)
        if msg:
            raise ValueError(f"{where}: {msg}; the checkpoint is from another version or corrupt")
        return
    if not isinstance(v, Tensor) or v.dtype != dtype or tuple(v.shape) != shape:
        got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{where}: {k} is {got} but this optimizer needs {dtype} {shape}; the checkpoint "
                         f"is of another model or settings (parameter shape {tuple(p.shape)})")
    if dtype.is_floating_point:
        non_negative = k in _NON_NEGATIVE or k in codec.NON_NEGATIVE
        if not (bool(v.isfinite().all()) and (not non_negative or bool((v >= 0).all()))):
            rule = "finite and >= 0" if non_negative else "finite"
            raise ValueError(f"{where}: {k} is not {rule} (NaN, inf or a wrong sign: a corrupt checkpoint, "
                             "or state saved after a divergence); load an earlier checkpoint")
