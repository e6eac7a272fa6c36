"""Per-rank optimizer state, peak memory, step time, FLOPs and communication of DDP, replicated FSDP and
owner-sharded FSDP at 1, 2 and 4 processes (benchmarks/distributed.md, .png, .json).

Each (preset, mode, world size) is one group of real ``torch.distributed`` processes (gloo, one intra-op
thread each) training the same LLaMA model on random tokens, each rank on its own micro-batch:

* ``ddp``: ``SubspaceAdamW`` under ``DistributedDataParallel``: every rank holds the whole state and runs
  the whole step (the gradients are all-reduced in the backward);
* ``fsdp-replicated``: FSDP2 (``grassopt.distributed.shard_model``) with ``FSDPSubspaceAdamW(owners=False)``:
  every rank all-gathers and steps every projected matrix and holds its low-rank state;
* ``fsdp-owners``: ``FSDPSubspaceAdamW(owners=True)``: each projected matrix is gathered to, stepped by and
  held by one owner rank, which scatters the new rows back (what ``grassopt train --fsdp`` uses).

Per rank: the optimizer-state bytes (the tensors in ``optimizer.state`` on that rank,
``grassopt.memory.state_bytes``), next to ``grassopt memory --fsdp``'s formula for the fullest rank; the peak
resident memory the training steps add (``VmHWM`` since a reset after the model and optimizer were built,
minus the resident memory then) and the largest transient tensor bytes an optimizer step allocates
(``grassopt.profiling.TensorPeak``); the optimizer step's time (after a barrier; median of the normal steps,
mean of the basis-update steps; wall clock and the process's CPU time); the FLOPs of one normal and one
basis-update step (``torch.utils.flop_counter``: matrix products, plus textbook counts of the factorisations,
see ``LINALG_FLOPS``); and the bytes every collective called in the forward+backward and in the optimizer
step moves, counted by a dispatch mode that sees every ``c10d`` and functional collective (ring-algorithm
accounting: an all-gather of ``P`` bytes sends ``(N-1)/N P`` per rank, an all-reduce twice that, a gather
to a root sends each non-root's part once). FLOPs and bytes are counted at the last two steps (one normal,
one basis update), which are not timed.

    python benchmarks/distributed.py [--model tiny] [--vocab 2048] [--worlds 1 2 4] [--presets subtrack++ galore]

Presets: ``subtrack++`` (the default preset; its basis update is a Grassmann step, as cheap as the projections)
and ``galore`` (an SVD of every gradient at a basis update: the case the basis-update time target is about).
The default model, ``tiny`` with a 2048-token vocabulary, has 4 blocks (28 projected matrices: 3.2 M of its
4.2 M parameters), so the owners balance to within a matrix at 2 and 4 ranks, and the whole command takes a
few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HERE = Path(__file__).resolve().parent
MODES = ("ddp", "fsdp-replicated", "fsdp-owners")
#: the modes' colours and labels in the figure
STYLE = {"ddp": ("tab:gray", "DDP"), "fsdp-replicated": ("tab:orange", "FSDP, replicated"),
         "fsdp-owners": ("tab:blue", "FSDP, owners")}
STATE_TARGET = 1.1  # per-rank optimizer state <= 1.1 / N of world 1's
TIME_TARGET = 1.3  # per-rank basis-update step <= 1.3 / N of world 1's


# ---------------------------------------------------------------------------------------- counting
def _numel_bytes(t: Any) -> int:
    return sum(x.numel() * x.element_size() for x in tree_leaves(t) if isinstance(x, torch.Tensor))


def _pg_layout(pg: Any) -> tuple[int, int]:
    """``(rank, size)`` of this process in the process group ``pg`` as a collective op receives it."""
    try:
        return int(pg.rank()), int(pg.size())
    except (AttributeError, RuntimeError):
        return dist.get_rank(), dist.get_world_size()


def _named_layout(name: Any) -> tuple[int, int]:
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _pg_layout(_resolve_process_group(name))


def comm_bytes(func: Any, args: tuple, kwargs: dict) -> tuple[str, int, int, int] | None:
    """``(kind, payload, sent, received)`` in bytes for this rank if ``func`` is a collective, else None.

    ``payload``: the logical tensor the collective is about (the gathered output, the reduced input).
    ``sent``/``received``: what this rank moves under the bandwidth-optimal (ring) algorithm: all-reduce
    ``2 (N-1)/N P`` each way; all-gather and reduce-scatter ``(N-1)/N P``; gather: each non-root sends its
    part, the root receives ``N-1`` parts; scatter the reverse; broadcast: the root sends ``(N-1) P``.
    """
    ns, name = func.namespace, func._opname
    if ns not in ("c10d", "_c10d_functional"):
        return None

    def ring(p: int, n: int, factor: float = 1.0) -> tuple[int, int]:
        b = int(round(factor * (n - 1) * p / n))
        return b, b

    if ns == "c10d":
        if name in ("allreduce_", "allreduce_coalesced_"):
            me, n = _pg_layout(args[1])
            p = _numel_bytes(args[0])
            return ("all_reduce", p, *ring(p, n, 2.0))
        if name in ("_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_"):
            me, n = _pg_layout(args[2])
            p = _numel_bytes(args[0][0] if name == "allgather_" else args[0])
            return ("all_gather", p, *ring(p, n))
        if name in ("_reduce_scatter_base_", "reduce_scatter_", "reduce_scatter_tensor_coalesced_"):
            me, n = _pg_layout(args[2])
            p = _numel_bytes(args[1][0] if name == "reduce_scatter_" else args[1])
            return ("reduce_scatter", p, *ring(p, n))
        if name == "gather_":
            me, n = _pg_layout(args[2])
            part = _numel_bytes(args[1])
            root = int(args[3])
            return ("gather", n * part, 0 if me == root else part, (n - 1) * part if me == root else 0)
        if name == "scatter_":
            me, n = _pg_layout(args[2])
            part = _numel_bytes(args[0])
            root = int(args[3])
            return ("scatter", n * part, (n - 1) * part if me == root else 0, 0 if me == root else part)
        if name == "broadcast_":
            me, n = _pg_layout(args[1])
            p = _numel_bytes(args[0])
            root = int(args[2])
            return ("broadcast", p, (n - 1) * p if me == root else 0, 0 if me == root else p)
        if name in ("alltoall_base_", "alltoall_"):
            me, n = _pg_layout(args[2])
            p = _numel_bytes(args[1])
            return ("all_to_all", p, *ring(p, n))
        return None  # barrier, send/recv of the store, ...
    if name in ("all_gather_into_tensor", "all_gather_into_tensor_coalesced"):
        me, n = _named_layout(args[2])
        p = _numel_bytes(args[0]) * n
        return ("all_gather", p, *ring(p, n))
    if name in ("reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"):
        me, n = _named_layout(args[3])
        p = _numel_bytes(args[0])
        return ("reduce_scatter", p, *ring(p, n))
    if name in ("all_reduce", "all_reduce_coalesced"):
        me, n = _named_layout(args[2])
        p = _numel_bytes(args[0])
        return ("all_reduce", p, *ring(p, n, 2.0))
    if name == "broadcast":
        me, n = _named_layout(args[2])
        p = _numel_bytes(args[0])
        root = int(args[1])
        return ("broadcast", p, (n - 1) * p if me == root else 0, 0 if me == root else p)
    if name == "all_to_all_single":
        me, n = _named_layout(args[3])
        p = _numel_bytes(args[0])
        return ("all_to_all", p, *ring(p, n))
    return None


class CommCounter(TorchDispatchMode):
    """Bytes of every collective called while the block runs (``c10d`` ops, which ``torch.distributed``'s
    functions, DDP's reducer and FSDP2 call, and the functional collectives of DTensor), by kind:
    ``{kind: {"calls", "payload", "sent", "received"}}`` (see :func:`comm_bytes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: dict[str, dict[str, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = comm_bytes(func, args, kwargs)
        if found is not None:
            kind, payload, sent, received = found
            row = self.kinds.setdefault(kind, {"calls": 0, "payload": 0, "sent": 0, "received": 0})
            row["calls"] += 1
            row["payload"] += payload
            row["sent"] += sent
            row["received"] += received
        return func(*args, **kwargs)

    def total(self, key: str = "sent") -> int:
        return sum(r[key] for r in self.kinds.values())


def _batch(shape: Any) -> int:
    return math.prod(shape[:-2]) if len(shape) > 2 else 1


def _svd_flop(a, *args, out_shape=None, **kwargs) -> int:
    """Thin SVD of ``m x n`` (``K = max, k = min``): with vectors the cheaper of Golub-Kahan-Reinsch
    ``14 K k^2 + 8 k^3`` and R-SVD ``6 K k^2 + 20 k^3``; values only ``4 K k^2 - 4/3 k^3`` (Golub & Van
    Loan, Matrix Computations, table 8.6.1)."""
    big, k = max(a[-2:]), min(a[-2:])
    if not kwargs.get("compute_uv", args[1] if len(args) > 1 else True):
        f = 4 * big * k * k - 4 * k ** 3 / 3
    else:
        f = min(14 * big * k * k + 8 * k ** 3, 6 * big * k * k + 20 * k ** 3)
    return int(_batch(a) * f)


def _qr_flop(a, *args, out_shape=None, **kwargs) -> int:
    """Householder QR of ``m x n`` (``m >= n``) with the thin ``Q`` formed: ``2 (2 m n^2 - 2/3 n^3)``."""
    m, n = max(a[-2:]), min(a[-2:])
    return int(_batch(a) * 2 * (2 * m * n * n - 2 * n ** 3 / 3))


def _eigh_flop(a, *args, out_shape=None, **kwargs) -> int:
    """Symmetric eigendecomposition of ``n x n``: ``9 n^3`` with vectors, ``4/3 n^3`` values only."""
    n = a[-1]
    compute_v = kwargs.get("compute_v", args[1] if len(args) > 1 else True)
    return int(_batch(a) * (9 * n ** 3 if compute_v else 4 * n ** 3 / 3))


def _cholesky_flop(a, *args, out_shape=None, **kwargs) -> int:
    return int(_batch(a) * a[-1] ** 3 / 3)


#: FLOP formulas of the factorisations the subspace rules use, beside the matrix products torch counts
LINALG_FLOPS = {torch.ops.aten._linalg_svd: _svd_flop, torch.ops.aten.linalg_qr: _qr_flop,
                torch.ops.aten._linalg_eigh: _eigh_flop, torch.ops.aten.linalg_cholesky_ex: _cholesky_flop}


def step_cost(shape: tuple[int, ...]) -> float:
    """``FSDPSubspaceAdamW``'s owner-balancing cost of a projected matrix: ``m n min(m, n)``."""
    from grassopt.distributed import _step_cost
    return _step_cost(torch.empty(shape, device="meta"))


# ---------------------------------------------------------------------------------------- one rank
def _build(args: argparse.Namespace, preset: str, mode: str, model_name: str | None = None):
    """``(model, forward module, optimizer)`` of one case, on this rank (``model_name``: another config)."""
    import grassopt
    from grassopt.distributed import FSDPSubspaceAdamW, shard_model
    from grassopt.train.model import Llama, config

    torch.manual_seed(0)
    model = Llama(config(model_name or args.model, vocab_size=args.vocab, max_seq_len=args.seq_len))
    if mode != "ddp":
        shard_model(model, model.layers, "cpu")
    groups = grassopt.param_groups(model, preset, rank=args.rank, update_interval=args.update_interval)
    net: torch.nn.Module
    if mode == "ddp":
        opt = grassopt.SubspaceAdamW(groups, lr=1e-3, seed=0)
        net = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    else:
        opt = FSDPSubspaceAdamW(groups, lr=1e-3, seed=0, owners=mode == "fsdp-owners")
        net = model
    return model, net, opt


def _state_split(opt) -> dict[str, int]:
    """Bytes of this rank's optimizer state: the projected groups' and the plain groups'."""
    out = {"projected": 0, "plain": 0}
    for group in opt.param_groups:
        kind = "projected" if group.get("rank") is not None else "plain"
        for p in group["params"]:
            out[kind] += sum(v.numel() * v.element_size() for v in opt.state.get(p, {}).values()
                             if isinstance(v, torch.Tensor))
    return out


def _live_bytes(model, opt, mode: str) -> int:
    """Bytes of the tensors alive between steps on this rank: the parameters (this rank's shards under FSDP),
    the optimizer state and, under DDP, the gradient buckets (``gradient_as_bucket_view``: one float per
    trainable element, allocated once)."""
    from grassopt.distributed import is_dtensor

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if is_dtensor(t) else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    buckets = sum(nbytes(p) for p in model.parameters() if p.requires_grad) if mode == "ddp" else 0
    return params + buckets + sum(_state_split(opt).values())


def _owned(opt, mode: str, rank: int) -> dict[str, Any]:
    """The projected matrices this rank steps: how many, their elements and their balancing cost."""
    mats = [p for g in opt.param_groups if g.get("rank") is not None for p in g["params"]]
    if mode == "ddp":
        shapes = [tuple(p.shape) for p in mats]
    else:
        shapes = [tuple(proxy.shape) for proxy, _ in opt._sharded
                  if mode == "fsdp-replicated" or opt.owner(proxy) == rank]
    return {"matrices": len(shapes), "elements": sum(math.prod(s) for s in shapes),
            "cost": sum(step_cost(s) for s in shapes), "of_matrices": len(mats)}


def _warm_up(args: argparse.Namespace, preset: str, mode: str) -> None:
    """Two steps (the first basis and one update) of the smallest model in this case's mode before the
    memory baseline is taken: the modules imported and the library code paged in on first use are resident
    memory too, the same for every case, and would otherwise count as the case's."""
    model, net, opt = _build(args, preset, mode, model_name="nano")
    for group in opt.param_groups:
        if group.get("rank") is not None:
            group["update_interval"] = 1
    x = torch.randint(0, args.vocab, (1, 9))
    for _ in range(2):
        net(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del model, net, opt


def measure_case(rank: int, world: int, args: argparse.Namespace, preset: str, mode: str) -> dict[str, Any]:
    """One case on this rank: build the model and optimizer, then ``1 + updates * T`` steps: the first (it
    builds the bases and allocates the state) untimed, the rest timed but the last two, one normal step and
    one basis update, which are counted (FLOPs, bytes, tensor peaks) instead: the dispatch modes that count
    slow every operation. The peak resident memory is read before the counted steps."""
    from torch.utils.flop_counter import FlopCounterMode

    from grassopt.memory import state_breakdown
    from grassopt.profiling import TensorPeak, current_rss_bytes, peak_rss_since_reset, reset_peak_rss

    T = args.update_interval
    _warm_up(args, preset, mode)
    gc.collect()
    reset_peak_rss()  # (gives the freed heap back)
    rss_base = current_rss_bytes()  # before the model is built: its weights count as growth too
    model, net, opt = _build(args, preset, mode)
    steps = 1 + args.updates * T  # the last one a basis update
    counted = {steps - 1: "normal", steps: "update"}
    reset_ok, peak = False, None
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = torch.randint(0, args.vocab, (steps, args.batch, args.seq_len + 1), generator=gen)
    times: dict[str, list[float]] = {"normal": [], "update": []}
    cpu: dict[str, list[float]] = {"normal": [], "update": []}
    counts: dict[str, dict[str, Any]] = {}
    for s in range(1, steps + 1):
        kind = "update" if s > 1 and (s - 1) % T == 0 else "normal"
        x = batches[s - 1]
        if s == steps - 1:  # the timed steps are over
            peak = peak_rss_since_reset() if reset_ok else None
        if s in counted:
            before = _live_bytes(model, opt, mode)
            fwd = CommCounter()
            with TensorPeak() as whole:
                with fwd:
                    loss = net(x[:, :-1], x[:, 1:])[1]
                    loss.backward()
                dist.barrier()
                comm = CommCounter()
                flops = FlopCounterMode(display=False, custom_mapping=LINALG_FLOPS)
                with comm, flops, TensorPeak() as tp:
                    opt.step()
            counts[counted[s]] = {"flops": flops.get_total_flops(), "tensor_peak": tp.peak,
                                  "live_before": before, "train_step_peak": before + whole.peak,
                                  "comm_step": comm.kinds, "comm_fwd_bwd": fwd.kinds}
        else:
            loss = net(x[:, :-1], x[:, 1:])[1]
            loss.backward()
            dist.barrier()
            c0, t0 = time.process_time(), time.perf_counter()
            opt.step()
            t1, c1 = time.perf_counter(), time.process_time()
            if s > 1:  # the first step builds the first bases and allocates the state
                times[kind].append(t1 - t0)
                cpu[kind].append(c1 - c0)
        opt.zero_grad(set_to_none=True)
        if s == 1:  # the code paths of a step are paged in now; the peak from here on
            gc.collect()
            reset_ok = reset_peak_rss()
    state = _state_split(opt)
    return {"preset": preset, "mode": mode, "world": world, "rank": rank, "steps": steps,
            "state_bytes": state["projected"] + state["plain"], "state_projected": state["projected"],
            "state_plain": state["plain"], "state_breakdown": state_breakdown(opt),
            "rss_base": rss_base, "rss_peak": peak,
            "rss_growth": (peak - rss_base) if reset_ok and peak and rss_base else None,
            "step_s": times, "step_cpu_s": cpu, "counted": counts, "owned": _owned(opt, mode, rank),
            "final_loss": loss.item()}


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, preset: str, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        row = measure_case(rank, world, args, preset, mode)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


def start_method() -> str:
    """``fork`` where available (the children start in about a second with torch imported; the parent runs
    no torch kernels, so no thread pool is forked), else ``spawn``; ``GRASSOPT_BENCH_START_METHOD`` overrides."""
    default = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return os.environ.get("GRASSOPT_BENCH_START_METHOD", default)


def _preload() -> None:
    """Import what the workers use, in this process: forked workers then start with it imported."""
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401

    import grassopt.distributed  # noqa: F401
    import grassopt.memory  # noqa: F401
    import grassopt.train.model  # noqa: F401


def run_case(args: argparse.Namespace, preset: str, mode: str, world: int) -> list[dict[str, Any]]:
    """The rows of every rank of one case (a fresh group of ``world`` processes)."""
    _preload()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, f"file://{tmp}/store", args, preset, mode, tmp), nprocs=world,
                           join=True, start_method=start_method())
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


# ---------------------------------------------------------------------------------------- summary
def estimated(args: argparse.Namespace, preset: str, mode: str, world: int) -> dict[str, int]:
    """``grassopt memory``'s bytes on the fullest rank (``--fsdp --world-size N [--replicated]``; DDP: one
    process's): ``states`` and ``total`` (weights, gradients, states, activations, FSDP's transient)."""
    from grassopt.train.estimate import estimate

    est = estimate(args.model, preset, rank=args.rank, vocab_size=args.vocab, seq_len=args.seq_len,
                   batch_size=args.batch)
    t = est.totals() if mode == "ddp" else est.per_rank(world, owners=mode == "fsdp-owners")
    return {"states": t["states"], "total": t["total"]}


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One line per (preset, mode, world): the fullest (slowest) rank's figures, the mean bytes sent."""
    cases: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        cases.setdefault((r["preset"], r["mode"], r["world"]), []).append(r)
    out = []
    for (preset, mode, world), rs in cases.items():
        def sent(r: dict, phase: str, which: str = "update") -> int:
            return sum(k["sent"] for k in r["counted"][which][phase].values())

        def pooled(r: dict, key: str, kind: str) -> float | None:
            v = r[key][kind]
            if not v:
                return None
            return statistics.median(v) if kind == "normal" else statistics.fmean(v)

        def worst(key: str, kind: str, rs: list[dict] = rs) -> float | None:
            vals = [pooled(r, key, kind) for r in rs]
            return None if any(v is None for v in vals) else max(v for v in vals if v is not None)

        growth = [r["rss_growth"] for r in rs]
        est = estimated(args, preset, mode, world)
        out.append({
            "preset": preset, "mode": mode, "world": world,
            "state_bytes": max(r["state_bytes"] for r in rs),
            "state_bytes_sum": sum(r["state_bytes"] for r in rs),
            "state_projected": max(r["state_projected"] for r in rs),
            "state_estimate": est["states"],
            "peak_tensors": max(r["counted"]["update"]["train_step_peak"] for r in rs),
            "peak_estimate": est["total"],
            "rss_growth": None if None in growth else max(growth),
            "tensor_peak_step": max(max(r["counted"][w]["tensor_peak"] for w in ("normal", "update")) for r in rs),
            "step_normal_s": worst("step_s", "normal"), "step_update_s": worst("step_s", "update"),
            "cpu_normal_s": worst("step_cpu_s", "normal"), "cpu_update_s": worst("step_cpu_s", "update"),
            "flops_normal": max(r["counted"]["normal"]["flops"] for r in rs),
            "flops_update": max(r["counted"]["update"]["flops"] for r in rs),
            "basis_flops": max(r["counted"]["update"]["flops"] - r["counted"]["normal"]["flops"] for r in rs),
            "owned_cost": max(r["owned"]["cost"] for r in rs),
            "sent_step": statistics.fmean(sent(r, "comm_step") for r in rs),
            "sent_step_max": max(sent(r, "comm_step") for r in rs),
            "sent_fwd_bwd": statistics.fmean(sent(r, "comm_fwd_bwd") for r in rs),
            "sent_fwd_bwd_max": max(sent(r, "comm_fwd_bwd") for r in rs),
        })
    return sorted(out, key=lambda s: (args.presets.index(s["preset"]), MODES.index(s["mode"]), s["world"]))


RATIO_KEYS = ("state_bytes", "peak_tensors", "rss_growth", "step_normal_s", "step_update_s", "cpu_update_s", "flops_update",
              "basis_flops", "owned_cost")


def add_ratios(summary: list[dict[str, Any]]) -> None:
    """``ratio_<key>``: each figure over the same preset and mode's world 1 (None without a world-1 line)."""
    base = {(s["preset"], s["mode"]): s for s in summary if s["world"] == 1}
    for s in summary:
        b = base.get((s["preset"], s["mode"]))
        for k in RATIO_KEYS:
            v, w = s.get(k), b.get(k) if b else None
            s[f"ratio_{k}"] = v / w if v is not None and w else None


# ---------------------------------------------------------------------------------------- report
def _mb(b: float | None) -> str:
    return "–" if b is None else f"{b / 1e6:.2f}"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{1e3 * v:.1f}"


def target_lines(summary: list[dict[str, Any]], cores: int) -> list[str]:
    """Met/missed for fsdp-owners at each world size above 1 (against its own world 1; DDP's world 1, one
    process's plain ``SubspaceAdamW``, given beside it)."""
    ddp1 = {s["preset"]: s for s in summary if s["mode"] == "ddp" and s["world"] == 1}
    lines = []
    for s in summary:
        if s["mode"] != "fsdp-owners" or s["world"] == 1 or s["ratio_state_bytes"] is None:
            continue
        n, p, d = s["world"], s["preset"], ddp1.get(s["preset"])

        def vs_ddp(key: str, s: dict = s, d: dict | None = d) -> str:
            return f"; against DDP's world 1: {s[key] / d[key]:.3f}" if d and s[key] is not None and d[key] else ""

        st, bound_s = s["ratio_state_bytes"], STATE_TARGET / n
        lines.append(f"- {p}, N = {n}, optimizer state per rank: {st:.3f} of world 1's, target ≤ {bound_s:.3f} "
                     f"(1.1/N): **{'met' if st <= bound_s else 'missed'}**{vs_ddp('state_bytes')}.")
        bound_t = TIME_TARGET / n
        wall, cpu_r, fl = s["ratio_step_update_s"], s["ratio_cpu_update_s"], s["ratio_flops_update"]
        if n <= cores and wall is not None:
            lines.append(f"- {p}, N = {n}, basis-update step per rank, **measured** ({n} processes on {cores} cores): "
                         f"{wall:.3f} of world 1's wall time, target ≤ {bound_t:.3f} (1.3/N): "
                         f"**{'met' if wall <= bound_t else 'missed'}** (CPU time {_x(cpu_r)}; FLOPs {_x(fl)}"
                         f"{vs_ddp('step_update_s')}).")
        else:
            lines.append(f"- {p}, N = {n}, basis-update step per rank, **counted in FLOPs** ({n} processes share "
                         f"{cores} cores, so wall times are not per-core times): {fl:.3f} of world 1's FLOPs, target ≤ "
                         f"{bound_t:.3f} (1.3/N): **{'met' if fl <= bound_t else 'missed'}** (measured with cores "
                         f"shared: wall {_x(wall)}, CPU time {_x(cpu_r)}).")
    return lines


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("grassopt", "numpy", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    import subprocess
    try:  # the checkout that ran (PYTHONPATH=. runs it whatever is installed)
        commit = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if commit:
        out["grassopt"] = f"{out.get('grassopt', '?')} (commit {commit})"
    return out


def model_shape(args: argparse.Namespace) -> dict[str, int]:
    """Parameters of the model and of its projected matrices (the hidden linear layers)."""
    import grassopt
    from grassopt.train.model import Llama, config

    with torch.device("meta"):
        model = Llama(config(args.model, vocab_size=args.vocab, max_seq_len=args.seq_len))
    groups = grassopt.param_groups(model, "subtrack++", rank=args.rank)
    projected = [p for g in groups if g.get("rank") is not None
                 for p in (x[1] if isinstance(x, tuple) else x for x in g["params"])]
    return {"parameters": sum(p.numel() for p in model.parameters()), "projected_matrices": len(projected),
            "projected_parameters": sum(p.numel() for p in projected), "blocks": len(model.layers)}


def report(rows: list[dict[str, Any]], args: argparse.Namespace, dest: Path, wall: float,
           load: tuple[list[float], list[float]] | None = None) -> str:
    """Write distributed.md (keeping its analysis block), .json and .png; return the markdown. ``load``: the
    load averages (1, 5, 15 min) at the start and the end of the run."""
    summary = summarize(rows, args)
    add_ratios(summary)
    cores = os.cpu_count() or 1
    cmd = "python benchmarks/distributed.py " + " ".join(shlex.quote(a) for a in args.argv)
    vers = versions()
    steps = 1 + args.updates * args.update_interval
    shape = model_shape(args)
    loads = (f" Load average (1 min) {load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end." if load else "")
    lines = [
        "# Per rank under DDP, replicated FSDP and owner-sharded FSDP, at 1, 2 and 4 processes", "",
        f"Command: `{cmd.strip()}` ({wall / 60:.1f} min). "
        f"Machine: {platform.machine()}, {cores} cores; " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "." + loads,
        "",
        f"Model `{args.model}` (vocabulary {args.vocab}; {shape['parameters'] / 1e6:.2f} M parameters, of which "
        f"{shape['projected_parameters'] / 1e6:.2f} M in the {shape['projected_matrices']} projected matrices of "
        f"{shape['blocks']} blocks), fp32, rank {args.rank} for the projected matrices, a basis "
        f"update every {args.update_interval} steps; each rank trains on its own micro-batch of {args.batch} x "
        f"{args.seq_len} random tokens; gloo, one intra-op thread per process; {steps} steps per case: the first (it "
        f"builds the bases) untimed, the last two (one normal step, one basis update) counted instead of timed. Every (preset, mode, world size) is a fresh "
        f"group of processes. `ddp`: `SubspaceAdamW` under `DistributedDataParallel`; `fsdp-replicated`: "
        f"`FSDPSubspaceAdamW(owners=False)`; `fsdp-owners`: `FSDPSubspaceAdamW(owners=True)` (what `grassopt train "
        f"--fsdp` uses). Ratios (×) are to the same preset and mode at world size 1.",
        "",
        "Presets: `subtrack++`, the default (its basis update is one Grassmann step: a few products of the gradient "
        "with the basis, the size of the projections) and `galore`, whose basis update is an SVD of every gradient "
        "(most of its update step's FLOPs): the telling case for the basis-update target.",
        "",
        f"**Timings were taken on a {cores}-core machine**: up to {cores} processes have a core each; at larger world "
        "sizes the processes share cores, so their wall times include waiting for a core, and the basis-update target "
        "is checked in counted FLOPs there (the process CPU time is given as well).",
        "",
        "How each figure is obtained (per rank; the table gives the fullest or slowest rank, bytes sent the mean over "
        "ranks):",
        "",
        "- *state*: bytes of the tensors in the optimizer's state on that rank (`grassopt.memory.state_bytes`); "
        "*estimate*: `grassopt memory --fsdp --world-size N` (`Estimate.per_rank`: its fullest rank; "
        "`--replicated` for fsdp-replicated; DDP: the whole state);",
        "- *peak tensors*: the most tensor bytes alive at once during one basis-update training step (forward, "
        "backward, optimizer step): those alive before it (this rank's weights, the optimizer state and, under DDP, "
        "its gradient buckets) plus the peak of what the step allocates (`grassopt.profiling.TensorPeak`, a dispatch "
        "counter); *estimate*: `grassopt memory`'s total for the rank (weights, gradients, states, activations of "
        "the micro-batch, FSDP's gathered transient: an upper bound from the shapes); *opt. step peak*: what the "
        "optimizer step alone allocates at its worst moment (the gathered matrices of the owners, the full matrix "
        "and gradient of the replicated step); *peak RSS +*: the process's peak resident memory over the timed steps "
        "minus its resident memory before the model was built (`VmHWM`, reset by `grassopt.profiling.reset_peak_rss` "
        "after the first step; also counts the allocator's and gloo's buffers and library code paged in by the "
        "first step);",
        "- *step*: the optimizer step alone, from a barrier after the backward to its return: median of the normal "
        "steps, mean of the basis-update steps (wall clock; CPU: the process's CPU time, gloo's threads included);",
        "- *GFLOP*: `torch.utils.flop_counter` over one basis-update step (matrix products, plus textbook counts of "
        "the SVD, QR and eigendecompositions: `LINALG_FLOPS`; elementwise work not counted); *basis*: that minus "
        "a normal step's, the basis update's own FLOPs;",
        "- *sent*: MB each rank sends per step by the collectives of the optimizer step and of the forward+backward "
        "(DDP's gradient all-reduce; FSDP2's all-gathers and reduce-scatters), counted by a dispatch mode on every "
        "collective with ring-algorithm accounting (what a bandwidth-optimal implementation moves, not what gloo "
        "writes to its sockets).",
        "",
    ]
    for preset in args.presets:
        ss = [s for s in summary if s["preset"] == preset]
        if not ss:
            continue
        lines += [f"## {preset}", "",
                  "| mode | N | state (MB) | × | estimate (MB) | peak tensors (MB) | × | estimate (MB) | "
                  "opt. step peak (MB) | peak RSS + (MB) | sent, opt. step (MB) | sent, fwd+bwd (MB) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in ss:
            lines.append(f"| {s['mode']} | {s['world']} | {_mb(s['state_bytes'])} | {_x(s['ratio_state_bytes'])} | "
                         f"{_mb(s['state_estimate'])} | {_mb(s['peak_tensors'])} | {_x(s['ratio_peak_tensors'])} | "
                         f"{_mb(s['peak_estimate'])} | {_mb(s['tensor_peak_step'])} | {_mb(s['rss_growth'])} | "
                         f"{_mb(s['sent_step'])} | {_mb(s['sent_fwd_bwd'])} |")
        lines += ["", "| mode | N | step, normal (ms) | × | step, basis update (ms) | × | CPU, basis update (ms) | × | "
                  "GFLOP, basis-update step | × | GFLOP, basis | × |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in ss:
            lines.append(f"| {s['mode']} | {s['world']} | {_ms(s['step_normal_s'])} | {_x(s['ratio_step_normal_s'])} | "
                         f"{_ms(s['step_update_s'])} | {_x(s['ratio_step_update_s'])} | {_ms(s['cpu_update_s'])} | "
                         f"{_x(s['ratio_cpu_update_s'])} | {s['flops_update'] / 1e9:.3f} | "
                         f"{_x(s['ratio_flops_update'])} | {s['basis_flops'] / 1e9:.3f} | "
                         f"{_x(s['ratio_basis_flops'])} |")
        lines.append("")
    targets = target_lines(summary, cores)
    if targets:
        lines += ["## Targets (fsdp-owners)", "", *targets, ""]
    lines += ["![distributed](distributed.png)", ""]
    text = "\n".join(lines)
    md = dest / "distributed.md"
    keep = ""
    if md.exists():
        old = md.read_text()
        if "<!-- analysis -->" in old:
            keep = old[old.index("<!-- analysis -->"):]
    dest.mkdir(parents=True, exist_ok=True)
    md.write_text(text + "\n" + (keep or "<!-- analysis -->\n<!-- /analysis -->\n"))
    (dest / "distributed.json").write_text(json.dumps(
        {"command": cmd.strip(), "args": {k: v for k, v in vars(args).items() if k != "argv"}, "versions": vers,
         "machine": {"arch": platform.machine(), "cores": cores, "load_start_end": load}, "model": shape,
         "wall_s": wall, "summary": summary, "rows": rows},
        indent=1))
    plot(summary, args, dest / "distributed.png", cores)
    return text


def plot(summary: list[dict[str, Any]], args: argparse.Namespace, path: Path, cores: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("state_bytes", 1e6, "optimizer state per rank (MB)", STATE_TARGET),
              ("step_update_s", 1e-3, "basis-update step, wall (ms)", TIME_TARGET),
              ("cpu_update_s", 1e-3, "basis-update step, CPU time (ms)", TIME_TARGET),
              ("flops_update", 1e9, "basis-update step (GFLOP)", TIME_TARGET)]
    presets = [p for p in args.presets if any(s["preset"] == p for s in summary)]
    fig, axes = plt.subplots(len(presets), len(panels), figsize=(4 * len(panels), 3.4 * len(presets)),
                             squeeze=False)
    ws = sorted({s["world"] for s in summary})
    for i, preset in enumerate(presets):
        for j, (key, unit, label, target) in enumerate(panels):
            ax = axes[i][j]
            for mode in MODES:
                ss = [s for s in summary if s["preset"] == preset and s["mode"] == mode and s[key] is not None]
                if not ss:
                    continue
                colour, name = STYLE[mode]
                dashed = mode == "ddp"  # (DDP's FLOPs are the replicated step's: drawn dashed over them)
                ax.plot([s["world"] for s in ss], [s[key] / unit for s in ss], "s--" if dashed else "o-",
                        color=colour, label=name, zorder=3 if dashed else 2)
                one = next((s for s in ss if s["world"] == 1), None)
                if one is not None and mode == "fsdp-owners":
                    ax.plot(ws, [target * one[key] / unit / n if n > 1 else one[key] / unit for n in ws], ":",
                            color="k", lw=0.9, label=f"target: {target:g}/N of world 1")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ws, [str(w) for w in ws])
            ax.set_xlabel("processes (N)" + (f"; > {cores} share cores" if key.endswith("_s") else ""))
            ax.set_ylabel(label)
            ax.set_title(f"{preset}", fontsize=10)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if i == 0 and j in (0, 1):
                ax.legend(fontsize=7)
    fig.suptitle(f"model {args.model}, vocabulary {args.vocab}, rank {args.rank}, gloo on {cores} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="a grassopt.train.model config (default tiny: 4 blocks)")
    ap.add_argument("--vocab", type=int, default=2048,
                    help="vocabulary size (default 2048: the projected matrices hold most of the parameters)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--update-interval", type=int, default=3, help="steps between basis updates (>= 2)")
    ap.add_argument("--updates", type=int, default=4,
                    help="basis updates per case after the first step (one of them counted, the others timed)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--presets", nargs="+", default=["subtrack++", "galore"])
    ap.add_argument("--dest", default=str(HERE))
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.update_interval < 2 or args.updates < 2:
        ap.error("--update-interval and --updates must be at least 2 (one basis update is counted, not timed)")
    start, load0 = time.perf_counter(), list(os.getloadavg())
    rows: list[dict[str, Any]] = []
    for preset in args.presets:
        for mode in args.modes:
            for world in args.worlds:
                t0 = time.perf_counter()
                rows += run_case(args, preset, mode, world)
                print(f"[distributed] {preset} {mode} N={world}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                      flush=True)
    print(report(rows, args, Path(args.dest), time.perf_counter() - start, (load0, list(os.getloadavg()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
