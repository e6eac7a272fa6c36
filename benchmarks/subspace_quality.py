"""benchmarks/subspace_quality.md: does a basis that captures more of the next gradients train better?

    python benchmarks/subspace_quality.py            # the runs (2 at a time, one thread each), then the report
    python benchmarks/subspace_quality.py --report   # the report alone, from the finished runs

For each basis rule (``svd``, ``track`` at two step sizes, the full-tangent ``walk``, ``jump``, ``frozen``;
every one the ``subtrack++`` preset with its rule swapped: Adam in the subspace, rotation of the moments,
recovery scaling) and two batch sizes (the ablations' 4 x 128 tokens per step, and 8 x 256), one run of
``tiny`` on SOTU for 501,760 tokens (980 or 245 steps), rank 64, lr 0.01, basis update every 50 steps,
seed 0, with ``grassopt train --subspace-quality``: for every projected matrix and basis interval, the mean
share of the next gradients' energy that the current basis captures, ``||Q^T G||^2 / ||G||^2``, and the
principal angles of each update (``grassopt.analysis.hook``). The eval loss is taken at mid-run and at
the end (two horizons). Finished runs are reused; an interrupted one resumes from its checkpoint.

The report answers from the numbers: the rank correlation between capture and final eval loss per batch
size, and whether ``track`` beats ``frozen`` and ``svd`` at each batch size and horizon, against the
seed noise measured by the ablations (``benchmarks/ablations/results.json``): one seed per run here.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from ablations_report import write_with_analysis  # keeps the hand-written analysis between markers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "subspace_quality"
TOKENS = 501_760
BATCHES = {"4x128": (4, 128), "8x256": (8, 256)}  # sequences x tokens per step
COMMON = ["--model", "tiny", "--preset", "subtrack++", "--rank", "64", "--update-interval", "50", "--lr", "0.01",
          "--tokens", str(TOKENS), "--log-every", "10", "--threads", "1", "--no-progress", "--seed", "0",
          "--subspace-quality", "--no-plot"]


def rules(walk_step: float) -> dict[str, list[str]]:
    """label -> the --opt overrides of the subtrack++ preset."""
    return {"svd": ["rule=svd"],
            "track 0.5": ["rule=track", "step_size=0.5"],
            "track 2.0": ["rule=track", "step_size=2.0"],
            f"walk {walk_step:g}": ["rule=walk", "update_rank=full", f"step_size={walk_step}"],
            "jump": ["rule=jump"],
            "frozen": ["rule=frozen", "transport=keep"]}


def folder(batch: str, label: str) -> Path:
    return OUT / batch / label.replace(" ", "_")


def cli(batch: str, opts: list[str]) -> list[str]:
    """The ``grassopt train`` arguments of one run (``--out`` is added by ``run_process``)."""
    b, s = BATCHES[batch]
    steps = TOKENS // (b * s)
    args = [*COMMON, "--batch-size", str(b), "--seq-len", str(s), "--eval-every", str(math.ceil(steps / 2)),
            "--overwrite"]  # an interrupted run of this benchmark starts again (its folder is the benchmark's)
    for o in opts:
        args += ["--opt", o]
    return args


def finished(d: Path) -> bool:
    try:
        return bool(json.loads((d / "summary.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def run_all(todo: list[tuple[str, str, list[str]]], parallel: int) -> None:
    """Every run, ``parallel`` at a time, each in its own process (``grassopt.bench.runner.run_process``:
    a finished run with the same arguments is reused)."""
    from concurrent.futures import ThreadPoolExecutor

    from grassopt.bench.runner import run_process

    def one(item):
        b, lab, o = item
        t0 = time.time()
        s = run_process(folder(b, lab), cli(b, o), command="train")
        print(f"{b} {lab}: eval loss {s['final_eval_loss']:.4f} ({(time.time() - t0) / 60:.1f} min)", flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, todo))


# ------------------------------------------------------------------------------------------- report
def load(batch: str, label: str) -> dict | None:
    d = folder(batch, label)
    if not finished(d):
        return None
    hist = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
    recs = [json.loads(x) for x in (d / "analysis.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if r.get("type") == "quality" and r.get("capture_next") is not None
            and math.isfinite(r["capture_next"])]
    by_end: dict[int, list[dict]] = {}
    for r in recs:
        by_end.setdefault(r["step"], []).append(r)
    steps_total = sum(r["steps"] for r in recs)
    cap = sum(r["capture_next"] * r["steps"] for r in recs) / steps_total
    last = max(by_end)
    late = [r for r in recs if r["step"] > last / 2]
    cap_late = sum(r["capture_next"] * r["steps"] for r in late) / sum(r["steps"] for r in late)
    moves = [r for r in recs if r.get("angle_max_deg") is not None]
    ev = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
    summ = json.loads((d / "summary.json").read_text())
    tokens_per_step = BATCHES[batch][0] * BATCHES[batch][1]
    return {"batch": batch, "rule": label, "capture": cap, "capture_late": cap_late,
            "series": [(s * tokens_per_step, statistics.fmean(r["capture_next"] for r in rs))
                       for s, rs in sorted(by_end.items())],
            "angle_max": statistics.fmean(r["angle_max_deg"] for r in moves) if moves else None,
            "angle_mean": statistics.fmean(r["angle_mean_deg"] for r in moves) if moves else None,
            "mid": ev[0][1] if len(ev) > 1 else None, "mid_tokens": ev[0][0] * tokens_per_step if len(ev) > 1 else None,
            "final": summ["final_eval_loss"], "steps": summ["steps"], "tokens": summ["tokens"],
            "tokens_per_s": summ["tokens_per_s"], "train_time_s": summ["train_time_s"], "dir": str(d.relative_to(ROOT) if d.is_relative_to(ROOT) else d)}


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):  # average ranks for ties
        return [statistics.fmean(k for k, w in enumerate(sorted(v)) if w == x) for x in v]
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else float("nan")


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    labels = list(dict.fromkeys(r["rule"] for rs in results.values() for r in rs))
    color = {lab: plt.cm.tab10(i) for i, lab in enumerate(labels)}
    for ax, (batch, rs) in zip(axes[:2], results.items()):
        for r in rs:
            xs, ys = zip(*r["series"])
            ax.plot([x / 1e3 for x in xs], ys, "-", color=color[r["rule"]], lw=1.2, label=f"{r['rule']} ({r['final']:.3f})")
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel("captured share of the next gradients' energy")
        ax.set_title(f"{batch} tokens per step: capture per basis interval (legend: final eval loss)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for batch, marker in zip(results, "os"):
        base = next((r["final"] for r in results[batch] if r["rule"] == "frozen"), 0.0)
        for r in results[batch]:
            ax.plot(r["capture"], r["final"] - base, marker, color=color[r["rule"]], ms=7)
            ax.annotate(f"{r['rule']} ({batch})", (r["capture"], r["final"] - base), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("mean captured share over the run")
    ax.set_ylabel("final eval loss - frozen's (same batch size)")
    ax.set_title("capture against eval loss (circles 4x128, squares 8x256)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(walk_step: float, dest: Path) -> str:
    labels = list(rules(walk_step))
    results = {b: [r for lab in labels if (r := load(b, lab)) is not None] for b in BATCHES}
    noise_file = ROOT / "benchmarks" / "ablations" / "results.json"
    noise = json.loads(noise_file.read_text())["noise"] if noise_file.is_file() else None
    import torch
    L = ["# Subspace quality: the next gradients' energy each basis rule captures, and what it buys", "",
         f"Model `tiny` on SOTU, {TOKENS:,} training tokens per run at two batch sizes (4 x 128 and 8 x 256 "
         "tokens per step: 980 and 245 steps), fp32, rank 64, lr 0.01 (alpha 0.25), basis update every 50 steps, "
         "warmup then cosine decay, seed 0 (the same tokens in the same order for every rule at a batch size). "
         "Every rule is the `subtrack++` preset with its rule swapped (`--opt rule=...`): Adam in the subspace, "
         "moments rotated at each update (`frozen`: kept), recovery scaling on. Capture: for each projected matrix "
         "and basis interval, the mean over the interval's gradients of `||Q^T G||^2 / ||G||^2` with `Q` the basis "
         "the optimizer used for them (built before they arrived: the next gradients), then the mean over "
         f"matrices, weighted by steps (`grassopt train --subspace-quality`). torch {torch.__version__}. Made by "
         "[`benchmarks/subspace_quality.py`](subspace_quality.py) from `runs/subspace_quality`, two runs at a time "
         "with one thread each.", "",
         "Command: `python benchmarks/subspace_quality.py`; one run is, e.g., `grassopt train " +
         " ".join(cli("4x128", rules(walk_step)[labels[1]])) + "`", ""]
    for batch, rs in results.items():
        if not rs:
            continue
        L += [f"## {batch} tokens per step", "",
              "| rule | capture (mean) | capture, second half | largest angle per update (deg, mean) | "
              "mean angle per update (deg) | eval loss at mid-run | final eval loss |",
              "|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: r["final"]):
            L.append(f"| {r['rule']} | {r['capture']:.4f} | {r['capture_late']:.4f} | "
                     f"{'–' if r['angle_max'] is None else format(r['angle_max'], '.2f')} | "
                     f"{'–' if r['angle_mean'] is None else format(r['angle_mean'], '.2f')} | "
                     f"{'–' if r['mid'] is None else format(r['mid'], '.4f')} | {r['final']:.4f} |")
        L.append("")
    L += ["![subspace quality](subspace_quality.png)", "", "## The questions, answered from these numbers", ""]
    if noise is not None:
        L += [f"One seed per run: a loss difference counts only when it exceeds the seed noise the ablations "
              f"measured on the same model and data ({noise:.4f} nats, the median seed-to-seed spread of their "
              "configurations).", ""]
    L += ["| batch | rank correlation (Spearman) of capture and final eval loss | track vs frozen, mid-run / end "
          "(nats, negative = track better) | track vs svd, mid-run / end |", "|---|---|---|---|"]
    verdicts = {}
    for batch, rs in results.items():
        if len(rs) < 3:
            continue
        rho = spearman([r["capture"] for r in rs], [r["final"] for r in rs])
        by = {r["rule"]: r for r in rs}
        cells = []
        for other in ("frozen", "svd"):
            if other not in by:
                cells.append("–")
                continue
            parts = []
            for lab in [x for x in by if x.startswith("track")]:
                t, o = by[lab], by[other]
                parts.append(f"{lab}: {t['mid'] - o['mid']:+.4f} / {t['final'] - o['final']:+.4f}")
                verdicts[(batch, lab, other)] = (t["mid"] - o["mid"], t["final"] - o["final"])
            cells.append("; ".join(parts))
        L.append(f"| {batch} | {rho:+.2f} (over {len(rs)} rules; negative = more capture, lower loss) | "
                 + " | ".join(cells) + " |")
    L.append("")
    dest.mkdir(parents=True, exist_ok=True)
    if any(results.values()):
        plot(results, dest / "subspace_quality.png")
    (dest / "subspace_quality.json").write_text(json.dumps({"noise": noise, "results": results}, indent=1))
    text = write_with_analysis(dest / "subspace_quality.md", L)
    return text


def main(argv=None) -> int:
    from grassopt.rules import walk
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", help="only write the report from the finished runs")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--walk-step", type=float, default=walk.OPTIONS["step_size"],
                    help="step size of the full-tangent walk, radians (default: the walk rule's default)")
    ap.add_argument("--dest", default=str(ROOT / "benchmarks"))
    ap.add_argument("--smoke", action="store_true",
                    help="nano, 8,192 tokens, rank 8, T=4, into /tmp/subspace_quality_smoke: checks the pipeline")
    args = ap.parse_args(argv)
    if args.smoke:
        global OUT, TOKENS, COMMON
        OUT, TOKENS = Path("/tmp/subspace_quality_smoke"), 8192
        COMMON = [{"tiny": "nano", "64": "8", "50": "4", str(501_760): "8192"}.get(c, c) for c in COMMON]
        COMMON += ["--vocab-size", "1024"]
        args.dest = str(OUT / "report")
    if not args.report:
        todo = [(b, lab, o) for lab, o in rules(args.walk_step).items() for b in BATCHES]
        run_all(todo, args.parallel)
    print(report(args.walk_step, Path(args.dest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
