"""benchmarks/contest.md (+ contest_loss.png, contest_front.png, contest.json) from the runs of contest.py.

Reads the bench reports under ``<out>/reports`` (1-*: the AdamW grid, 2-*: each method's sweep, 3-*: the
finals), so it can be rerun at any time on whatever has finished; a table that is incomplete says so.
The hand-written analysis of an earlier contest.md is kept (between the markers of ablations_report.py).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ablations_report import ANALYSIS_END, ANALYSIS_START, kept_analysis, write_with_analysis  # noqa: E402
from contest import METHODS, OURS, _slug  # noqa: E402

#: Two-sided 95% quantiles of Student's t, by degrees of freedom (1 to 10).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _load(out: Path, prefix: str) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "reports").glob(f"{prefix}*/results.json"))}


def _interior(rows: list[dict], key: str = "lr") -> tuple[float | None, bool]:
    done = [r for r in rows if r["final_eval_loss"] is not None and math.isfinite(r["final_eval_loss"])]
    if not done:
        return None, False
    best = min(done, key=lambda r: r["final_eval_loss"])[key]
    grid = sorted({r[key] for r in rows})
    return best, grid[0] < best < grid[-1]


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Mean of a - b over the seeds both have, its 95% t half-width, n; None below 2 pairs."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
    half = T95[min(len(d), len(T95) + 1) - 2] * se
    return {"mean": m, "half": half, "n": len(d), "called": abs(m) > half}


def gather(out: Path) -> dict:
    grid = _load(out, "1-")
    sweeps = _load(out, "2-")
    finals = _load(out, "3-")
    common = json.loads((out / "common.json").read_text()) if (out / "common.json").is_file() else {}
    names = {_slug(n): n for n in ["adamw", *METHODS]}
    runs: dict[str, dict] = {}
    machine_s = sum(json.loads(p.read_text()).get("train_time_s") or 0.0 for p in out.glob("*/*/summary.json"))
    for key, rep in finals.items():
        name, seed = key[2:].rsplit("-s", 1)
        for run in rep["runs"]:
            s = run["summary"]
            if not s.get("finished"):
                continue
            r = runs.setdefault(names.get(name, name), {"lr": run["lr"], "plain_lr": run.get("plain_lr"),
                                                          "losses": {}, "state": s["optimizer_state_bytes"],
                                                          "history": {}})
            r["losses"][int(seed)] = s["final_eval_loss"]
            r["history"][int(seed)] = [(h["tokens"], h["loss"]) for h in run["history"] if "loss" in h]
    return {"common": common, "grid": grid, "sweeps": sweeps, "runs": runs, "machine_s": machine_s}


def front(rows: list[tuple[str, float, float]]) -> set[str]:
    """Names on the Pareto front of (state bytes, loss): no other point is at most as large in both and
    smaller in one."""
    return {n for n, b, loss in rows
            if not any((b2 <= b and l2 <= loss) and (b2 < b or l2 < loss) for _, b2, l2 in rows)}


def plot(data: dict, on_front: set[str], dest: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, r) in enumerate(sorted(runs.items())):
        h = r["history"].get(0) or next(iter(r["history"].values()))
        xs, ys = zip(*h)
        k = max(1, len(ys) // 50)
        sm = [statistics.fmean(ys[max(0, j - k):j + 1]) for j in range(len(ys))]
        ax.plot(xs, sm, label=name, lw=2.2 if name == "adamw" else 1.2, color=plt.get_cmap("tab10")(i % 10))
    ax.set(xlabel="training tokens", ylabel="training loss (seed 0, running mean)", ylim=(None, 6.5),
           title="The contest: loss against tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest / "contest_loss.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, r in runs.items():
        mean = statistics.fmean(r["losses"].values())
        mb = r["state"] / 2 ** 20
        ax.scatter(mb, mean, s=60 if name in on_front else 25, color="C3" if name in on_front else "C0")
        ax.annotate(name, (mb, mean), fontsize=8, xytext=(4, 3), textcoords="offset points")
    pts = sorted((r["state"] / 2 ** 20, statistics.fmean(r["losses"].values())) for n, r in runs.items() if n in on_front)
    if pts:
        ax.plot(*zip(*pts), color="C3", lw=1, ls="--", label="Pareto front")
        ax.legend()
    ax.set(xscale="symlog", xlabel="optimizer state (MB)", ylabel="final eval loss (mean over seeds)",
           title="The contest: state bytes against loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest / "contest_front.png", dpi=110)
    plt.close(fig)


def report(data: dict, dest: Path, command: str) -> str:
    runs, common = data["runs"], data["common"]
    lines = ["# The contest: every method against an AdamW tuned as well as they are", "",
             f"Command: `{command}` (resumable: finished runs are reused). Machine time of the runs reported "
             f"below: {data['machine_s'] / 3600:.1f} h of one thread (sums of each run's training time; two runs "
             "shared the machine's two cores).", ""]
    versions = next((rep.get("versions") for rep in data["sweeps"].values() if rep.get("versions")), None)
    if versions:
        lines += ["Packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    lines += ["Protocol: see `benchmarks/contest.py`. `tiny` on SOTU, 8 x 256 tokens a step, fp32; rank 64 "
              "(apollo-mini: 1), a basis update every 40 steps. Every method trains the embedding, head, norms "
              "and biases with the same AdamW (eps 1e-6, no decay) at the same `plain_lr`, chosen by AdamW's "
              "two-dimensional sweep; each method's hidden-matrix rate is swept at that `plain_lr` with runs of "
              "a quarter of the horizon, widened until interior.", ""]
    # --- the common parts
    lines += ["## 1. The common parts: AdamW's grid (hidden rate x plain_lr), quarter-horizon runs", ""]
    if common:
        rows = [r for rs in common["grid"].values() for r in rs]
        hid = sorted({r["lr"] for r in rows})
        lines += ["| plain_lr \\ hidden lr | " + " | ".join(f"{h:g}" for h in hid) + " |",
                  "|---|" + "---|" * len(hid)]
        for p, rs in sorted(common["grid"].items(), key=lambda kv: float(kv[0])):
            cell = {r["lr"]: r["final_eval_loss"] for r in rs}
            lines.append(f"| {p} | " + " | ".join(
                ("**%.4f**" if float(p) == common["plain_lr"] and h == common["adamw_lr"] else "%.4f") % cell[h]
                if h in cell else "–" for h in hid) + " |")
        lines += ["", f"Chosen: `plain_lr` = {common['plain_lr']:g} for every method; AdamW's hidden rate "
                      f"{common['adamw_lr']:g}.", ""]
    else:
        lines += ["Not run yet.", ""]
    # --- sweeps
    lines += ["## 2. Each method's hidden-matrix rate at that plain_lr (quarter-horizon runs)", "",
              "| method | rates: eval loss | chosen | interior |", "|---|---|---|---|"]
    sweep_ok = {}
    if common:
        rows = common["grid"].get(f"{common['plain_lr']:g}", [])
        best, inner = _interior(rows)
        sweep_ok["adamw"] = inner
        lines.append("| adamw | " + ", ".join(f"{r['lr']:g}: {r['final_eval_loss']:.4f}" for r in
                                               sorted(rows, key=lambda r: r["lr"])) + f" | {best:g} | "
                     f"{'yes' if inner else '**no**'} |")
    for name in METHODS:
        rep = data["sweeps"].get(f"2-{_slug(name)}")
        if not rep:
            lines.append(f"| {name} | not run yet | | |")
            continue
        rows = sorted(rep["sweep"], key=lambda r: r["lr"])
        best, inner = _interior(rows)
        sweep_ok[name] = inner
        lines.append(f"| {name} | " + ", ".join(f"{r['lr']:g}: {r['final_eval_loss']:.4f}" for r in rows) +
                     f" | {best:g} | {'yes' if inner else '**no**'} |")
    # --- finals
    base = runs.get("adamw")
    table = [(n, r["state"], statistics.fmean(r["losses"].values())) for n, r in runs.items()]
    on_front = front(table)
    lines += ["", "## 3. The finals: the whole horizon", "",
              "| method | hidden lr | plain_lr | eval loss by seed | mean | state (MB) | state / AdamW | "
              "vs AdamW, paired: mean ± 95% half-width (n) | called | on the front |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(runs, key=lambda n: (n != "adamw", statistics.fmean(runs[n]["losses"].values())))
    out_rows = []
    for n in order:
        r = runs[n]
        mean = statistics.fmean(r["losses"].values())
        d = paired(r["losses"], base["losses"]) if base and n != "adamw" else None
        ratio = r["state"] / base["state"] if base else float("nan")
        cell = "–" if d is None else f"{d['mean']:+.4f} ± {d['half']:.4f} ({d['n']})"
        called = "–" if d is None else ("**lower**" if d["called"] and d["mean"] < 0 else
                                         "**higher**" if d["called"] else "not called")
        lines.append(f"| {n} | {r['lr']:g} | {r['plain_lr']:g} | " +
                     ", ".join(f"{r['losses'][s]:.4f}" for s in sorted(r["losses"])) +
                     f" | {mean:.4f} | {r['state'] / 2 ** 20:.2f} | {ratio:.3f} | {cell} | {called} | "
                     f"{'yes' if n in on_front else ''} |")
        out_rows.append({"method": n, "lr": r["lr"], "plain_lr": r["plain_lr"], "losses": r["losses"], "mean": mean,
                         "state_bytes": r["state"], "state_ratio": ratio, "vs_adamw": d, "front": n in on_front,
                         "sweep_interior": sweep_ok.get(n), "ours": n in OURS})
    missing = [n for n in ["adamw", *METHODS] if n not in runs]
    if missing:
        lines += ["", f"Not finished yet: {', '.join(missing)}. The table is incomplete until they are."]
    lines += ["", "*called*: the 95% t-interval of the paired mean difference (same seed: same initialisation "
                  "and data order) excludes zero. With two seeds the t quantile is 12.7, so only large "
                  "differences can be called; three seeds (4.3) resolve less than a tenth as much.", "",
              "![loss against tokens](contest_loss.png)", "", "![state against loss](contest_front.png)", ""]
    if not kept_analysis(dest):
        lines += [ANALYSIS_START, "", "(Write the analysis here once the finals are in; it is kept when the report "
                                      "is regenerated.)", "", ANALYSIS_END]
    (dest.with_suffix(".json")).write_text(json.dumps({"common": common, "rows": out_rows,
                                                       "machine_hours": data["machine_s"] / 3600}, indent=1))
    if runs:
        plot(data, on_front, dest.parent)
    return write_with_analysis(dest, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "contest"))
    ap.add_argument("--dest", default=str(HERE / "contest.md"))
    args = ap.parse_args(argv)
    text = report(gather(Path(args.out)), Path(args.dest), "bash benchmarks/contest.sh")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
