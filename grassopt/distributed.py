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
layer, and every weight under preset ``"adamw"``) step sharded DTensor parameters correctly in
float32 (not with int8 states or stochastic rounding, whose plain tensors meet DTensors). The
*projected* groups do not: the subspace step (SVD or tracking of the whole gradient, projection,
recovery scaling with its per-matrix limiter) is written for whole matrices, and on a row-sharded
DTensor it either fails deep inside DTensor's sharding propagation or would silently compute
per-shard statistics. :func:`check_params` turns that into a clear error at construction, and
:class:`FSDPSubspaceAdamW` is the way to use every preset under FSDP2: it all-gathers each projected
matrix (gradient and weight) at its step, runs the ordinary step on the whole matrix, keeps this
rank's rows, and holds the low-rank state replicated (the same numbers as DDP), or, with
``owners=True``, has one owner rank per matrix step it and hold its state alone (bit-identical, the
work shared out); its plain groups step each rank's shard as a plain tensor, so every state dtype and
stochastic rounding work::

    info = grassopt.distributed.init_from_env()
    grassopt.distributed.shard_model(model.to(info.device), model.layers, info.device)  # fully_shard
    opt = grassopt.distributed.FSDPSubspaceAdamW(grassopt.param_groups(model, "subtrack++", rank=128), lr=1e-3,
                                                 owners=True)

``grassopt train --fsdp`` is that, with sharded checkpoints (:mod:`grassopt.engine.sharded`).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._dtensor import ShardedParameterError, _iter_groups, check_params, is_dtensor
from ._dtensor import group_items as _items
from .optim.state import RNG_KEYS
from .optimizer import SubspaceAdamW

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["DistInfo", "ShardedParameterError", "FSDPSubspaceAdamW", "backend_for", "init_from_env", "wrap_ddp", "rank_and_world",
           "is_dtensor", "check_params", "assert_in_sync", "checksums", "process_group_of_one", "shard_model",
           "fsdp_gradient_sync", "assign_owners"]


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


# ---------------------------------------------------------------------------------------- FSDP2
@contextlib.contextmanager
def process_group_of_one(device: torch.device | str) -> Iterator[None]:
    """A process group of one (rank 0 of 1, the backend of ``device``) while the block runs, unless a group
    exists already (``torchrun``'s, or a test's): FSDP2 shards over a process group even when it is alone, so
    a run written by N processes can be continued, and compared, in one."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_model(model: nn.Module, blocks: Iterable[nn.Module], device: torch.device | str) -> nn.Module:
    """FSDP2: ``fully_shard`` each of ``blocks`` (the transformer blocks: one all-gather each in forward and
    backward, one reduce-scatter of its gradients), then the root ``model`` (what is left: embedding, final
    norm, head), over a 1-D mesh of every rank on ``device``'s type. In place; returns ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def fsdp_gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP2's ``no_sync``: with ``enabled=False`` the backward passes of the block accumulate unsharded
    gradients without a reduce-scatter (the micro-batches of a step but its last)."""
    if enabled:
        yield
        return
    model.set_requires_gradient_sync(False)  # type: ignore[operator]  # (an FSDPModule's)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def _placeholder(p: DTensor, local: bool = False) -> Tensor:
    """A tensor with ``p``'s global (or, with ``local``, its shard's) shape, dtype and local device that
    owns one element."""
    t = p.to_local()
    shape = tuple(t.shape) if local else tuple(p.shape)
    return torch.empty_strided(shape, (0,) * len(shape), dtype=t.dtype, device=t.device)


def _as_dtensor(local: Tensor, p: DTensor) -> DTensor:
    """``local`` (a tensor of the shape of ``p``'s shard) as a DTensor laid out like ``p`` (no communication)."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _chunk_sizes(rows: int, world: int) -> list[int]:
    """The rows of each rank's shard of a matrix sharded by rows (``torch.chunk``'s split, as FSDP2's)."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def _padded(t: Tensor, rows: int) -> Tensor:
    """``t`` with zero rows appended up to ``rows`` (collectives exchange equal sizes), contiguous."""
    if t.shape[0] == rows:
        return t.contiguous()
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _step_cost(p: Tensor) -> float:
    """What a projected matrix's step costs, for balancing owners: its basis update, ``m n min(m, n)``
    (an SVD; the projections, ``m n r``, scale alike for a common rank)."""
    m, n = p.shape[0], math.prod(p.shape[1:])
    return float(m) * n * min(m, n)


def assign_owners(costs: list[float], world: int) -> list[int]:
    """An owner rank for each of ``costs``, balancing the ranks' totals: the costliest first, each to the
    rank with the least so far (the lowest such rank on a tie), so every rank computes the same answer."""
    load = [0.0] * world
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda k: (load[k], k))
        out[i] = r
        load[r] += costs[i]
    return out


class FSDPSubspaceAdamW(SubspaceAdamW):
    """:class:`~grassopt.SubspaceAdamW` for models sharded with FSDP2 (``fully_shard``).

    Each parameter is stood in for, inside the optimizer, by a proxy tensor that holds no memory between
    steps (so the parameter's index, generators and checks are those of the unsharded model):

    * a parameter of a *plain* group (AdamW) is stepped on this rank's shard: at the step the proxy is
      the shard and its gradient the gradient's shard (elementwise Adam needs no communication). Its state
      (moments of the shard's shape, an int8 codec's block scales, the rounding generator) is this rank's;
    * a *projected* matrix is all-gathered at its step (gradient and weight, one matrix at a time), the
      ordinary subspace step runs on the whole matrix, and each rank keeps its own rows of the result.
      Its low-rank state (basis ``Q``, moments ``k x r``) is replicated on every rank: small by construction.

    Hence every preset works, with int8 states and bf16 weights with stochastic rounding, and gives the
    result of DDP up to the order of float sums in the gradient reduction (and, for int8 plain states,
    the blocks of 256 falling within each shard). Per step: two all-gathers per projected matrix and the
    subspace work repeated on every rank; transient memory: one full matrix and its gradient.

    ``owners=True`` shares the projected work out instead: each projected matrix has one owner rank
    (:func:`assign_owners`: balanced by the cost of a basis update, ``m n min(m, n)``), which alone steps it
    (basis updates included) and holds its low-rank state and generators. A step runs in rounds: in round
    ``k``, every rank's ``k``-th owned matrix has its gradient and weight shards gathered to its owner
    (``dist.gather``), the owners step them (all ranks at once), and each owner scatters the new rows back
    to their shards (``dist.scatter``). The numbers are the replicated step's, bit for bit (the same function
    on the same whole matrices, with the same seeded generators, each owner's in index order); the projected
    state and the subspace work per rank shrink to about 1/N. Transient memory: one owned matrix and its
    gradient, whole. Every rank
    must call :meth:`step` (and :meth:`state_dict`, which gathers the owners' states) together.

    Checkpoints: :meth:`state_dict` gathers everything into full tensors (a collective: call it on every
    rank), so it has the format of a DDP or one-process run and loads into either; :meth:`load_state_dict`
    re-shards it. :meth:`sharded_state_dict` / :meth:`sharded_template` / :meth:`load_sharded_state_dict` are
    the ``torch.distributed.checkpoint`` form, in which every rank saves its own shards (what
    ``grassopt train --fsdp`` writes).

    The projected matrices are stepped one at a time, so a non-finite gradient in one of them raises after
    the matrices before it (and the plain groups) were updated; ``grassopt train`` checks the gradients on
    every rank before the step. Layer-wise updates are not available with FSDP2.
    """

    def __init__(self, params, *args: Any, owners: bool = False, **kwargs: Any):
        groups = _iter_groups(params)
        self._sharded: list[tuple[Tensor, DTensor]] = []  # projected: (proxy, DTensor parameter)
        self._local: list[tuple[Tensor, DTensor]] = []  # plain: (proxy, DTensor parameter)
        new_groups = []
        for group in groups:
            group = dict(group)
            projected = group.get("rank") is not None
            items = []
            for name, p in _items(group):
                if is_dtensor(p):
                    proxy = nn.Parameter(_placeholder(p, local=not projected), requires_grad=p.requires_grad)
                    (self._sharded if projected else self._local).append((proxy, p))
                    p = proxy
                items.append((name, p) if name is not None else p)
            group["params"] = items
            group.pop("param_names", None)
            new_groups.append(group)
        super().__init__(new_groups, *args, **kwargs)
        self._kind = {id(x): (kind, proxy, p) for kind, pairs in (("projected", self._sharded), ("local", self._local))
                      for proxy, p in pairs for x in (proxy, p)}
        self.owners = bool(owners)
        self._owner: dict[int, int] = {}  # id(proxy) -> its owner's rank in the mesh's group
        if self.owners and self._sharded:
            for _, p in self._sharded:
                if len(p.placements) != 1 or not p.placements[0].is_shard(0) or \
                        p.device_mesh is not self._sharded[0][1].device_mesh:
                    raise ValueError(f"owners=True needs every projected matrix sharded by rows over one 1-D mesh "
                                     f"(fully_shard's default); got placements {tuple(p.placements)}")
            world = self._sharded[0][1].device_mesh.size()
            ranks = assign_owners([_step_cost(p) for _, p in self._sharded], world)
            self._owner = {id(proxy): r for (proxy, _), r in zip(self._sharded, ranks)}

    def owner(self, p: Tensor) -> int | None:
        """The rank (in the mesh's group) that steps the projected matrix ``p`` and holds its state with
        ``owners=True``; None otherwise."""
        kind = self._kind.get(id(p))
        return None if kind is None or kind[0] != "projected" else self._owner.get(id(kind[1]))

    def _owns(self, i: int) -> bool:
        """Whether this rank holds the state of parameter ``i`` (a projected matrix owned elsewhere: no)."""
        if not self._owner:
            return True
        proxy = self._flat_params()[i]
        owner = self._owner.get(id(proxy))
        return owner is None or owner == self._sharded[0][1].device_mesh.get_local_rank()

    # -------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_parameters([p for g in self.param_groups for p in g["params"]])
        return loss

    @torch.no_grad()
    def step_parameters(self, params: Iterable[Tensor]) -> None:
        plain: list[Tensor] = []  # parameters that are not sharded
        local: list[tuple[Tensor, DTensor]] = []
        projected: list[tuple[Tensor, DTensor]] = []
        for p in params:
            kind = self._kind.get(id(p))
            if kind is None:
                plain.append(p)
            else:
                (projected if kind[0] == "projected" else local).append(kind[1:])  # type: ignore[arg-type]
        with self._shards(local) as proxies:
            super().step_parameters(plain + proxies)
        if self._owner:
            self._step_owned(projected)
            return
        for proxy, p in projected:
            self._step_sharded(proxy, p)

    def _step_owned(self, pairs: list[tuple[Tensor, DTensor]]) -> None:
        """``owners=True``, in rounds: in round ``k`` every rank's ``k``-th owned matrix has its gradient and
        weight gathered to its owner, the owners step them (the ranks at once), and each owner scatters the
        new rows. A rank so holds one owned matrix and its gradient whole at a time, and each owner steps its
        matrices in index order, as the replicated step does."""
        pairs = [(proxy, p) for proxy, p in pairs if p.grad is not None]
        if not pairs:
            return
        mesh = pairs[0][1].device_mesh
        group = mesh.get_group()
        me, world = mesh.get_local_rank(), mesh.size()
        queues: list[list[tuple[Tensor, DTensor]]] = [[] for _ in range(world)]
        for proxy, p in pairs:
            queues[self._owner[id(proxy)]].append((proxy, p))
        for k in range(max(len(q) for q in queues)):
            rnd = [q[k] for q in queues if k < len(q)]  # at most one matrix per owner
            mine: tuple[Tensor, list[Tensor], list[int]] | None = None
            for proxy, p in rnd:
                owner = self._owner[id(proxy)]
                sizes = _chunk_sizes(p.shape[0], world)
                lists: list[list[Tensor]] = []
                for t in (p.grad.to_local(), p.to_local()):  # type: ignore[union-attr]  # (a DTensor's gradient)
                    shard = _padded(t, sizes[0])
                    parts = [torch.empty_like(shard) for _ in range(world)] if me == owner else None
                    dist.gather(shard, parts, dst=dist.get_global_rank(group, owner), group=group)
                    lists.append(parts or [])
                if me == owner:
                    mine = (proxy, [torch.cat([t[:n] for t, n in zip(parts, sizes)]) for parts in lists], sizes)
            rows: list[Tensor] | None = None
            if mine is not None:  # the same step as the replicated one, on the whole matrix
                proxy, (full_grad, full_weight), sizes = mine[0], mine[1], mine[2]
                placeholder = proxy.data
                proxy.data, proxy.grad = full_weight, full_grad
                try:
                    super().step_parameters([proxy])
                    rows = [_padded(r, sizes[0]) for r in proxy.data.split(sizes)]
                finally:
                    proxy.grad = None
                    proxy.data = placeholder
                mine = None  # (the whole matrix and gradient freed before the next round)
                del full_grad, full_weight
            for proxy, p in rnd:
                owner = self._owner[id(proxy)]
                local = p.to_local()
                sizes = _chunk_sizes(p.shape[0], world)
                out = torch.empty((sizes[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
                dist.scatter(out, rows if me == owner else None, src=dist.get_global_rank(group, owner), group=group)
                local.copy_(out[:sizes[me]])

    @contextlib.contextmanager
    def _shards(self, pairs: list[tuple[Tensor, DTensor]]) -> Iterator[list[Tensor]]:
        """The proxies of ``pairs`` (those with a gradient) made this rank's shards of their parameters and
        gradients while the block runs (an update of a proxy is one of the shard), placeholders again after."""
        swapped = []
        try:
            for proxy, p in pairs:
                if p.grad is None:
                    continue
                swapped.append((proxy, proxy.data))
                proxy.data = p.to_local()
                proxy.grad = p.grad.to_local()  # type: ignore[attr-defined]  # (a DTensor's gradient is a DTensor)
            yield [proxy for proxy, _ in swapped]
        finally:
            for proxy, placeholder in swapped:
                proxy.grad = None
                proxy.data = placeholder

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
        for _, p in (*self._sharded, *self._local):
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # -------------------------------------------------------------- checkpoints
    def _local_by_index(self) -> dict[int, tuple[dict[str, Any], DTensor]]:
        """``{parameter index: (its group, the DTensor parameter)}`` of the plain-group shards."""
        mine = {id(proxy): p for proxy, p in self._local}
        out, i = {}, 0
        for group in self.param_groups:
            for proxy in group["params"]:
                if id(proxy) in mine:
                    out[i] = (group, mine[id(proxy)])
                i += 1
        return out

    @staticmethod
    def _shard_shaped(group: dict[str, Any], p: DTensor) -> set[str]:
        """The state keys of a plain-group shard laid out like the shard (moments, int8 codes), which
        therefore form a DTensor like the parameter's; the others (block scales, generators) are per rank."""
        from .optim.state import state_spec
        shape = tuple(p.to_local().shape)
        return {k for k, (_, s) in state_spec(group, shape).items() if s is not None and tuple(s) == shape}

    def _owned_elsewhere(self, state: dict[int, Any]) -> dict[int, Any]:
        """``owners=True``: ``state`` completed with the projected matrices' states of the other owners
        (a collective)."""
        if not self._owner or dist.get_world_size() == 1:
            return state
        projected = {id(proxy) for proxy, _ in self._sharded}
        flat = self._flat_params()
        mine = {i: st for i, st in state.items() if id(flat[int(i)]) in projected}
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for theirs in everyone:
            for i, st in theirs.items():
                state.setdefault(i, {k: v.to(flat[int(i)].device) if isinstance(v, Tensor) else v
                                     for k, v in st.items()})
        return state

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["state"] = dict(sorted(self._owned_elsewhere(sd["state"]).items()))
        for i, (group, p) in self._local_by_index().items():
            st = sd["state"].get(i)
            if not st:
                continue
            shaped = self._shard_shaped(group, p)
            for k, v in list(st.items()):
                if not isinstance(v, Tensor) or k in RNG_KEYS or p.device_mesh.size() == 1:
                    continue
                if k not in shaped:
                    raise ValueError(
                        f"the optimizer state {k!r} of parameter {i} {tuple(p.shape)} is laid out per shard "
                        f"(state_dtype={group.get('state_dtype')!r} scales blocks within each shard), so it has no "
                        "one-process form: save it with sharded_state_dict() and torch.distributed.checkpoint "
                        "(what grassopt train --fsdp does)")
                st[k] = _as_dtensor(v, p).full_tensor()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.tensor import distribute_tensor

        local = self._local_by_index()
        state = {}
        for i, st in state_dict["state"].items():
            found = local.get(int(i))
            if found is not None:
                p = found[1]
                st = {k: distribute_tensor(v.to(p.to_local().device), p.device_mesh, p.placements,
                                           src_data_rank=None).to_local()
                      if isinstance(v, Tensor) and k not in RNG_KEYS and tuple(v.shape) == tuple(p.shape) else v
                      for k, v in st.items()}
            if self._owns(int(i)):
                state[i] = st
        super().load_state_dict({**state_dict, "state": state})

    def sharded_state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, rest)``: the state in the form ``torch.distributed.checkpoint`` saves, no communication.

        ``tensors``: ``state/<index>/<key>`` for the state of a plain-group shard laid out like it (a DTensor
        with the parameter's global shape and placements: each rank saves its shard, and a load at another
        world size re-shards it) and for the replicated state of projected matrices (saved once);
        ``rank<r>/state/<index>/<key>`` for what is this rank's own (a shard's generator, int8 block scales).
        ``rest``: the step counts, codec fields and param groups (the same on every rank)."""
        sd = SubspaceAdamW.state_dict(self)
        rank = dist.get_rank()
        local = self._local_by_index()
        tensors: dict[str, Tensor] = {}
        rest: dict[int, dict[str, Any]] = {}
        for i, st in sd["state"].items():
            found = local.get(i)
            shaped = self._shard_shaped(*found) if found is not None else set()
            rest[i] = {}
            for k, v in st.items():
                if not isinstance(v, Tensor):
                    rest[i][k] = v
                elif found is None:
                    tensors[f"state/{i}/{k}"] = v
                elif k in shaped:
                    tensors[f"state/{i}/{k}"] = _as_dtensor(v, found[1])
                else:
                    tensors[f"rank{rank}/state/{i}/{k}"] = v
        if self._owner:  # the step counts of the matrices the other ranks own
            rest = dict(sorted(self._owned_elsewhere(rest).items()))
        return tensors, {"state": rest, "param_groups": sd["param_groups"]}

    def sharded_template(self, saved: dict[str, tuple[tuple[int, ...], torch.dtype]],
                         saved_world: int) -> dict[str, Tensor]:
        """The tensors ``torch.distributed.checkpoint.load`` fills for this rank, from what was saved
        (``saved``: key -> (global shape, dtype), read from the checkpoint's metadata, by ``saved_world``
        processes). At the same world size a rank reads its own per-rank entries; at another, the
        generators of rank 0 (the draws go on from there) and a per-shard layout (int8 block scales of a
        plain group) is refused (``ValueError``) before anything is read."""
        from torch.distributed.tensor import empty as dt_empty

        rank, world = dist.get_rank(), dist.get_world_size()
        flat = self._flat_params()
        local = self._local_by_index()
        out: dict[str, Tensor] = {}
        for key, (shape, dtype) in saved.items():
            parts = key.split("/")
            if parts[0] == "state":
                i = int(parts[1])
                if not self._owns(i):  # owners=True: a matrix another rank steps
                    continue
                found = local.get(i)
                if found is not None and tuple(shape) == tuple(found[1].shape):
                    p = found[1]
                    out[key] = dt_empty(*shape, dtype=dtype, device_mesh=p.device_mesh, placements=p.placements)
                else:
                    device = found[1].to_local().device if found is not None else flat[i].device
                    out[key] = torch.empty(shape, dtype=dtype, device=device)
                continue
            r, i, k = int(parts[0][len("rank"):]), int(parts[2]), parts[3]
            if saved_world != world and k not in RNG_KEYS:
                raise ValueError(
                    f"the optimizer state {k!r} of parameter {i} was saved per shard by {saved_world} processes "
                    f"(state_dtype={self.param_groups[0].get('state_dtype')!r} scales blocks within each shard) and "
                    f"cannot be re-sharded for {world}: resume with {saved_world} processes (torchrun "
                    f"--nproc_per_node={saved_world}), or use --state-dtype float32 for runs that change size")
            if r == (rank if saved_world == world else 0):
                device = local[i][1].to_local().device if i in local else flat[i].device
                out[key] = torch.empty(shape, dtype=dtype, device=device)
        return out

    def load_sharded_state_dict(self, tensors: dict[str, Tensor], rest: dict[str, Any], saved_world: int) -> None:
        """Load what :meth:`sharded_template` was filled with, and ``rest`` (see :meth:`sharded_state_dict`),
        with :meth:`SubspaceAdamW.load_state_dict`'s checks."""
        rank = dist.get_rank() if saved_world == dist.get_world_size() else 0
        state: dict[int, dict[str, Any]] = {int(i): dict(st) for i, st in rest["state"].items() if self._owns(int(i))}
        for key, v in tensors.items():
            parts = key.split("/")
            if parts[0] == "state":
                i, k = int(parts[1]), parts[2]
                if not self._owns(i):
                    continue
                v = v.to_local() if is_dtensor(v) else v
            else:
                if int(parts[0][len("rank"):]) != rank:
                    continue
                i, k = int(parts[2]), parts[3]
            state.setdefault(i, {})[k] = v
        SubspaceAdamW.load_state_dict(self, {"state": state, "param_groups": rest["param_groups"]})
