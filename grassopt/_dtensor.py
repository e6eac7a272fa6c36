"""DTensor (FSDP2) recognition and the check that projected param groups hold no sharded matrix.

A leaf module: :mod:`grassopt.optimizer` calls :func:`check_params` when a group is added, and
:mod:`grassopt.distributed` (which builds on the optimizer) and :mod:`grassopt.layerwise` re-use
:func:`is_dtensor`. Public names live in :mod:`grassopt.distributed`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ShardedParameterError", "is_dtensor", "check_params"]


class ShardedParameterError(ValueError):
    """A sharded (FSDP2 / DTensor) parameter in a param group that cannot handle it."""


def is_dtensor(t: Any) -> bool:
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


def check_params(params: Any) -> None:
    """Raise :class:`ShardedParameterError` if a *projected* param group holds a DTensor parameter.

    ``params`` is one param-group dict, a list of them, an optimizer, or a list of parameters
    (a plain group). Groups without a ``rank`` (plain AdamW) may hold DTensors: their elementwise
    step works shard by shard. Meant to be called by ``SubspaceAdamW.add_param_group`` so the error
    comes at construction, before any step::

        grassopt.distributed.check_params(param_group)
    """
    for gi, group in enumerate(_iter_groups(params)):
        if group.get("rank") is None:
            continue
        raw = group["params"]
        if isinstance(raw, Tensor):
            raw = [raw]
        names = list(group.get("param_names") or [])
        sharded = []
        for j, item in enumerate(raw):
            name, p = item if isinstance(item, tuple) else (names[j] if j < len(names) else f"parameter {j}", item)
            if is_dtensor(p):
                sharded.append(f"{name} {tuple(p.shape)} {tuple(p.placements)}")
        if sharded:
            shown = ", ".join(sharded[:3]) + (f" and {len(sharded) - 3} more" if len(sharded) > 3 else "")
            raise ShardedParameterError(
                f"projected param group (rank={group['rank']}) holds FSDP2-sharded DTensor parameters: {shown}. "
                "SubspaceAdamW's subspace step works on whole matrices and cannot step sharded ones. "
                "Use grassopt.distributed.FSDPSubspaceAdamW (same arguments): it gathers each projected "
                "matrix at its step and keeps the small low-rank state replicated; or train with DDP "
                "(torchrun + grassopt.distributed.wrap_ddp), or leave the projected matrices out of "
                "fully_shard (plain param groups step DTensors correctly).")
