"""Whole training-step time of every preset on the `tiny` LLaMA, measured interleaved.

`grassopt bench` runs presets one after the other, so a change in the machine's load between two
runs shows up as a speed difference between presets. Here every preset trains its own copy of the
model (same initialisation) in this one process, and the presets take turns step by step on the same
SOTU batches (round robin): forward, backward, global-norm clipping, optimizer step, zero_grad.
A slow phase of the machine hits them all alike, and the ratios to `torch.optim.AdamW(fused=True)`
(the `adamw-torch` preset: torch's fused kernel, its fastest AdamW on this CPU) are taken within this run. Basis updates happen every `--update-interval` steps, as in training.
Each grassopt preset is followed by its compiled variant (`:compile=True`, `--compile`; `--no-compile` leaves
them out); the first step, which compiles, is left out of the means like every first step.

    python benchmarks/train_step_time.py [--steps 60] [--update-interval 20] [--rank 64] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from grassopt import PRESETS
from grassopt.bench.cli import parse_variant
from grassopt.train import data as data_mod
from grassopt.references import reference_versions
from grassopt.train.loop import TrainConfig, build_optimizer, optimizer_state_bytes
from grassopt.train.model import Llama, config

DEFAULT = ["adamw-torch", "adamw", "galore", "ref-galore", "fira", "subtrack++", "grasswalk", "grassjump", "apollo",
           "ref-apollo", "apollo-mini:rank=1", "ldadam:update_interval=1",
           # int8 moments beside the 8-bit AdamW of bitsandbytes and torchao
           "adamw:state_dtype=int8", "subtrack++:state_dtype=int8", "ref-adamw8bit", "ref-torchao-adamw8bit"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--presets", nargs="+", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--update-interval", type=int, default=20)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="no compiled rows (by default each grassopt preset is followed by its :compile=True variant)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args(argv)
    ds = data_mod.prepare(None, vocab_size=8192, progress=False)
    contestants = []
    for label in with_compiled(args.presets) if args.compile else args.presets:
        name, fields, options = parse_variant(label)
        cfg = TrainConfig(**{"model": args.model, "preset": name, "rank": args.rank, "lr": 1e-3,
                             "update_interval": args.update_interval, **fields}, options=options)
        torch.manual_seed(0)
        model = Llama(config(args.model, vocab_size=ds.vocab_size, max_seq_len=max(args.seq_len, 1024)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = build_optimizer(model, cfg)
        contestants.append({"label": label, "model": model, "opt": opt, "times": [], "opt_times": []})
    sampler = data_mod.BatchSampler(ds.train, args.batch_size, args.seq_len, seed=0)
    for step in range(args.steps):
        x, y = sampler.next()
        for c in contestants:
            model, opt = c["model"], c["opt"]
            t0 = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            c["times"].append(t2 - t0)
            c["opt_times"].append(t2 - t1)
        if step % 10 == 0:
            print(f"step {step}/{args.steps}", file=sys.stderr, flush=True)
    tokens = args.batch_size * args.seq_len
    rows = []
    for c in contestants:
        t = c["times"][1:]  # the first step builds every basis and allocates the state
        rows.append({"label": c["label"], "mean_step_s": statistics.fmean(t), "median_step_s": statistics.median(t),
                     "mean_opt_ms": 1e3 * statistics.fmean(c["opt_times"][1:]),
                     "tokens_per_s": tokens / statistics.fmean(t), "state_bytes": optimizer_state_bytes(c["opt"])})
    ref = next(r for r in rows if r["label"] == "adamw-torch")
    cmd = "python benchmarks/train_step_time.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = ["# Training-step time on `tiny`, every preset interleaved", "",
             f"Command: `{cmd.strip()}`; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch "
             f"{args.batch_size} x {args.seq_len} tokens, rank {args.rank} (apollo-mini 1), basis update every "
             f"{args.update_interval} steps (ldadam every step), {args.steps} steps of each preset taken in turns on the "
             "same batches; the first step (basis initialisation) is left out of the means. `adamw-torch` is "
             "`torch.optim.AdamW(fused=True)`. State: the optimizer's state tensors as allocated "
             "(`grassopt.train.loop.optimizer_state_bytes`, one counter for all).", "",
             "Packages: " + ", ".join(f"{k} {v}" for k, v in reference_versions(
                 [p for p in args.presets if p.startswith("ref-")]).items()), "",
             "| preset | mean step (s) | median step (s) | optimizer (ms) | tokens/s | tokens/s / AdamW(fused) "
             "| state (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['mean_step_s']:.3f} | {r['median_step_s']:.3f} | {r['mean_opt_ms']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.3f} | "
                     f"{r['state_bytes'] / 1e6:.2f} |")
    out = Path(args.out)
    md = out / "train_step_time.md"  # the hand-written analysis of the last report is kept
    old = md.read_text() if md.exists() else ""
    keep = old[old.index("<!-- analysis -->"):] if "<!-- analysis -->" in old else "<!-- analysis -->\n<!-- /analysis -->\n"
    md.write_text("\n".join(lines) + "\n\n" + keep)
    (out / "train_step_time.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    plot(rows, out / "train_step_time.png")
    print("\n".join(lines))
    return 0


def with_compiled(labels: list[str]) -> list[str]:
    """Each grassopt preset's variant followed by the same with ``compile=True``."""
    out = []
    for label in labels:
        out.append(label)
        if label.partition(":")[0] in PRESETS and "compile=" not in label:
            out.append(f"{label}{',' if ':' in label else ':'}compile=True")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next(r for r in rows if r["label"] == "adamw-torch")["tokens_per_s"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh([r["label"] for r in rows], [r["tokens_per_s"] / ref for r in rows], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(0.97, color="tab:red", ls="--", lw=0.8, label="0.97x AdamW")
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s relative to torch.optim.AdamW(fused=True) (interleaved, same batches)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
