"""Forward-only fine-tuning of MiniLM on sotu-era: zeroth-order low-rank estimates against backpropagation.

Every run is one `grassopt finetune` process (grassopt.bench.runner.run_process, as in finetune_minilm.py), two
single-threaded runs at a time. Part 1 (accuracy against forward passes): `zo` with the `haar`,
`gaussian` and `coordinate` laws of V (rank 8, V kept 50 steps), and the dense MeZO baseline, each
over a grid of learning rates, against full fine-tuning by backpropagation with torch AdamW and
with the `haar` estimator, all at the same batch and sequence length, with the validation
accuracy recorded along the way. Part 2 (memory): peak resident memory of a few steps of each
method at a larger batch, where activations matter.

    python benchmarks/zeroth_order.py             # about 45 minutes on this 2-core machine
    python benchmarks/zeroth_order.py --smoke     # a few steps of everything: checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grassopt.bench.runner import ROOT, run_process

MIB = 2 ** 20
# A first attempt with [5e-4, 1e-3, 2e-3] diverged at 1e-3 and 2e-3 (loss 1e4 by step 1000) and blew up
# at 5e-4 after step 900; the dense MeZO direction has the same entry-wise scale (unit variance), so
# both use the same lower grid.
ZO_LRS = [1e-4, 2.5e-4, 5e-4]
MEZO_LRS = [1e-4, 2.5e-4]
ZO_METHODS = {  # label -> (CLI arguments, learning-rate grid)
    "zo haar": (["--method", "zo", "--rank", "8", "--opt", "law=haar"], ZO_LRS),
    "zo gaussian": (["--method", "zo", "--rank", "8", "--opt", "law=gaussian"], ZO_LRS),
    "zo coordinate": (["--method", "zo", "--rank", "8", "--opt", "law=coordinate"], ZO_LRS),
    "mezo (dense)": (["--method", "mezo"], MEZO_LRS),
}
BP_METHODS = {
    "backprop, AdamW (full FT)": (["--method", "adamw-torch"], [1e-4]),
    "backprop, AdamW + haar estimator": (["--method", "adamw-torch", "--sketch", "haar", "--sketch-rank", "0.25"],
                                         [1e-4]),
}


def task_args(args) -> list[str]:
    return ["--task", "sotu-era", "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--max-train-per-class", str(args.train_per_class), "--max-val-per-class", str(args.val_per_class),
            "--max-test-per-class", str(args.test_per_class), "--threads", "1", "--no-progress", "--no-plot"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/zeroth_order")
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "zeroth_order.md"))
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-per-class", type=int, default=320)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--zo-steps", type=int, default=1000)
    ap.add_argument("--bp-steps", type=int, default=160, help="backpropagation steps (2 epochs of 1,280)")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--lazy", type=int, default=50)
    ap.add_argument("--mem-shape", default="64x128", help="batch x seq of the memory runs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--law-steps", type=int, default=None,
                    help="steps of the gaussian and coordinate runs at haar's rate (default: --zo-steps). With a "
                         "constant rate and per-step seeds, a shorter run is an exact prefix of a longer one, so "
                         "the laws compare at this step")
    ap.add_argument("--sweep-all", action="store_true",
                    help="sweep the learning rate of every ZO law (default: haar and MeZO; the other laws at haar's best)")
    ap.add_argument("--replot", action="store_true",
                    help="rewrite the report and plot from OUT/results.json without running anything")
    args = ap.parse_args(argv)
    if args.replot:  # the saved run's settings, with this command's --out and --report
        saved = json.loads((Path(args.out) / "results.json").read_text())
        report, out = args.report, args.out
        args = ap.parse_args(saved["argv"])
        args.report, args.out = report, out
        write(args, saved["runs"], saved["wall_s"], saved["argv"])
        return 0
    if args.smoke:
        args.zo_steps, args.bp_steps, args.train_per_class, args.val_per_class, args.test_per_class = 6, 4, 8, 4, 4
        args.mem_shape, args.report = "8x32", str(Path(args.out) / "report.md")
    out = Path(args.out)
    started = time.perf_counter()
    # The laws of V share one scaling (E[V V^T] = I), so by default only `zo haar` and MeZO sweep their
    # learning rates; `zo gaussian` and `zo coordinate` then run at haar's best rate, with the same seed
    # (the same U draws): a paired comparison in which only the law of V differs. --sweep-all sweeps all.
    swept = [label for label in ZO_METHODS if args.sweep_all or label in ("zo haar", "mezo (dense)")]

    def zo_job(label, lr, steps=None):
        every = max(1, args.zo_steps // 10)  # the same evaluation steps for every ZO run
        return (label, lr, "curve", [*ZO_METHODS[label][0], "--lr", f"{lr:g}", "--steps", str(steps or args.zo_steps),
                                     "--opt", f"eps={args.eps:g}", "--opt", f"lazy={args.lazy}",
                                     "--eval-every", str(every), "--log-every", str(every),
                                     "--min-lr-ratio", "1.0", "--warmup", "1", *task_args(args)])

    first = [zo_job(label, lr) for label in swept for lr in (ZO_METHODS[label][1][1:2] if args.smoke
                                                             else ZO_METHODS[label][1])]
    for label, (margs, lrs) in BP_METHODS.items():
        every = max(1, args.bp_steps // 16)
        for lr in lrs:
            first.append((label, lr, "curve", [*margs, "--lr", f"{lr:g}", "--steps", str(args.bp_steps),
                                               "--eval-every", str(every), "--log-every", str(every),
                                               *task_args(args)]))
    mb, mt = (int(v) for v in args.mem_shape.split("x"))
    for label, (margs, lrs) in {**ZO_METHODS, **BP_METHODS}.items():
        if label in ("zo gaussian", "zo coordinate") and not args.sweep_all:
            continue  # the same code path and sizes as zo haar (only the law of V differs): same memory
        cli = [*margs, "--lr", f"{lrs[0]:g}", "--steps", "3", "--eval-every", "0", *task_args(args)]
        cli[cli.index("--batch-size") + 1], cli[cli.index("--seq-len") + 1] = str(mb), str(mt)
        first.append((label, lrs[0], "memory", cli))

    def go(job):
        label, lr, kind, cli = job
        path = out / kind / "".join(c if c.isalnum() or c in "+-." else "_" for c in f"{label}-lr{lr:g}")
        s = run_process(path, cli)
        print(f"[{kind}] {label} lr={lr:g}: val acc {100 * (s['val_acc'] or 0):.1f}, "
              f"{s['train_time_s']:.0f} s (elapsed {(time.perf_counter() - started) / 60:.1f} min)", flush=True)
        s["history"] = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
        s["cli"] = "grassopt finetune " + shlex.join(cli)
        return s

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(go, job) for job in first]
        jobs = list(first)
        if len(swept) < len(ZO_METHODS):
            haar = [(job, f) for job, f in zip(first, futures) if job[0] == "zo haar" and job[2] == "curve"]
            lr = max(haar, key=lambda jf: (jf[1].result()["val_acc"], -jf[1].result()["val_loss"]))[0][1]
            later = [zo_job(label, lr, args.law_steps) for label in ZO_METHODS if label not in swept]
            jobs += later
            futures += [pool.submit(go, job) for job in later]
        results = [f.result() for f in futures]
    runs = [{"label": j[0], "lr": j[1], "kind": j[2], "summary": s} for j, s in zip(jobs, results)]
    write(args, runs, time.perf_counter() - started, sys.argv[1:] if argv is None else argv)
    return 0


def _best(runs, label):
    mine = [r for r in runs if r["label"] == label and r["kind"] == "curve"]
    return max(mine, key=lambda r: (r["summary"]["val_acc"], -r["summary"]["val_loss"]))


def plot(runs, best, path: Path, args) -> None:
    """Validation accuracy against forward passes: every learning rate of every method (the best one bold)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = dict(zip(best, plt.get_cmap("tab10").colors))
    for r in runs:
        if r["kind"] != "curve":
            continue
        pts = [(h["forward_passes"], 100 * h["val_acc"]) for h in r["summary"]["history"] if "val_acc" in h]
        if not pts:
            continue
        is_best = best[r["label"]] is r
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if is_best else None, markersize=3, color=colours[r["label"]],
                lw=2.2 if is_best else 0.8, alpha=1.0 if is_best else 0.45,
                label=f"{r['label']} (lr {r['lr']:g})" if is_best else None)
    ax.axhline(25, color="grey", ls=":", lw=1, label="chance (4 balanced classes)")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)
    ax.set_xlabel("forward passes (micro-batches); a backpropagation step counts one forward")
    ax.set_ylabel("validation accuracy %")
    ax.set_title(f"MiniLM on sotu-era, batch {args.batch_size} x {args.seq_len}: thin lines are the other "
                 "learning rates", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(args, runs, wall, argv) -> None:
    cmd = "python benchmarks/zeroth_order.py " + shlex.join(argv)
    labels = [label for label in [*ZO_METHODS, *BP_METHODS] if any(r["label"] == label for r in runs)]
    lines = ["# Forward-only fine-tuning: zeroth-order low-rank estimates against backpropagation", ""]
    if args.smoke:
        lines += ["> **Smoke run**: a few steps of everything, to check the pipeline. Not results.", ""]
    lines += [f"Command: `{cmd.strip()}` (total {wall / 60:.1f} min, {args.jobs} single-threaded runs at a time).", "",
              f"all-MiniLM-L6-v2 on `sotu-era` (4 eras, {args.train_per_class} training paragraphs per era, "
              f"{args.val_per_class} validation and {args.test_per_class} test per era), batch {args.batch_size} x "
              f"{args.seq_len} tokens, fp32, embeddings frozen. ZO: {args.zo_steps} steps of two forward passes, "
              f"eps {args.eps:g}, perturbation rank 8 with V kept {args.lazy} steps (zo) or a dense Gaussian (MeZO), "
              "the head, biases and LayerNorms perturbed full rank, dropout off, constant learning rate after one "
              f"warmup step; learning rates: " + ("every ZO method swept over its grid" if args.sweep_all else
              "`zo haar` swept over " + ", ".join(f"{x:g}" for x in ZO_LRS) + " and MeZO over "
              + ", ".join(f"{x:g}" for x in MEZO_LRS) + "; `zo gaussian` and `zo coordinate` at haar's best rate "
              "with the same seed (the same draws of U), so that only the law of V differs") +
              f"; backpropagation: {args.bp_steps} steps of AdamW (lr 1e-4, warmup then cosine), "
              "dropout 0.1. *Forward passes* count micro-batch forward passes; a backpropagation step is one forward "
              "and one backward pass (the backward costs about two forwards).", "",
              "| method | best lr | val acc % | test acc % | forward passes | backward passes | train time (s) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    best = {label: _best(runs, label) for label in labels}
    for label in labels:
        s = best[label]["summary"]
        lines.append(f"| {label} | {best[label]['lr']:g} | {100 * s['val_acc']:.1f} | {100 * s['test_acc']:.1f} | "
                     f"{s['forward_passes']:,} | {s['backward_passes']:,} | {s['train_time_s']:.0f} |")
    lines += ["", "## Forward passes to reach backpropagation's accuracy", "",
              "For each method at its best rate: the first evaluation at which its validation accuracy reaches the "
              "final validation accuracy of backpropagation with AdamW, and the forward passes backpropagation "
              "needed to reach the method's own best validation accuracy (its evaluations are "
              f"{max(1, args.bp_steps // 16)} steps apart, so that count is rounded up to the grid).", ""]
    ref_label = next((label for label in labels if label.startswith("backprop, AdamW (full")), None)
    if ref_label is not None:
        ref_hist = [h for h in best[ref_label]["summary"]["history"] if "val_acc" in h]
        target = best[ref_label]["summary"]["val_acc"]
        lines += [f"| method | best val acc % | forward passes to reach {100 * target:.1f}% (backprop's final) | "
                  "backprop forward passes to reach the method's best |", "|---|---:|---:|---:|"]
        for label in labels:
            if label == ref_label:
                continue
            hist = [h for h in best[label]["summary"]["history"] if "val_acc" in h]
            top = max((h["val_acc"] for h in hist), default=float("nan"))
            reach = next((h["forward_passes"] for h in hist if h["val_acc"] >= target), None)
            ref_reach = next((h["forward_passes"] for h in ref_hist if h["val_acc"] >= top), None)
            last = best[label]["summary"]["forward_passes"]
            lines.append(f"| {label} | {100 * top:.1f} | "
                         f"{f'{reach:,}' if reach is not None else f'not reached in {last:,}'} | "
                         f"{f'{ref_reach:,}' if ref_reach is not None else 'not reached'} |")
    lines += ["", "## Validation accuracy against forward passes", "", "| method | lr | " +
              " | ".join(["(forward passes: val acc %)"]) + " |", "|---|---:|---|"]
    for r in runs:
        if r["kind"] != "curve":
            continue
        pts = [f"{h['forward_passes']}: {100 * h['val_acc']:.1f}" for h in r["summary"]["history"] if "val_acc" in h]
        lines.append(f"| {r['label']} | {r['lr']:g} | {'; '.join(pts)} |")
    lines += ["", f"## Peak process memory (batch {args.mem_shape.replace('x', ' x ')} tokens, 3 steps)", "",
              "*Peak RSS*: the run's peak resident memory during training (VmHWM, reset before the first step); "
              "*added*: that peak minus the resident memory when training starts. *Saved act.*: bytes one "
              "micro-batch's forward pass saves for backward (0 for forward-only steps, which run under no_grad).", "",
              "| method | peak RSS (MiB) | added (MiB) | opt. state (MiB) | saved act. (MiB) |",
              "|---|---:|---:|---:|---:|"]
    for r in runs:
        if r["kind"] != "memory":
            continue
        s = r["summary"]
        peak, before = s.get("train_peak_rss_bytes"), s.get("rss_before_training_bytes")
        lines.append(f"| {r['label']} | {(peak or 0) / MIB:.0f} | "
                     f"{((peak - before) / MIB) if peak and before else float('nan'):.0f} | "
                     f"{s['optimizer_state_bytes'] / MIB:.2f} | {(s['saved_activation_bytes'] or 0) / MIB:.1f} |")
    lines += ["", "Commands: " + "; ".join(f"`{best[label]['summary']['cli']}`" for label in labels), ""]
    report = Path(args.report)
    (Path(args.out) / "results.json").write_text(json.dumps({"argv": argv, "wall_s": wall, "runs": runs},
                                                            indent=1, default=str))
    png = report.with_suffix(".png")
    plot(runs, best, png, args)
    at = lines.index("## Validation accuracy against forward passes") + 2
    lines[at:at] = [f"![accuracy against forward passes]({png.name})", ""]
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
