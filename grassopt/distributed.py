"""torch.distributed helpers: process-group setup from ``torchrun``, DDP wrapping, FSDP2 checks.

Data parallel (DDP) works with every preset and needs nothing from the optimizer: DDP averages the
gradients before ``optimizer.step()``, every rank then runs the same deterministic step on the same
numbers, and the random subspace rules draw from generators seeded from ``(seed, parameter index)``,
so their draws agree on every rank by construction (nothing is broadcast). Under ``torchrun``::

    info = grassopt.distributed.init_from_env()          # gloo on CPU, NCCL on CUDA
    model = grassopt.distributed.wrap_ddp(model.to(info.device), info)
    opt = grassopt.SubspaceAdamW(grassopt.param_groups(model.module, "subtrack++", rank=128), seed=0)
    ...                                                   # the ordinary loop: backward, step, zero_grad
    grassopt.distributed.assert_in_sync(model.module.parameters())   # optional, cheap

Give every rank the same ``seed`` and the same param groups (the parameter *index* picks the
generator). Bit-identical parameters on all ranks also need the same kernels on each rank: same
hardware, same library versions and the same number of intra-op threads (``torchrun`` sets
``OMP_NUM_THREADS=1``).

Layer-wise updates under DDP: see :mod:`grassopt.layerwise` (``LayerwiseUpdater(opt, ddp_model=...)``
steps each gradient bucket after its all-reduce has completed).

FSDP2 (``torch.distributed.fsdp.fully_shard``) does run on CPU with gloo in torch 2.13, and the
*plain* param groups of :class:`~grassopt.SubspaceAdamW` (AdamW on embeddings, norms, the output
layer, and every weight under preset ``"adamw"``) step sharded DTensor parameters correctly. The
*projected* groups do not: the subspace step (SVD or tracking of the whole gradient, projection,
recovery scaling with its per-matrix limiter) is written for whole matrices, and on a row-sharded
DTensor it either fails deep inside DTensor's sharding propagation or would silently compute
per-shard statistics. :func:`check_params` turns that into a clear error at construction.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistInfo", "ShardedParameterError", "backend_for", "init_from_env", "wrap_ddp", "rank_and_world",
           "is_dtensor", "check_params", "assert_in_sync", "checksums"]


class ShardedParameterError(ValueError):
    """A sharded (FSDP2 / DTensor) parameter in a param group that cannot handle it."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: its global rank, the world size, its local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for ``device``: ``nccl`` for CUDA, ``gloo`` for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device | str | None = None, backend: str | None = None,
                  timeout_s: float | None = None) -> DistInfo:
    """Initialise the default process group from ``torchrun``'s environment, if there is one.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` through the
    ``env://`` rendezvous). Without them (a plain ``python`` run) nothing is initialised and rank 0
    of 1 is returned. The device defaults to ``cuda:LOCAL_RANK`` when CUDA is available (and is made
    current), else the CPU; the backend follows the device (:func:`backend_for`). Calling it when the
    group already exists returns the existing layout.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() and world > 1 else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if world <= 1 and not dist.is_initialized():
        return DistInfo(0, 1, 0, device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend or backend_for(device)}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def wrap_ddp(model: nn.Module, info: DistInfo | None = None, **kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` with the defaults grassopt wants; ``model`` itself in one process.

    ``gradient_as_bucket_view=True`` (gradients live in DDP's buckets: no second full-size copy, and
    what :class:`~grassopt.layerwise.LayerwiseUpdater` needs to save memory under DDP); on CUDA,
    ``device_ids=[device]``. Other keyword arguments go to DDP.
    """
    rank, world = rank_and_world()
    if world <= 1:
        return model
    kwargs.setdefault("gradient_as_bucket_view", True)
    device = info.device if info is not None else next(model.parameters()).device
    if device.type == "cuda":
        kwargs.setdefault("device_ids", [device])
    return nn.parallel.DistributedDataParallel(model, **kwargs)


# ---------------------------------------------------------------------------------------- FSDP2
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
                "SubspaceAdamW's subspace step works on whole matrices and does not support sharded ones yet. "
                "Alternatives: train with DDP (torchrun + grassopt.distributed.wrap_ddp): the subspace "
                "optimizer's state is already low-rank, so sharding it saves little; or keep FSDP2 with "
                "preset 'adamw' / the projected matrices left out of fully_shard (plain param groups "
                "step DTensors correctly).")


# ---------------------------------------------------------------------------------------- checks
def checksums(tensors: Iterable[Tensor]) -> Tensor:
    """A bitwise fingerprint of each tensor (int64): equal tensors give equal fingerprints.

    The raw bytes are read as int32 words (or int16/uint8 for smaller types) and combined with
    position-dependent odd weights, so a change of any single bit changes the fingerprint.
    """
    out = []
    for t in tensors:
        t = t.detach()
        if is_dtensor(t):
            t = t.to_local()
        flat = t.contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        view = torch.int32 if nbytes % 4 == 0 else torch.int16 if nbytes % 2 == 0 else torch.uint8
        words = flat.view(torch.uint8).view(view).to(torch.int64)
        weights = torch.arange(words.numel(), device=words.device, dtype=torch.int64) * 2 + 1
        out.append((words * weights).sum() + words.numel())
    if not out:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([o.cpu() for o in out])


def assert_in_sync(tensors: Iterable[Tensor], group: Any = None, what: str = "parameters") -> None:
    """Raise ``RuntimeError`` unless ``tensors`` are bitwise equal on every rank (a collective call).

    Compares :func:`checksums` (one int64 per tensor), so it is cheap enough to run every few
    hundred steps as a guard against silently diverging ranks. Does nothing in one process.
    """
    tensors = list(tensors)
    _, world = rank_and_world()
    if world <= 1:
        return
    mine = checksums(tensors)
    backend = dist.get_backend(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    gathered = [torch.empty_like(mine, device=dev) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine.to(dev), group=group)
    bad = sorted({i for g in gathered for i in (g.cpu() != mine).nonzero().flatten().tolist()})
    if bad:
        raise RuntimeError(f"{what} differ between ranks (tensor indices {bad[:10]}{' ...' if len(bad) > 10 else ''})")
