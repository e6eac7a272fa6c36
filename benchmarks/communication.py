"""Bytes all-reduced per step under DDP, by optimizer (benchmarks/communication.md, .png, .json).

The RSO paper (Chen et al., "A Memory Efficient Randomized Subspace Optimization Method for Training Large
Language Models", 2025) claims less inter-GPU communication than GaLore: its subproblems train a small
``B`` per layer, so only ``B``'s gradients need an all-reduce, where GaLore (and every optimizer that
projects after the reduction: AdamW, SubTrack++) all-reduces the full gradients. This measures it: real
``torch.distributed`` processes (gloo, two ranks on this machine), ``DistributedDataParallel`` with a
communication hook that counts the bytes of every bucket it all-reduces, a few training steps of the same
model per optimizer. A count of bytes, not a timing: it does not depend on the machine's load.

    python benchmarks/communication.py [--model tiny] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
OPTIMIZERS = ("adamw-torch", "galore", "subtrack++", "rso")


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from grassopt import registry
    from grassopt.train.model import Llama, config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    rows = {}
    try:
        for name in OPTIMIZERS:
            torch.manual_seed(0)
            model = Llama(config(args.model, vocab_size=args.vocab))
            opt = registry.build(name, model, lr=1e-3, rank=args.rank, update_interval=2, sketch_rank=args.sketch_rank)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            sent = {"bytes": 0, "calls": 0}

            def hook(state, bucket, sent=sent):
                buf = bucket.buffer()
                sent["bytes"] += buf.numel() * buf.element_size()
                sent["calls"] += 1
                return allreduce_hook(None, bucket)

            ddp.register_comm_hook(None, hook)
            g = torch.Generator().manual_seed(100 + rank)
            for _ in range(args.steps):
                x = torch.randint(0, args.vocab, (2, 64), generator=g)
                _, loss = ddp(x, x.roll(-1, 1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if p.requires_grad and not (n.startswith("layers.") and p.dim() == 2))
            rows[name] = {"bytes_per_step": sent["bytes"] / args.steps, "buckets_per_step": sent["calls"] / args.steps,
                          "trainable_bytes": trainable, "rest_bytes": rest,
                          "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(2, f"file://{tmp}/store", args, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def report(rows: dict, args: argparse.Namespace, dest: Path) -> str:
    base = rows["galore"]["bytes_per_step"]
    cmd = "python benchmarks/communication.py " + " ".join(sys.argv[1:])
    lines = ["# Bytes all-reduced per step under DDP", "",
             f"Command: `{cmd.strip()}`. torch {torch.__version__}, gloo, 2 processes. Model `{args.model}` "
             f"(vocabulary {args.vocab}), fp32, rank {args.rank} for the projected presets, RSO's sketch rank "
             f"{args.sketch_rank} of each layer's input side; {args.steps} steps. A DDP communication hook counts the "
             "bytes of every gradient bucket it all-reduces (`benchmarks/communication.py`): a count, not a timing.",
             "*hidden matrices*: what is all-reduced beyond the embedding, head and norms (the same for every "
             "optimizer here): the part the RSO paper's claim is about.",
             "", "| optimizer | all-reduced per step (MB) | / GaLore | of it, hidden matrices (MB) | / GaLore's | "
             "buckets per step |", "|---|---:|---:|---:|---:|---:|"]
    hidden = rows["galore"]["bytes_per_step"] - rows["galore"]["rest_bytes"]
    for name, r in rows.items():
        h = r["bytes_per_step"] - r["rest_bytes"]
        lines.append(f"| {name} | {r['bytes_per_step'] / 1e6:.3f} | {r['bytes_per_step'] / base:.3f} | "
                     f"{h / 1e6:.3f} | {h / hidden:.3f} | {r['buckets_per_step']:g} |")
    lines += ["", "![communication](communication.png)", ""]
    text = "\n".join(lines)
    (dest / "communication.md").write_text(text)
    (dest / "communication.json").write_text(json.dumps({"rows": rows, "command": cmd.strip()}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(rows), [r["bytes_per_step"] / 1e6 for r in rows.values()], color="tab:blue")
    ax.set_xlabel("MB all-reduced per step (DDP, 2 ranks)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(dest / "communication.png", dpi=110)
    plt.close(fig)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--sketch-rank", type=float, default=0.125)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dest", default=str(HERE))
    args = ap.parse_args(argv)
    print(report(measure(args), args, Path(args.dest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
