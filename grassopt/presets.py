"""Named presets (data, not subclasses) and ``param_groups``: from a model to optimizer groups.

A preset is a dict of component choices for a projected group (docs/algorithms.md#projected-step):
options of :data:`grassopt.options.OPTIONS` (and of the rules), the rest taking the table's defaults
(:data:`grassopt.options.SUBSPACE_DEFAULTS`). Any component can be overridden, so each ablation of the papers is a configuration, e.g.
``param_groups(model, "subtrack++", rank=64, transport="keep")`` is SubTrack++ without the
projection-aware optimizer, and ``recovery=False`` drops recovery scaling.

Ranks. A preset may have a default rank (``DEFAULT_RANKS``; 128 otherwise). A rank is an int, the
same for every matrix, or a fraction of each matrix's short side written ``"d/4"`` (``r =
max(1, d // 4)``), APOLLO's default (:func:`grassopt.targets.resolve_rank`; the layers are chosen by
:func:`grassopt.targets.select_targets`). A param group holds one int rank, so ``param_groups`` makes
one projected group per distinct rank; the optimizer and its state dict only ever see ints.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .optimizer import SubspaceAdamW
from .options import preset_option_names
from .targets import check_plain_rates, hidden_matrices, resolve_rank

__all__ = ["PRESETS", "DEFAULT_RANKS", "param_groups", "make_optimizer", "resolve_preset", "default_rank"]

#: Component choices of every preset. ``None`` means no projection (plain AdamW).
PRESETS: dict[str, dict[str, Any] | None] = {
    "adamw": None,
    "galore": {"rule": "svd", "transport": "keep", "recovery": False},
    "fira": {"rule": "svd", "transport": "keep", "recovery": True},
    "subtrack++": {"rule": "track", "transport": "rotate", "recovery": True},
    "grasswalk": {"rule": "walk", "transport": "rotate", "recovery": True},
    "grassjump": {"rule": "jump", "transport": "rotate", "recovery": True},
    # APOLLO: a Gaussian projection redrawn every T steps (moments kept) only estimates a per-channel
    # scale of the raw gradient; alpha = sqrt(APOLLO's scale), scale = 1
    "apollo": {"rule": "gaussian", "transport": "keep", "recovery": False, "scaling": "channel", "alpha": 1.0},
    # APOLLO-Mini: rank 1, one scale per tensor, scale = 128 (alpha = sqrt(128))
    "apollo-mini": {"rule": "gaussian", "transport": "keep", "recovery": False, "scaling": "tensor",
                    "alpha": math.sqrt(128)},
    # LDAdam: a warm-started power iteration at every step, rotate, full-size error feedback; no scale
    "ldadam": {"rule": "power", "transport": "rotate", "recovery": False, "error_feedback": True,
               "update_interval": 1, "alpha": 1.0},
}

#: The rank a preset uses when none is given (``"d/4"``: a quarter of each matrix's short side).
DEFAULT_RANKS: dict[str, int | str] = {"apollo": "d/4", "apollo-mini": 1}
DEFAULT_RANK = 128
def default_rank(preset: str) -> int | str:
    """The rank ``preset`` uses when none is given."""
    return DEFAULT_RANKS.get(preset, DEFAULT_RANK)

def resolve_preset(preset: str, **overrides: Any) -> dict[str, Any] | None:
    """The projected-group settings of ``preset`` with ``overrides`` applied (``None`` for plain)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset]
    if base is None:
        if overrides:
            raise ValueError(f"preset 'adamw' takes no subspace options, got {sorted(overrides)}")
        return None
    known = preset_option_names()  # the table's subspace options and the rules' (grassopt.options)
    for key in overrides:
        if key not in known:
            raise ValueError(f"unknown subspace option {key!r}; known: {sorted(known)}")
    return {**base, **overrides}


def _check_presets() -> None:
    """Every preset's keys are options of the table (a typo in ``PRESETS`` fails at import, not in a run)."""
    known = set(preset_option_names())
    for name, settings in PRESETS.items():
        unknown = sorted(set(settings or ()) - known)
        if unknown:
            raise ValueError(f"preset {name!r} sets {unknown}, which are not subspace options (grassopt.options)")


_check_presets()


def _ranks(hidden: list, rank: int | str) -> dict[int, int]:
    """``id(matrix) -> rank`` of the hidden matrices that can be projected at ``rank``; the others are
    left to plain AdamW, with a warning (pointing at the caller of :func:`param_groups`)."""
    rank_of: dict[int, int] = {}
    for name, w in hidden:
        r = resolve_rank(rank, w.shape)
        if r >= min(w.shape):
            warnings.warn(f"{name}.weight {tuple(w.shape)}: rank {r} >= min(m, n) = {min(w.shape)}; "
                          "it is trained with plain AdamW instead", stacklevel=3)
            continue
        rank_of[id(w)] = r
    return rank_of


def param_groups(
    model: nn.Module,
    preset: str = "subtrack++",
    rank: int | str | None = None,
    update_interval: int | None = None,
    targets: str | Iterable[str] = "all-linear",
    *,
    lr: float | None = None,
    weight_decay: float = 0.0,
    state_dtype: str | None = None,
    plain_lr: float | None = None,
    plain_weight_decay: float | None = None,
    plain_state_dtype: str | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Optimizer param groups for ``model``: the projected group(s) and the plain rest.

    ``rank`` is an int, ``"d/N"`` (a fraction of each matrix's short side: one projected group per
    distinct rank), or None for the preset's default (``DEFAULT_RANKS``, else 128). Only 2-D
    weights of ``nn.Linear`` modules selected by ``targets`` are projected (see
    :func:`grassopt.targets.select_targets`); embeddings, norms, biases and the output layer go to the
    plain AdamW group. A matrix whose short side is not larger than ``rank`` cannot be projected: it
    falls back to the plain group with a warning. With ``weight_decay > 0``, parameters with
    fewer than 2 dimensions (norms, biases) get no decay, as in nanoGPT. Parameters are given with
    their names, so errors and :meth:`SubspaceAdamW.diagnostics` name them. ``state_dtype`` (a moment
    format of :data:`grassopt.codecs.CODECS`: ``"float32"``, ``"int8"``, ``"factored"``, ...), when given,
    is set on every group, projected and plain; ``plain_state_dtype``, when given, on the plain groups
    (embedding, head, norms, biases) instead: e.g. int8 subspace moments beside a factored ``V`` for the
    embedding and head.

    ``plain_lr`` and ``plain_weight_decay`` are the learning rate and weight decay of the plain
    parameters, those the method does not project (embedding, head, norms, biases); None (the
    default) means the same as ``lr`` / ``weight_decay``, and the groups are then those of a
    single rate. A hidden matrix (:func:`grassopt.targets.hidden_matrices`) that falls back to plain
    AdamW (its rank is too large, or ``preset="adamw"``) keeps ``lr`` and ``weight_decay``, in a group
    of its own, as it does under ``adamw-torch``.
    """
    check_plain_rates(plain_lr, plain_weight_decay)
    split = plain_lr is not None or plain_weight_decay is not None  # else: the groups of one rate
    if update_interval is not None and PRESETS.get(preset) is not None:
        overrides["update_interval"] = update_interval
    settings = resolve_preset(preset, **overrides)
    if rank is None:
        rank = default_rank(preset)
    if settings is not None:
        resolve_rank(rank, (1 << 62, 1 << 62))  # validates the spec before looking at the model
    hidden = hidden_matrices(model, targets) if settings is not None or split else []
    rank_of = _ranks(hidden, rank) if settings is not None else {}
    kept_ids = {id(w) for _, w in hidden} if split else set()  # hidden matrices trained with AdamW at lr
    plain_wd = weight_decay if plain_weight_decay is None else plain_weight_decay
    proj: dict[int, list] = {}  # rank -> (name, parameter) pairs
    kept, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in rank_of:
            proj.setdefault(rank_of[id(p)], []).append((name, p))
        elif id(p) in kept_ids:
            kept.append((name, p))
        elif plain_wd > 0 and p.dim() < 2:
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    common = {k: v for k, v in (("lr", lr), ("state_dtype", state_dtype)) if v is not None}
    plain = {**common, **{k: v for k, v in (("lr", plain_lr), ("state_dtype", plain_state_dtype)) if v is not None}}
    groups: list[dict[str, Any]] = []
    for r, params in proj.items():
        groups.append({"params": params, "rank": r, "weight_decay": weight_decay, **(settings or {}), **common})
    if not proj and settings is not None:
        warnings.warn(f"preset {preset!r}: no parameter matched targets={targets!r}; everything is plain AdamW",
                      stacklevel=2)
    if kept:
        groups.append({"params": kept, "weight_decay": weight_decay, **common})
    if decay:
        groups.append({"params": decay, "weight_decay": plain_wd, **plain})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **plain})
    return groups


def make_optimizer(model: nn.Module, preset: str = "subtrack++", lr: float = 1e-3, rank: int | str | None = None,
                   update_interval: int | None = None, targets: str | Iterable[str] = "all-linear", *,
                   weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-6, seed: int = 0,
                   state_dtype: str = "float32", stochastic_rounding: bool = False, fused: bool | None = None,
                   check_finite: bool = True, plain_lr: float | None = None, plain_weight_decay: float | None = None,
                   plain_state_dtype: str | None = None, cls: Callable[..., SubspaceAdamW] = SubspaceAdamW,
                   compile: bool = False, **overrides: Any) -> SubspaceAdamW:
    """``SubspaceAdamW(param_groups(model, preset, ...), lr=lr, ...)`` in one call (``plain_lr``,
    ``plain_weight_decay``, ``plain_state_dtype``: the plain group's own rate, decay and moment format, see
    :func:`param_groups`; ``cls``: the optimizer class, e.g. :class:`grassopt.distributed.FSDPSubspaceAdamW`
    for a model sharded with FSDP2)."""
    groups = param_groups(model, preset, rank, update_interval, targets, weight_decay=weight_decay,
                          plain_lr=plain_lr, plain_weight_decay=plain_weight_decay,
                          plain_state_dtype=plain_state_dtype, **overrides)
    return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, fused=fused,
                         check_finite=check_finite, compile=compile)
