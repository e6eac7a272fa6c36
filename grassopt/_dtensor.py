"""DTensor (FSDP2) recognition and the check that projected param groups hold no sharded matrix.

A leaf module: :mod:`grassopt.optimizer` calls :func:`check_params` when a group is added, and
:mod:`grassopt.distributed` (which builds on the optimizer) and :mod:`grassopt.layerwise` re-use
:func:`is_dtensor`. Public names live in :mod:`grassopt.distributed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["ShardedParameterError", "is_dtensor", "check_params"]


class ShardedParameterError(ValueError):
    """A sharded (FSDP2 / DTensor) parameter in a param group that cannot handle it."""


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """True for a ``torch.distributed.tensor.DTensor`` (what ``fully_shard`` makes of parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def _iter_groups(params: Any) -> list[dict[str, Any]]:
    if isinstance(params, torch.optim.Optimizer):
        return list(params.param_groups)
    if isinstance(params, dict):
        return [params]
    items = list(params)
    if items and all(isinstance(g, dict) for g in items):
        return items
    return [{"params": items}]


def group_items(group: dict[str, Any]) -> list[tuple[str | None, Tensor]]:
    """``(name or None, parameter)`` for each parameter of a param group (names from ``(name, p)``
    pairs or the group's ``param_names``)."""
    raw = group["params"]
    if isinstance(raw, Tensor):
        raw = [raw]
    names = list(group.get("param_names") or [])
    out = []
    for j, item in enumerate(raw):
        if isinstance(item, tuple):
            out.append(item)
        else:
            out.append((names[j] if j < len(names) else None, item))
    return out


def check_params(params: Any) -> None:
    """Raise :class:`ShardedParameterError` if a *projected* param group holds a DTensor parameter.

    ``params`` is one param-group dict, a list of them, an optimizer, or a list of parameters
    (a plain group). Groups without a ``rank`` (plain AdamW) may hold DTensors: their elementwise
    step works shard by shard. Meant to be called by ``SubspaceAdamW.add_param_group`` so the error
    comes at construction, before any step::

        grassopt.distributed.check_params(param_group)
    """
    for group in _iter_groups(params):
        if group.get("rank") is None:
            continue
        sharded = [f"{name if name is not None else f'parameter {j}'} {tuple(p.shape)} {tuple(p.placements)}"
                   for j, (name, p) in enumerate(group_items(group)) if is_dtensor(p)]
        if sharded:
            shown = ", ".join(sharded[:3]) + (f" and {len(sharded) - 3} more" if len(sharded) > 3 else "")
            raise ShardedParameterError(
                f"projected param group (rank={group['rank']}) holds FSDP2-sharded DTensor parameters: {shown}. "
                "SubspaceAdamW's subspace step works on whole matrices and cannot step sharded ones. "
                "Use grassopt.distributed.FSDPSubspaceAdamW (same arguments): it gathers each projected "
                "matrix at its step and keeps the small low-rank state replicated; or train with DDP "
                "(torchrun + grassopt.distributed.wrap_ddp), or leave the projected matrices out of "
                "fully_shard (plain param groups step DTensors correctly).")
