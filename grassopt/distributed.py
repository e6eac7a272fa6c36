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
per-shard statistics. :func:`check_params` turns that into a clear error at construction, and
:class:`FSDPSubspaceAdamW` is the way to use every preset under FSDP2: it all-gathers each projected
matrix (gradient and weight) at its step, runs the ordinary step on the whole matrix, keeps this
rank's rows, and holds the low-rank state replicated (the same numbers as DDP)::

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    opt = grassopt.distributed.FSDPSubspaceAdamW(grassopt.param_groups(model, "subtrack++", rank=128), lr=1e-3)
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._dtensor import ShardedParameterError, _iter_groups, check_params, is_dtensor
from ._dtensor import group_items as _items
from .optimizer import SubspaceAdamW

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["DistInfo", "ShardedParameterError", "FSDPSubspaceAdamW", "backend_for", "init_from_env", "wrap_ddp", "rank_and_world",
           "is_dtensor", "check_params", "assert_in_sync", "checksums"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: its global rank, the world size, its local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

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
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
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


# ---------------------------------------------------------------------------------------- FSDP2 adapter
def _placeholder(p: DTensor) -> Tensor:
    """A tensor with ``p``'s global shape, dtype and (local) device that owns one element."""
    local = p.to_local()
    return torch.empty_strided(tuple(p.shape), (0,) * p.dim(), dtype=local.dtype, device=local.device)


class FSDPSubspaceAdamW(SubspaceAdamW):
    """:class:`~grassopt.SubspaceAdamW` for models sharded with FSDP2 (``fully_shard``).

    Plain groups step their DTensor shards directly (elementwise Adam needs no communication).
    Each *projected* DTensor matrix is stood in for by a proxy tensor of its full shape that
    holds no memory between steps; at a step the gradient and the weight are all-gathered (one
    matrix at a time), the ordinary subspace step runs on the whole matrix, and each rank keeps
    its own rows of the result. Hence:

    * every preset works and gives the result of DDP (up to the order of float sums in the
      gradient reduction);
    * the low-rank state of a projected matrix (basis ``Q``, moments ``k x r``) is replicated
      on every rank: it is small by construction; weights, gradients and the plain AdamW
      state stay sharded;
    * per step, two all-gathers per projected matrix (gradient and weight) and the subspace
      work repeated on every rank; transient memory: one full matrix and its gradient;
    * :meth:`state_dict` gathers sharded state into full tensors (call it on every rank; it is
      a collective), so a checkpoint has the same format as a DDP or one-process run and loads
      into either; :meth:`load_state_dict` re-shards it.

    The projected matrices are stepped one at a time, so a non-finite gradient in one of them
    raises after the matrices before it (and the plain groups) were updated. Layer-wise
    updates are not available with FSDP2.
    """

    def __init__(self, params, *args: Any, **kwargs: Any):
        groups = _iter_groups(params)
        self._sharded: list[tuple[Tensor, DTensor]] = []  # (proxy, DTensor parameter)
        new_groups = []
        for group in groups:
            group = dict(group)
            if group.get("rank") is not None:
                items = []
                for name, p in _items(group):
                    if is_dtensor(p):
                        proxy = nn.Parameter(_placeholder(p), requires_grad=p.requires_grad)
                        self._sharded.append((proxy, p))
                        p = proxy
                    items.append((name, p) if name is not None else p)
                group["params"] = items
                group.pop("param_names", None)
            new_groups.append(group)
        super().__init__(new_groups, *args, **kwargs)
        self._proxy_of = {id(p): proxy for proxy, p in self._sharded}

    # -------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        proxies = {id(proxy) for proxy, _ in self._sharded}
        super().step_parameters([p for g in self.param_groups for p in g["params"] if id(p) not in proxies])
        for proxy, p in self._sharded:
            self._step_sharded(proxy, p)
        return loss

    @torch.no_grad()
    def step_parameters(self, params: Iterable[Tensor]) -> None:
        plain: list[Any] = []  # parameters
        sharded: list[Any] = []  # (proxy, DTensor parameter)
        by_param = {id(p): (proxy, p) for proxy, p in self._sharded}
        by_proxy = {id(proxy): (proxy, p) for proxy, p in self._sharded}
        for p in params:
            pair = by_param.get(id(p)) or by_proxy.get(id(p))
            (sharded if pair else plain).append(pair or p)
        super().step_parameters(plain)
        for proxy, p in sharded:
            self._step_sharded(proxy, p)

    def _step_sharded(self, proxy: Tensor, p: DTensor) -> None:
        from torch.distributed.tensor import distribute_tensor

        if p.grad is None:
            return
        placeholder = proxy.data
        proxy.data = p.full_tensor()
        proxy.grad = p.grad.full_tensor()  # type: ignore[attr-defined]  # (a DTensor's gradient is a DTensor)
        try:
            super().step_parameters([proxy])
            mine = distribute_tensor(proxy.data, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(mine)
        finally:
            proxy.grad = None
            proxy.data = placeholder

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for _, p in self._sharded:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for st in sd["state"].values():
            for k, v in list(st.items()):
                if is_dtensor(v):
                    st[k] = v.full_tensor()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.tensor import distribute_tensor

        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                if not is_dtensor(p) or p not in self.state:
                    continue
                st = self.state[p]
                for k, v in list(st.items()):
                    if isinstance(v, Tensor) and not is_dtensor(v) and tuple(v.shape) == tuple(p.shape):
                        st[k] = distribute_tensor(v.to(p.to_local().device), p.device_mesh, p.placements,
                                                  src_data_rank=None)

