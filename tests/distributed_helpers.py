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
    if preset in ("rso", "rso-sgd"):  # sketches the model in place: call before wrapping it in DDP
        from grassopt.sketch import rso
        return rso(model, rank=0.25, inner_steps=UPDATE_INTERVAL, lr=LR, seed=0,
                   inner="sgd" if preset == "rso-sgd" else "adam")
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
        opt = build_optimizer(model, preset)  # before DDP: rso replaces layers and adds the B parameters
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
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
    # a user communication hook (fp16 compression) composes with the layer-wise step
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    for mode in ("plain", "layerwise"):
        model = build_model(vocab)
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        opt = build_optimizer(model, "subtrack++")
        lw = None
        if mode == "layerwise":
            lw = LayerwiseUpdater(opt, ddp_model=ddp, comm_hook=fp16_compress_hook)
        else:
            ddp.register_comm_hook(None, fp16_compress_hook)
        train(model, opt, batches[:4], rank, world, ddp=ddp, layerwise=lw)
        save_params(model, Path(out) / f"lw-fp16-{mode}-rank{rank}.pt")


def _fsdp_model(vocab: int):
    from torch.distributed.fsdp import fully_shard

    model = build_model(vocab)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def _full(sd: dict) -> dict:
    from grassopt.distributed import is_dtensor

    return {k: (v.full_tensor() if is_dtensor(v) else v).detach().clone() for k, v in sd.items()}


def fsdp_worker(rank: int, world: int, out: str, vocab: int, steps: int, presets: list[str]) -> None:
    """FSDP2 on gloo, 2 ranks: each preset trains ``steps`` steps with FSDP2 and with DDP from the
    same init. Projected presets use FSDPSubspaceAdamW; SubspaceAdamW itself must refuse them."""
    import grassopt
    from grassopt.distributed import FSDPSubspaceAdamW, ShardedParameterError, check_params, is_dtensor

    batches = torch.load(Path(out) / "batches.pt")[:steps]
    result: dict = {}
    for preset in presets:
        model = build_model(vocab)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = build_optimizer(model, preset)
        result[f"{preset}/ddp_losses"] = train(model, opt, batches, rank, world, ddp=ddp)
        result[f"{preset}/ddp"] = _full(model.state_dict())
        ddp_opt_state = opt.state_dict()

        model = _fsdp_model(vocab)
        assert all(is_dtensor(p) for p in model.parameters())
        kw = {} if grassopt.PRESETS[preset] is None else {"update_interval": UPDATE_INTERVAL}
        groups = grassopt.param_groups(model, preset, rank=RANK, **kw)
        opt = FSDPSubspaceAdamW(groups, lr=LR, seed=0)
        result[f"{preset}/fsdp_losses"] = train(model, opt, batches, rank, world)
        result[f"{preset}/fsdp"] = _full(model.state_dict())
        # the checkpoint has the DDP format (full tensors) and survives a load into a fresh optimizer
        sd = opt.state_dict()
        fresh = FSDPSubspaceAdamW(grassopt.param_groups(model, preset, rank=RANK, **kw), lr=LR, seed=0)
        fresh.load_state_dict(sd)
        again = fresh.state_dict()
        for i, st in sd["state"].items():
            for k, v in st.items():
                assert not is_dtensor(v), (i, k)
                w = ddp_opt_state["state"][i][k]
                assert type(v) is type(w) and (not torch.is_tensor(v) or v.shape == w.shape), (i, k)
                assert torch.equal(v, again["state"][i][k]) if torch.is_tensor(v) else v == again["state"][i][k]
        result[f"{preset}/opt_state_diff"] = max(
            (v.double() - ddp_opt_state["state"][i][k].double()).abs().max().item()
            for i, st in sd["state"].items() for k, v in st.items()
            if torch.is_tensor(v) and v.is_floating_point())
    # projected groups on DTensors: the documented error, from check_params and (once the optimizer
    # calls it) from SubspaceAdamW itself
    model = _fsdp_model(vocab)
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


def ddp_low_bit_worker(rank: int, world: int, out: str, vocab: int) -> None:
    """bf16 weights with stochastic rounding and int8 states under DDP: 10 steps, final weights saved."""
    import grassopt
    from grassopt.distributed import assert_in_sync

    batches = torch.load(Path(out) / "batches.pt")
    for preset in ("subtrack++", "grassjump", "adamw"):
        model = build_model(vocab).to(torch.bfloat16)
        kw = {} if grassopt.PRESETS[preset] is None else {"update_interval": UPDATE_INTERVAL}
        opt = grassopt.make_optimizer(model, preset, lr=LR, rank=RANK, seed=0, state_dtype="int8",
                                      stochastic_rounding=True, **kw)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        train(model, opt, batches, rank, world, ddp=ddp)
        assert_in_sync(model.parameters(), what=f"{preset} bf16 parameters")
        save_params(model, Path(out) / f"lowbit-{preset}-rank{rank}.pt")


def ddp_int8_weights_worker(rank: int, world: int, out: str, vocab: int) -> None:
    """int8 weights (grassopt.qlinear) with stochastic rounding under DDP, ordinary and layer-wise: built from
    the same seed on every rank and never broadcast (init_sync=False, broadcast_buffers=False, as `grassopt
    train` does), 6 steps; this rank's state_dict saved (codes and scales included)."""
    import grassopt
    from grassopt.layerwise import LayerwiseUpdater
    from grassopt.qlinear import quantize_linears

    batches = torch.load(Path(out) / "batches.pt")
    for mode in ("plain", "layerwise"):
        model = quantize_linears(build_model(vocab)).to(torch.bfloat16)
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=mode == "layerwise",
                                                        init_sync=False, broadcast_buffers=False)
        opt = grassopt.make_optimizer(model, "subtrack++", lr=LR, rank=RANK, seed=0, update_interval=UPDATE_INTERVAL,
                                      state_dtype="int8", basis_dtype="int8", stochastic_rounding=True)
        lw = LayerwiseUpdater(opt, ddp_model=ddp) if mode == "layerwise" else None
        train(model, opt, batches, rank, world, ddp=ddp, layerwise=lw)
        save_params(model, Path(out) / f"int8w-{mode}-rank{rank}.pt")
