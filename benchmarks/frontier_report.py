"""Write benchmarks/frontier.md and frontier.png from the runs of benchmarks/frontier.sh.

    python benchmarks/frontier_report.py runs/frontier [--dest benchmarks]

Reads ``<runs>/results.json`` (the report ``grassopt bench`` wrote over both seeds) and every sweep run's
result; writes the table (eval loss with its seed spread, optimizer-state bytes from the one counter every
run reports, tokens/s against torch's AdamW), the sweep with a check that each chosen rate is interior,
the Pareto front of state bytes against eval loss, the plot, and each method's state split over the
parts of the model (embedding + head, hidden matrices, norms). A hand-written analysis between the
markers in an existing ``frontier.md`` is carried over.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from ablations_report import write_with_analysis  # keeps the hand-written analysis between markers

from grassopt.bench.cli import _slug

OURS = ("galore", "fira", "subtrack++", "grassjump", "apollo", "apollo-mini", "adamw:")


def ours(preset: str) -> bool:
    return preset.split(":")[0] in {o.rstrip(":") for o in OURS}


def pareto(rows: list[dict]) -> set[str]:
    """Methods no other method beats on both axes (no more state bytes and a lower mean eval loss, or
    fewer bytes and no higher loss)."""
    front = set()
    for r in rows:
        dominated = any((o["state_mb"] <= r["state_mb"] and o["eval_loss"] < r["eval_loss"]) or
                        (o["state_mb"] < r["state_mb"] and o["eval_loss"] <= r["eval_loss"]) for o in rows if o is not r)
        if not dominated:
            front.add(r["preset"])
    return front


def sweep_check(sweep: list[dict]) -> dict[str, dict]:
    """Per method: its grid, losses, best rate and whether the best is interior."""
    by = defaultdict(dict)
    for s in sweep:
        by[s["preset"]][s["lr"]] = s["final_eval_loss"]
    out = {}
    for p, losses in by.items():
        finite = {lr: v for lr, v in losses.items() if v is not None and math.isfinite(v)}
        grid = sorted(losses)
        best = min(finite, key=finite.get) if finite else None
        out[p] = {"grid": grid, "losses": losses, "best": best,
                  "interior": best is not None and grid[0] < best < grid[-1]}
    return out


#: The parts of the model the state breakdown separates (by parameter name and shape).
PARTS = ("hidden matrices", "embedding + head", "norms")


def _part(name: str, p) -> str:
    if p.dim() < 2:
        return "norms"
    return "embedding + head" if ("emb" in name or "head" in name) else "hidden matrices"


def state_by_part(run_dir: Path) -> dict[str, int]:
    """Optimizer-state bytes of a finished run's method, split over the parts of the model: the method is
    built again from the run's ``config.json`` on the same model (its ``vocab_size``), takes one
    step on random tokens (states are created at the first step), and each parameter's state is counted
    with the same counter as the table (:func:`grassopt.references.tensor_bytes`, shared storages once)."""
    import torch

    from grassopt import references
    from grassopt.train.loop import TrainConfig, build_model, build_optimizer

    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    model = build_model(cfg, cfg.vocab_size)
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 64))
    model(x, x)[1].backward()
    opt.step()
    names = {p: n for n, p in model.named_parameters()}
    seen: set = set()
    out = dict.fromkeys(PARTS, 0)
    for p, st in opt.state.items():
        out[_part(names.get(p, ""), p)] += references.tensor_bytes(st, seen)
    return out


def plot(rows: list[dict], front: set[str], runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw={"width_ratios": [1.6, 1]})
    for r in rows:
        losses = [x for x in r["eval_losses"] if x is not None and math.isfinite(x)]
        color = "tab:red" if ours(r["preset"]) else "tab:blue"
        ax.errorbar(r["state_mb"], r["eval_loss"], yerr=[[r["eval_loss"] - min(losses)], [max(losses) - r["eval_loss"]]],
                    fmt="o" if r["preset"] in front else "s", color=color, ms=7 if r["preset"] in front else 5,
                    mfc=color if r["preset"] in front else "white", capsize=3)
        same = sorted((o for o in rows if abs(o["state_mb"] - r["state_mb"]) < 0.01),
                      key=lambda o: -o["eval_loss"])  # labels of methods with equal state: stacked
        ax.annotate(r["preset"], (r["state_mb"], r["eval_loss"]), fontsize=7, textcoords="offset points",
                    xytext=(6, 4.5 * (len(same) - 1) - 9 * same.index(r)))
    fr = sorted((r for r in rows if r["preset"] in front), key=lambda r: r["state_mb"])
    if fr:
        xs, ys = [fr[0]["state_mb"]], [fr[0]["eval_loss"]]
        for r in fr[1:]:
            xs += [r["state_mb"], r["state_mb"]]
            ys += [ys[-1], r["eval_loss"]]
        ax.plot(xs, ys, "-", color="gray", lw=1, zorder=0, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer state (MB, log scale)")
    ax.set_ylabel("final eval loss (bars: the 2 seeds)")
    ax.set_title("state bytes against eval loss (red: grassopt presets; filled: on the front)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    order = sorted(rows, key=lambda r: r.get("tokens_ratio") or 0)
    bx.barh([r["preset"] for r in order], [r.get("tokens_ratio") or 0 for r in order],
            color=["tab:red" if ours(r["preset"]) else "tab:blue" for r in order])
    bx.axvline(1.0, color="gray", lw=1)
    bx.set_xlabel("tokens/s / torch.optim.AdamW's (separate runs, 2 at a time: rough)")
    bx.tick_params(axis="y", labelsize=7)
    bx.set_title("speed of the whole training step", fontsize=9)
    bx.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def from_contest(out: Path) -> dict:
    """The frontier over the contest's stage 4 (benchmarks/contest.py --stage 4) in the shape of a bench's
    results.json: one row per method (seeds 0 and 1 over a quarter of a final's horizon, at the rate its
    stage-1, 2 or 4 sweep chose, with the plain parameters at the contest's common plain_lr), its sweep."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from contest import FRONTIER, METHODS, frontier_points

    points = frontier_points(out)
    if not points:
        raise SystemExit(f"no stage-4 runs under {out}: run bash benchmarks/contest.sh --stage 4 first")
    common = json.loads((out / "common.json").read_text())
    names = {"adamw": "adamw", **{n: n for n in [*METHODS, *FRONTIER]}}
    sweep = [{**r, "preset": "adamw"} for r in common["grid"][f"{common['plain_lr']:g}"]]
    for name in names:
        path = out / "reports" / f"{'4' if name in FRONTIER else '2'}-{_slug(name)}" / "results.json"
        if name != "adamw" and path.is_file():
            sweep += [{**row, "preset": name} for row in json.loads(path.read_text())["sweep"]]
    adamw = points.get("adamw")
    rows = []
    for name, pt in points.items():
        losses = [pt["losses"][k] for k in sorted(pt["losses"])]
        summary = json.loads((out / "runs" / f"{_slug(pt['variant'])}-s1" / "summary.json").read_text())
        base = json.loads((out / "runs" / f"{_slug(adamw['variant'])}-s1" / "summary.json").read_text()) \
            if adamw else None
        rows.append({"preset": name, "variant": pt["variant"], "lr": pt["lr"], "seeds": sorted(pt["losses"]),
                     "eval_losses": losses, "eval_loss": sum(losses) / len(losses), "tokens": summary["tokens"],
                     "state_mb": pt["state_bytes"] / 2**20,
                     "state_ratio": pt["state_bytes"] / adamw["state_bytes"] if adamw else None,
                     "tokens_ratio": summary["tokens_per_s"] / base["tokens_per_s"] if base else None})
    cfg = json.loads((out / "runs" / f"{_slug(rows[0]['variant'])}-s1" / "config.json").read_text())
    return {"rows": rows, "sweep": sweep, "config": cfg, "runs": [], "versions": {},
            "command": f"bash benchmarks/contest.sh --stage 4 && python benchmarks/frontier_report.py --contest {out}",
            "run_dir": lambda r: out / "runs" / f"{_slug(r['variant'])}-s1",
            "intro": (f"The contest's protocol ([`contest.md`](contest.md)) at a quarter of its horizon: `{cfg['model']}` on "
                      f"SOTU, {cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens, fp32, rank "
                      f"{cfg['rank']} (apollo-mini: 1), basis updates every {cfg['update_interval']} steps, seeds 0 and 1. "
                      f"Every method trains the parameters it does not project or orthogonalize (embedding, head, "
                      f"norms) at the same rate, plain_lr {common['plain_lr']:g} (AdamW's own best, from its 2-D grid); "
                      "each keeps its own state for them (AdamW's two moments, or a lean format, or, for Adafactor and "
                      "SCALE as their papers, their own update), since that state is the axis of this table. Each "
                      "method's hidden-matrix rate is the best of its own sweep (seed 0, the same horizon), interior. "
                      "Optimizer state: every tensor in the optimizer's state, one counter for all "
                      "(`grassopt.registry.state_bytes`). Made by [`benchmarks/contest.py`](contest.py) (stage 4) and "
                      "[`benchmarks/frontier_report.py`](frontier_report.py).")}


def report(src: Path, dest: Path, res: dict | None = None) -> str:
    res = res if res is not None else json.loads((src / "results.json").read_text())
    rows = [r for r in res["rows"] if r["eval_loss"] is not None and math.isfinite(r["eval_loss"])]
    sweep = sweep_check(res["sweep"])
    front = pareto(rows)
    dest.mkdir(parents=True, exist_ok=True)
    plot(rows, front, res["runs"], dest / "frontier.png")
    cfg = res["config"]
    L = ["# The memory frontier: grassopt against the optimizers people pick today", "",
         res.get("intro") or f"Model `{cfg['model']}` on SOTU, {rows[0]['tokens']:,} training tokens per run ({cfg['batch_size']} x "
         f"{cfg['seq_len']} tokens per step), fp32, seeds {sorted({s for r in rows for s in r['seeds']})}, rank "
         f"{cfg['rank']} for the projected presets (apollo-mini: 1), basis update every {cfg['update_interval']} steps; "
         "warmup then cosine decay. Each method at the best rate of its own sweep (below), widened until that best "
         "is interior. Optimizer state: the bytes of every tensor in the optimizer's state, counted by the same "
         "function for every method (`grassopt.registry.state_bytes`). Made by "
         "[`benchmarks/frontier.sh`](frontier.sh) and [`benchmarks/frontier_report.py`](frontier_report.py).", "",
         f"Command (the report over both seeds): `{res['command']}`", "",
         "Packages: " + ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items()), "",
         "*tokens/s / AdamW*: each run's training throughput over `torch.optim.AdamW`'s, from separate runs made "
         "two at a time on 2 shared cores, one thread each: a rough ratio (the interleaved measurement is "
         "[`train_step_time.md`](train_step_time.md)).", "",
         "| method | lr | eval loss | seeds | state (MB) | state / AdamW | tokens/s / AdamW | on the front |",
         "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["state_mb"]):
        seeds = ", ".join(f"{x:.4f}" for x in r["eval_losses"])
        L.append(f"| {r['preset']} | {r['lr']:g} | {r['eval_loss']:.4f} | {seeds} | {r['state_mb']:.2f} | "
                 f"{r.get('state_ratio') or float('nan'):.3f} | {r.get('tokens_ratio') or float('nan'):.3f} | "
                 f"{'**yes**' if r['preset'] in front else 'no'} |")
    L += ["", "![frontier](frontier.png)", "", "## The sweep", "",
          "| method | rates (loss after the sweep's steps) | best | interior |", "|---|---|---|---|"]
    for p, s in sweep.items():
        cells = ", ".join(f"{lr:g}: {'diverged' if v is None or not math.isfinite(v) else format(v, '.4f')}"
                          for lr, v in sorted(s["losses"].items()))
        L.append(f"| {p} | {cells} | {s['best']:g} | {'yes' if s['interior'] else '**no**'} |")
    L += ["", "## Where the state goes", "",
          "Each method's state split over the parts of `" + cfg["model"] + "` (MB; `state_by_part`: the method built "
          "again from its seed-0 run's config, one step on random tokens, the same counter as above). The last "
          "column checks the split against the run's own count.", "",
          "| method | " + " | ".join(PARTS) + " | total | = the run's |", "|---|" + "---|" * (len(PARTS) + 2)]
    parts = {}
    for r in sorted(rows, key=lambda r: r["state_mb"]):
        run_dir = res["run_dir"](r) if "run_dir" in res else src / "runs" / f"{_slug(r['preset'])}-s{min(r['seeds'])}"
        parts[r["preset"]] = b = state_by_part(run_dir)
        total = sum(b.values()) / 2**20
        same = "yes" if abs(total - r["state_mb"]) < 0.01 else f"**no** ({r['state_mb']:.2f})"
        L.append(f"| {r['preset']} | " + " | ".join(f"{b[k] / 2**20:.2f}" for k in PARTS) + f" | {total:.2f} | {same} |")
    on = sorted(front, key=lambda p: next(r["state_mb"] for r in rows if r["preset"] == p))
    L += ["", f"On the Pareto front (state bytes against mean eval loss): {', '.join(f'`{p}`' for p in on)}.", ""]
    text = write_with_analysis(dest / "frontier.md", L)
    (dest / "frontier.json").write_text(json.dumps({"rows": rows, "front": on, "sweep": {
        p: {"grid": s["grid"], "best": s["best"], "interior": s["interior"]} for p, s in sweep.items()},
        "state_by_part": parts}, indent=1))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", help="the output folder of benchmarks/frontier.sh (e.g. runs/frontier)")
    ap.add_argument("--contest", help="instead: the contest's folder (benchmarks/contest), its stage 4")
    ap.add_argument("--dest", default="benchmarks", help="where frontier.md, frontier.png and frontier.json go")
    args = ap.parse_args(argv)
    if args.contest:
        print(report(Path(args.contest), Path(args.dest), from_contest(Path(args.contest))))
        return 0
    if not args.runs:
        ap.error("give the runs folder of benchmarks/frontier.sh, or --contest FOLDER")
    src = Path(args.runs)
    if not (src / "results.json").is_file():
        print(f"no {src / 'results.json'}: run benchmarks/frontier.sh first", file=sys.stderr)
        return 2
    print(report(src, Path(args.dest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
