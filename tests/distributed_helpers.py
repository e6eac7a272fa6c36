"""Shared pieces of the multi-process tests: spawning gloo workers and the training runs they do.

Workers are module-level functions (``torch.multiprocessing.spawn`` pickles them by reference).
Each worker uses one intra-op thread, as the test session does, so every rank runs the same
kernels and results can be compared bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: the nano model used by the distributed tests
SEQ_LEN = 32
RANK = 8
UPDATE_INTERVAL = 5  # basis updates at steps 5, 10, ... so 30 steps see several of them
LR = 3e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_method() -> str:
    """``fork`` where available: the children inherit the imported torch and start in about a second
    instead of ten on a busy 2-core machine. Safe here because the test processes use one intra-op
    thread (no OpenMP pool exists to be broken by the fork). ``GRASSOPT_TEST_START_METHOD=spawn``
    forces fresh interpreters."""
    default = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return os.environ.get("GRASSOPT_TEST_START_METHOD", default)


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined in a gloo group (a free port on
    localhost); a worker's exception is re-raised here with its traceback."""
    port = free_port()
    mp.start_processes(_entry, args=(fn, world, port, *args), nprocs=world, join=True,
                       start_method=start_method())


def _entry(rank: int, fn, world: int, port: int, *args) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def build_model(vocab_size: int, seed: int = 0):
    from grassopt.train.model import Llama, config

    torch.manual_seed(seed)
    return Llama(config("nano", vocab_size=vocab_size, max_seq_len=SEQ_LEN))


def build_optimizer(model, preset: str):
    import grassopt

    if preset == "adamw-torch":
        return torch.optim.AdamW(model.parameters(), lr=LR)
    kw = {} if grassopt.PRESETS[preset] is None else {"update_interval": UPDATE_INTERVAL}
    return grassopt.make_optimizer(model, preset, lr=LR, rank=RANK, seed=0, **kw)


def local_slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    b = t.shape[0] // world
    return t[rank * b:(rank + 1) * b]


def train(model, opt, batches: torch.Tensor, rank: int = 0, world: int = 1, ddp=None, grad_accum: int = 1,
          layerwise=None) -> list[float]:
    """``len(batches) // grad_accum`` optimizer steps; ``batches`` is ``(n, global_batch, SEQ_LEN + 1)``.

    Each rank takes its slice of every global batch; with ``layerwise`` (a LayerwiseUpdater) the
    backward of the last micro-batch is the step.
    """
    net = ddp if ddp is not None else model
    losses = []
    for s in range(len(batches) // grad_accum):
        for k in range(grad_accum):
            b = local_slice(batches[s * grad_accum + k], rank, world)
            last = k == grad_accum - 1
            if layerwise is not None:
                ctx = layerwise.accumulate(enabled=not last)
            elif ddp is not None and not last:
                ctx = ddp.no_sync()
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                loss = net(b[:, :-1], b[:, 1:])[1]
                (loss / grad_accum).backward()
            losses.append(loss.item())
        if layerwise is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses


def save_params(model, path: Path) -> None:
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)


# ---------------------------------------------------------------------------------------- workers
def ddp_presets_worker(rank: int, world: int, out: str, presets: list[str], vocab: int) -> None:
    """Each preset: 30 DDP steps from the same init; save the final parameters of this rank."""
    from grassopt.distributed import assert_in_sync

    batches = torch.load(Path(out) / "batches.pt")
    for preset in presets:
        model = build_model(vocab)
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        opt = build_optimizer(model, preset)
        train(model, opt, batches, rank, world, ddp=ddp)
        assert_in_sync(model.parameters(), what=f"{preset} parameters")
        save_params(model, Path(out) / f"{preset}-rank{rank}.pt")


def ddp_layerwise_worker(rank: int, world: int, out: str, cases: list[tuple[str, bool]], vocab: int,
                         grad_accum: int) -> None:
    """Each (preset, gradient_as_bucket_view): layer-wise DDP and ordinary DDP from the same init."""
    from grassopt.layerwise import LayerwiseError, LayerwiseUpdater

    batches = torch.load(Path(out) / "batches.pt")
    # Refused: a multi-process run without the DDP model (hooks would see local gradients).
    model = build_model(vocab)
    try:
        LayerwiseUpdater(build_optimizer(model, "subtrack++"))
    except LayerwiseError as e:
        assert "unsynchronised" in str(e), e
    else:
        raise AssertionError("LayerwiseUpdater without ddp_model was accepted in a 2-process run")
    for preset, as_view in cases:
        for mode in ("plain", "layerwise"):
            model = build_model(vocab)
            ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=as_view)
            opt = build_optimizer(model, preset)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
            lw = LayerwiseUpdater(opt, ddp_model=ddp, clip_norm=None) if mode == "layerwise" else None
            steps = len(batches) // grad_accum
            for s in range(steps):
                train(model, opt, batches[s * grad_accum:(s + 1) * grad_accum], rank, world, ddp=ddp,
                      grad_accum=grad_accum, layerwise=lw)
                if lw is not None:
                    assert all(p.grad is None for p in model.parameters()), "gradients left after a layer-wise step"
                sched.step()
            if lw is not None:
                assert lw.step_count == steps, (lw.step_count, steps)
            save_params(model, Path(out) / f"lw-{preset}-{as_view}-{mode}-rank{rank}.pt")


def fsdp_worker(rank: int, world: int, out: str, vocab: int, steps: int) -> None:
    """FSDP2 on gloo: preset 'adamw' (plain groups) trains and matches DDP; projected groups refuse."""
    import grassopt
    from grassopt.distributed import ShardedParameterError, check_params
    from torch.distributed.fsdp import fully_shard

    batches = torch.load(Path(out) / "batches.pt")[:steps]
    result = {}
    # DDP reference
    model = build_model(vocab)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(model, "adamw")
    result["ddp_losses"] = train(model, opt, batches, rank, world, ddp=ddp)
    result["ddp"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # FSDP2
    model = build_model(vocab)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    from torch.distributed.tensor import DTensor
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = build_optimizer(model, "adamw")
    result["fsdp_losses"] = train(model, opt, batches, rank, world)
    result["fsdp"] = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                      for k, v in model.state_dict().items()}
    # projected groups on DTensors: the documented error, from check_params and (once the optimizer
    # calls it) from SubspaceAdamW itself
    groups = grassopt.param_groups(model, "subtrack++", rank=RANK)
    try:
        check_params(groups)
    except ShardedParameterError as e:
        result["check_error"] = str(e)
    try:
        grassopt.SubspaceAdamW(groups, lr=LR)
        result["ctor_error"] = None
    except ShardedParameterError as e:
        result["ctor_error"] = str(e)
    torch.save(result, Path(out) / f"fsdp-rank{rank}.pt")
