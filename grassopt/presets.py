"""Named presets (data, not subclasses) and ``param_groups``: from a model to optimizer groups.

A preset is a dict of component choices for a projected group (ALGORITHMS.md section 3). Any
component can be overridden, so each ablation of the papers is a configuration, e.g.
``param_groups(model, "subtrack++", rank=64, transport="keep")`` is SubTrack++ without the
projection-aware optimizer, and ``recovery=False`` drops recovery scaling.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from .optimizer import SUBSPACE_DEFAULTS, SubspaceAdamW
from .rules import all_rule_options

__all__ = ["PRESETS", "param_groups", "make_optimizer", "select_targets", "resolve_preset"]

#: Component choices of every preset. ``None`` means no projection (plain AdamW).
PRESETS: dict[str, dict[str, Any] | None] = {
    "adamw": None,
    "galore": {"rule": "svd", "transport": "keep", "recovery": False},
    "fira": {"rule": "svd", "transport": "keep", "recovery": True},
    "subtrack++": {"rule": "track", "transport": "rotate", "recovery": True},
    "grasswalk": {"rule": "walk", "transport": "rotate", "recovery": True},
    "grassjump": {"rule": "jump", "transport": "rotate", "recovery": True},
}

#: Names of linear layers that ``"all-linear"`` leaves out (the output layer, as Hugging Face does).
_OUTPUT_NAMES = ("lm_head", "output", "classifier", "score", "head")


def resolve_preset(preset: str, **overrides: Any) -> dict[str, Any] | None:
    """The projected-group settings of ``preset`` with ``overrides`` applied (``None`` for plain)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset]
    if base is None:
        if overrides:
            raise ValueError(f"preset 'adamw' takes no subspace options, got {sorted(overrides)}")
        return None
    known = set(SUBSPACE_DEFAULTS) | all_rule_options()
    for key in overrides:
        if key not in known:
            raise ValueError(f"unknown subspace option {key!r}; known: {sorted(known)}")
    return {**base, **overrides}


def _output_modules(model: nn.Module) -> set[int]:
    out = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            m = get()
        except Exception:  # noqa: BLE001 - some models raise NotImplementedError
            m = None
        if m is not None:
            out.add(id(m))
    return out


def select_targets(model: nn.Module, targets: str | Iterable[str] = "all-linear") -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules whose weights are projected.

    ``targets`` is ``"all-linear"`` (every linear layer but the output layer), or one or more
    patterns; a module matches a pattern when the pattern is a substring of its qualified name
    or a regular expression matching the whole name (as Hugging Face's ``optim_target_modules``).
    """
    outputs = _output_modules(model)
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty; pass 'all-linear' or module-name patterns such as ['attn', 'mlp']")
    all_linear = "all-linear" in targets
    patterns = [t for t in targets if t != "all-linear"]

    def matches(name: str) -> bool:
        for t in patterns:
            if t in name:
                return True
            try:
                if re.fullmatch(t, name):
                    return True
            except re.error:
                pass
        return False

    chosen = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or id(mod.weight) in emb_weights:
            continue
        if all_linear and id(mod) not in outputs and name.split(".")[-1] not in _OUTPUT_NAMES:
            chosen.append((name, mod))
        elif matches(name):
            chosen.append((name, mod))
    return chosen


def param_groups(
    model: nn.Module,
    preset: str = "subtrack++",
    rank: int = 128,
    update_interval: int | None = None,
    targets: str | Iterable[str] = "all-linear",
    *,
    lr: float | None = None,
    weight_decay: float = 0.0,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Optimizer param groups for ``model``: one projected group and the plain rest.

    Only 2-D weights of ``nn.Linear`` modules selected by ``targets`` are projected (see
    :func:`select_targets`); embeddings, norms, biases and the output layer go to the plain
    AdamW group. A matrix whose short side is not larger than ``rank`` cannot be projected: it
    falls back to the plain group with a warning. With ``weight_decay > 0``, parameters with
    fewer than 2 dimensions (norms, biases) get no decay, as in nanoGPT. Parameters are given with
    their names, so errors and :meth:`SubspaceAdamW.diagnostics` name them.
    """
    if update_interval is not None and PRESETS.get(preset) is not None:
        overrides["update_interval"] = update_interval
    settings = resolve_preset(preset, **overrides)
    if settings is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r} must be an integer >= 1")
    projected_ids: set[int] = set()
    if settings is not None:
        for name, mod in select_targets(model, targets):
            w = mod.weight
            if not w.requires_grad or w.dim() != 2:
                continue
            if rank >= min(w.shape):
                warnings.warn(f"{name}.weight {tuple(w.shape)}: rank {rank} >= min(m, n) = {min(w.shape)}; "
                              "it is trained with plain AdamW instead", stacklevel=2)
                continue
            projected_ids.add(id(w))
    proj, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in projected_ids:
            proj.append((name, p))
        elif weight_decay > 0 and p.dim() < 2:
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    common = {} if lr is None else {"lr": lr}
    groups: list[dict[str, Any]] = []
    if proj:
        groups.append({"params": proj, "rank": rank, "weight_decay": weight_decay, **settings, **common})
    elif settings is not None:
        warnings.warn(f"preset {preset!r}: no parameter matched targets={targets!r}; everything is plain AdamW",
                      stacklevel=2)
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, **common})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **common})
    return groups


def make_optimizer(model: nn.Module, preset: str = "subtrack++", lr: float = 1e-3, rank: int = 128,
                   update_interval: int | None = None, targets: str | Iterable[str] = "all-linear", *,
                   weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-6, seed: int = 0,
                   **overrides: Any) -> SubspaceAdamW:
    """``SubspaceAdamW(param_groups(model, preset, ...), lr=lr, ...)`` in one call."""
    groups = param_groups(model, preset, rank, update_interval, targets, weight_decay=weight_decay, **overrides)
    return SubspaceAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed)
