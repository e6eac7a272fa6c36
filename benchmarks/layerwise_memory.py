"""Peak memory of `grassopt train` with and without layer-wise updates, and 2-rank DDP throughput.

Part 1: for the `small` LLaMA on SOTU and each of `adamw-torch`, `galore`, `subtrack++`, one
`grassopt train` process per configuration (so the peak resident memory is its own) runs a few
steps ordinarily and with `--layerwise` (per-parameter clipping in both, so the numbers are the
same computation), at two batch shapes: one where activations dominate and one where gradients
do. Two measures: the exact tensor bytes the second step allocates at its worst moment beyond the
weights and optimizer state (`--profile-memory`, grassopt.profiling.TensorPeak), and the process's
peak resident memory during training (Linux VmHWM).

Part 2: tokens/s of `small` with `subtrack++` in one process (2 threads) and in 2 DDP ranks started
by `torchrun` (gloo, 1 thread each), the same global batch, with and without `--layerwise`.

    python benchmarks/layerwise_memory.py            # about 15 minutes on 2 idle cores
    python benchmarks/layerwise_memory.py --smoke    # nano, 3 steps: checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from grassopt.bench.runner import ROOT, run_process

MIB = 2 ** 20


def train(out: Path, args: list[str], torchrun: int = 0) -> dict:
    """One `grassopt train` run in its own process (or `torchrun` with that many ranks)."""
    return run_process(out, [*args, "--no-progress", "--no-plot"], command="train", reuse=False,
                       keep_checkpoint=True, torchrun=torchrun)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ddp-steps", type=int, default=30)
    ap.add_argument("--shapes", nargs="+", default=["8x256", "1x256"], help="batch x sequence length")
    ap.add_argument("--presets", nargs="+", default=["adamw-torch", "galore", "subtrack++"])
    ap.add_argument("--out", default="runs/layerwise_memory")
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "layerwise_memory.md"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.rank, args.steps, args.ddp_steps, args.shapes = "nano", 16, 3, 4, ["4x64", "1x64"]
        args.report = str(Path(args.out) / "report.md")
    out = Path(args.out)
    started = time.perf_counter()
    common = ["--model", args.model, "--rank", str(args.rank), "--update-interval", "50", "--lr", "1e-3",
              "--clip", "1.0", "--clip-mode", "per-parameter", "--eval-every", "100000", "--eval-tokens", "2048"]
    mem_rows = []
    for shape in args.shapes:
        b, t = (int(v) for v in shape.split("x"))
        for preset in args.presets:
            row = {"shape": shape, "preset": preset}
            for mode in ("ordinary", "layerwise"):
                extra = ["--layerwise"] if mode == "layerwise" else []
                s = train(out / "memory" / f"{shape}-{preset}-{mode}",
                          [*common, "--preset", preset, "--batch-size", str(b), "--seq-len", str(t),
                           "--steps", str(args.steps), "--profile-memory", "--threads", "2", *extra])
                row[mode] = s
                print(f"[memory] {shape} {preset} {mode}: step peak {s['step_peak_tensor_bytes'] / MIB:.1f} MiB, "
                      f"process peak {(s['train_peak_rss_bytes'] or 0) / MIB:.0f} MiB", flush=True)
            mem_rows.append(row)
    b, t = (int(v) for v in args.shapes[0].split("x"))
    ddp_rows = []
    for label, ranks, threads, extra in (("1 process, 2 threads", 0, 2, []),
                                         ("2 DDP ranks (gloo), 1 thread each", 2, 1, []),
                                         ("1 process, 2 threads, layer-wise", 0, 2, ["--layerwise"]),
                                         ("2 DDP ranks, 1 thread each, layer-wise", 2, 1, ["--layerwise"])):
        per_rank = b // 2 if ranks else b
        s = train(out / "ddp" / label.replace(" ", "_").replace(",", ""),
                  [*common, "--preset", "subtrack++", "--batch-size", str(per_rank), "--seq-len", str(t),
                   "--steps", str(args.ddp_steps), "--threads", str(threads), *extra], torchrun=ranks)
        ddp_rows.append({"label": label, "summary": s})
        print(f"[ddp] {label}: {s['tokens_per_s']:.0f} tokens/s", flush=True)
    write(args, mem_rows, ddp_rows, time.perf_counter() - started, argv)
    return 0


def write(args, mem_rows, ddp_rows, wall, argv) -> None:
    import torch
    cmd = "python benchmarks/layerwise_memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    params = mem_rows[0]["ordinary"]["parameters"]
    lines = ["# Layer-wise updates: peak memory, and DDP throughput", ""]
    if args.smoke:
        lines += ["> **Smoke run** (nano, 3 steps): checks the pipeline; not results.", ""]
    lines += [
        f"Command: `{cmd.strip()}` (total {wall / 60:.1f} min); torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cores, fp32. Model `{args.model}` ({params:,} parameters: its gradients take "
        f"**{4 * params / MIB:.1f} MiB**), SOTU, rank {args.rank}, per-parameter clipping at 1.0 in both modes "
        "(global-norm clipping needs every gradient at once, which layer-wise mode never holds), one "
        "`grassopt train` process per row.", "",
        "*Step peak* is exact: the tensor bytes the second training step allocates at its worst moment, beyond "
        "the weights and the optimizer state that exist before it (`--profile-memory`, "
        "`grassopt.profiling.TensorPeak`: activations, gradients, temporaries). *Process peak* is the run's peak "
        "resident memory during training (Linux VmHWM, reset before the first step; it includes Python, torch, "
        "the corpus and the allocator's caches).", "",
        "| batch x seq | preset | step peak, ordinary (MiB) | step peak, layer-wise (MiB) | saved (MiB) | "
        "saved / gradients | process peak, ordinary (MiB) | process peak, layer-wise (MiB) | saved (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    grads = 4 * params
    for r in mem_rows:
        o, lw = r["ordinary"], r["layerwise"]
        d = o["step_peak_tensor_bytes"] - lw["step_peak_tensor_bytes"]
        po, pl = o.get("train_peak_rss_bytes"), lw.get("train_peak_rss_bytes")
        lines.append(f"| {r['shape']} | {r['preset']} | {o['step_peak_tensor_bytes'] / MIB:.1f} | "
                     f"{lw['step_peak_tensor_bytes'] / MIB:.1f} | {d / MIB:.1f} | {d / grads:.2f} | "
                     + (f"{po / MIB:.0f} | {pl / MIB:.0f} | {(po - pl) / MIB:.0f} |" if po and pl else "n/a | n/a | n/a |"))
    base = ddp_rows[0]["summary"]["tokens_per_s"]
    lines += ["", f"## Data parallel: tokens/s of `{args.model}` with `subtrack++`", "",
              f"Global batch {args.shapes[0]} tokens per step in every row (2 ranks: half each), "
              f"{args.ddp_steps} steps; tokens/s over the whole run (all ranks together).", "",
              "| setup | tokens/s | vs 1 process | final train loss |", "|---|---:|---:|---:|"]
    for r in ddp_rows:
        s = r["summary"]
        lines.append(f"| {r['label']} | {s['tokens_per_s']:.0f} | {s['tokens_per_s'] / base:.2f}x | "
                     f"{s.get('final_train_loss', float('nan')):.4f} |")
    lines += ["", "Commands of the rows: " + "; ".join(f"`{r['summary']['command']}`" for r in ddp_rows[:2]), ""]
    Path(args.report).write_text("\n".join(lines) + "\n")
    plot(mem_rows, Path(args.report).with_suffix(".png"))
    (Path(args.out) / "results.json").write_text(json.dumps({"memory": mem_rows, "ddp": ddp_rows}, indent=1,
                                                            default=str))
    print("\n".join(lines))


def plot(mem_rows: list[dict], path: Path) -> None:
    """Step peak and process peak, ordinary against layer-wise, one bar pair per (shape, preset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['shape']} {r['preset']}" for r in mem_rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(labels) + 1.5), sharey=True)
    for ax, key, title in ((axes[0], "step_peak_tensor_bytes", "step peak (exact tensor bytes)"),
                           (axes[1], "train_peak_rss_bytes", "process peak (VmHWM)")):
        y = range(len(labels))
        for off, mode, color in ((-0.2, "ordinary", "tab:gray"), (0.2, "layerwise", "tab:green")):
            ax.barh([i + off for i in y], [(r[mode].get(key) or 0) / MIB for r in mem_rows], height=0.4,
                    color=color, label=mode.replace("layerwise", "layer-wise"))
        ax.set_yticks(list(y), labels)
        ax.set_xlabel("MiB")
        ax.set_title(title)
    axes[0].invert_yaxis()
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
