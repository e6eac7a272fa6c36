"""Write benchmarks/ablations.md (and its PNGs) from the runs of benchmarks/ablations.sh.

    python benchmarks/ablations_report.py runs/ablations [--dest benchmarks]

Reads every finished run under ``<runs>/s*/runs/*/`` (``config.json``, ``summary.json``,
``metrics.jsonl``), groups them by configuration over seeds, and writes the tables, the plots and a
verdict on each of the papers' claims, with the criterion used spelled out next to it. The seed
noise is measured, not assumed: ``noise`` is the median over configurations of the difference
between the two seeds' final eval losses, and a difference counts only when it exceeds it.
A hand-written analysis between the markers ``ANALYSIS_START`` and ``ANALYSIS_END`` in an existing
``ablations.md`` is carried over when the report is written again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

RULES = ("track", "walk", "jump", "hybrid", "svd", "frozen")
DEFAULT_Q, DEFAULT_WALK = 1, 0.1  # the walk's step size of runs that do not name one (the default until 2026-12-03)
SCRIPT_LRS = {"adamw-torch": 0.003, None: 0.01}  # ablations.sh's rates (for archived records without one)
RULE_Q = {"walk": "full", "hybrid": "full"}  # today's default update rank where it is not 1 (runs without the option)
WALK_STEPS = (0.03, 0.1, 0.3, 1.0, 1.5)
R_OVER_D = 64 / 256  # rank / short side of every projected matrix of `tiny` (hidden 256, FFN 688)
BASE_T = 50  # the update interval of the runs without an override (set from the data in report())
COMBOS = (("rotate", True), ("keep", True), ("rotate", False), ("keep", False))


# ---------------------------------------------------------------------------------------- loading
def load_runs(root: Path) -> list[dict[str, Any]]:
    runs = []
    for d in sorted(root.glob("s*/runs/*")):
        paths = [d / "config.json", d / "summary.json", d / "metrics.jsonl"]
        if not all(p.is_file() for p in paths):
            continue
        summary = json.loads(paths[1].read_text())
        if not summary.get("finished"):
            continue
        cfg = json.loads(paths[0].read_text())
        hist = [json.loads(x) for x in paths[2].read_text().splitlines() if x.strip()]
        opts = cfg.get("options", {})
        run = {"dir": str(d), "seed": cfg["seed"], "preset": cfg["preset"], "summary": summary, "history": hist,
               "rule": opts.get("rule"), "transport": opts.get("transport"), "recovery": opts.get("recovery"),
               "T": cfg["update_interval"], "q": opts.get("update_rank", RULE_Q.get(opts.get("rule"), DEFAULT_Q)),
               "eta": opts.get("step_size", DEFAULT_WALK if opts.get("rule") in ("walk", "hybrid") else None),
               "extra": {k: v for k, v in opts.items() if k not in ("rule", "transport", "recovery", "update_rank",
                                                                      "step_size")},
               "config": cfg}
        runs.append(run)
    return runs


def load_archive(path: Path, live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of an earlier report's ``results.json`` whose configuration and seed no live run has (their
    folders may be gone): the measurements of (i)-(iii) stay in the report when only new parts are run."""
    if not path.is_file():
        return []
    have = {(key(r), r["seed"]) for r in live}
    out = []
    for c in json.loads(path.read_text())["runs"]:
        src = c.get("archived_from") or str(path)
        run = {"dir": c["dir"], "seed": c["seed"], "preset": c["preset"], "rule": c["rule"], "transport": c["transport"],
               "recovery": c["recovery"], "T": c["T"], "q": c["q"], "eta": c["eta"], "extra": {}, "config": None,
               "lr": c.get("lr", SCRIPT_LRS.get(c["preset"], SCRIPT_LRS[None])),
               "archived_from": src,
               "summary": {"final_eval_loss": c["final_eval_loss"], "train_time_s": c["train_time_s"],
                           "mean_opt_step_s": c["mean_opt_step_s"]},
               "history": [{"step": st, "eval_loss": v} for st, v in c["eval"]] +
                          [{"step": st, "train_time": t, "loss": v} for st, t, v in c["train"]]}
        run["history"].sort(key=lambda h: (h["step"], "loss" in h))
        run["shadowed"] = (key(run), run["seed"]) in have  # rerun live: kept only for the comparison
        out.append(run)
    return out


def key(r: dict[str, Any]) -> tuple:
    return (r["preset"], r["rule"], r["transport"], r["recovery"], r["T"], r["q"], r["eta"])


def group(runs) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list] = defaultdict(list)
    for r in runs:
        out[key(r)].append(r)
    return out


def find(groups, rule, transport="rotate", recovery=True, T=None, q=DEFAULT_Q, eta=None):
    T = BASE_T if T is None else T
    if eta is None and rule in ("walk", "hybrid"):
        eta = DEFAULT_WALK
    return groups.get(("subtrack++", rule, transport, recovery, T, q, eta), [])


def final(rs, field="final_eval_loss"):
    xs = [r["summary"][field] for r in rs if r["summary"].get(field) is not None]
    return statistics.fmean(xs) if xs else None


def spread(rs):
    xs = [r["summary"]["final_eval_loss"] for r in rs if r["summary"].get("final_eval_loss") is not None]
    return max(xs) - min(xs) if len(xs) > 1 else None


def by_seed(rs) -> dict[int, float]:
    return {r["seed"]: r["summary"]["final_eval_loss"] for r in rs if r["summary"].get("final_eval_loss") is not None}


def fmt(x, spec=".4f"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def cell(rs) -> str:
    if not rs:
        return "–"
    return f"{fmt(final(rs))} ± {fmt((spread(rs) or 0) / 2, '.4f')}"


def eval_at(hist, frac):
    """The eval loss recorded nearest to ``frac`` of the run."""
    ev = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
    if not ev:
        return None
    last = ev[-1][0]
    return min(ev, key=lambda p: abs(p[0] - frac * last))[1]


def running_loss(hist, window=5) -> list[tuple[float, float]]:
    """(training wall time, mean training loss over the last ``window`` log lines) along the run."""
    pts = [(h["train_time"], h["loss"]) for h in hist if "loss" in h and "train_time" in h]
    return [(pts[i][0], statistics.fmean(p[1] for p in pts[max(0, i - window + 1):i + 1])) for i in range(len(pts))]


def time_to_loss(hist, target, window=5):
    """Training wall time at which the running mean of the training loss first reaches ``target``."""
    return next((t for t, loss in running_loss(hist, window) if loss <= target), None)


# ---------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_rules(groups, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.2
    labels = {("rotate", True): "rotate + recovery", ("keep", True): "keep + recovery",
              ("rotate", False): "rotate, no recovery", ("keep", False): "keep, no recovery"}
    for j, combo in enumerate(COMBOS):
        for i, rule in enumerate(RULES):
            tr = "keep" if rule == "frozen" else combo[0]
            if rule == "frozen" and combo[0] == "rotate":
                continue
            rs = find(groups, rule, tr, combo[1])
            if not rs:
                continue
            x = i + (j - 1.5) * width
            ax.bar(x, final(rs), width, color=plt.cm.tab10(j), label=labels[combo] if i == 0 else None)
            ax.plot([x] * len(rs), list(by_seed(rs).values()), "k.", ms=4)
    ref = [r for rs in groups.values() for r in rs if r["preset"] == "adamw-torch"]
    if ref:
        ax.axhline(final(ref), color="gray", ls="--", lw=1, label="AdamW (full rank)")
    ax.set_xticks(range(len(RULES)), RULES)
    vals = [final(rs) for rs in groups.values() if final(rs) is not None]
    if vals:
        lo, hi = min(vals), max(vals)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_ylabel("final eval loss (dots: seeds)")
    ax.set_title("(i) update rule x moment transport x recovery scaling")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(groups, path: Path) -> None:
    """Training loss (rotate + recovery for every rule) against step and against wall time."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, rule in enumerate(RULES):
        rs = find(groups, rule, "keep" if rule == "frozen" else "rotate", True)
        for r in rs:
            h = [x for x in r["history"] if "loss" in x]
            ls = "-" if r["seed"] == 0 else "--"
            axes[0].plot([x["step"] for x in h], [x["loss"] for x in h], ls, color=plt.cm.tab10(i), lw=1,
                         label=rule if r["seed"] == 0 else None)
            axes[1].plot([x["train_time"] for x in h], [x["loss"] for x in h], ls, color=plt.cm.tab10(i), lw=1,
                         label=rule if r["seed"] == 0 else None)
            n = len(h)
            axes[2].plot([x["step"] for x in h[n // 2:]], [x["loss"] for x in h[n // 2:]], ls, color=plt.cm.tab10(i),
                         lw=1, label=rule if r["seed"] == 0 else None)
    for ax, xl, t in zip(axes, ("step", "training wall time (s)", "step"),
                         ("training loss", "training loss against wall time", "second half of training")):
        ax.set_xlabel(xl)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(t + " (rotate + recovery; dashed: seed 1)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweeps(groups, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    intervals = sorted({25, 50, 100, 200, 500, BASE_T})
    sweeps = [("update interval T (track)", intervals, lambda v: find(groups, "track", T=v), "log"),
              ("update rank q (track)", [1, 2, 4, 8], lambda v: find(groups, "track", q=v), "log"),
              ("step size, radians (walk)", [0.03, 0.1, 0.3, 1.0], lambda v: find(groups, "walk", eta=v), "log")]
    for ax, (title, values, get, scale) in zip(axes, sweeps):
        xs, ys, pts = [], [], []
        for v in values:
            rs = get(v)
            if rs:
                xs.append(v)
                ys.append(final(rs))
                pts += [(v, y) for y in by_seed(rs).values()]
        if xs:
            ax.plot(xs, ys, "o-")
            ax.plot(*zip(*pts), "k.", ms=4)
        ax.set_xscale(scale)
        ax.set_xticks(values, [str(v) for v in values])
        ax.minorticks_off()
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("final eval loss (dots: seeds)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_extension(groups, path: Path) -> None:
    """(iv) the walk's step size, full tangent against rank 1; (v) keep / rotate / reset per rule."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    for q, style in (("full", "o-"), (1, "s--")):
        pts = [(e, find(groups, "walk", q=q, eta=e)) for e in WALK_STEPS]
        pts = [(e, rs) for e, rs in pts if rs]
        if pts:
            ax.plot([e for e, _ in pts], [final(rs) for _, rs in pts], style,
                    label="full tangent" if q == "full" else "rank 1 (update_rank=1)")
            ax.plot([e for e, rs in pts for _ in by_seed(rs)], [v for _, rs in pts for v in by_seed(rs).values()],
                    "k.", ms=4)
    fz = find(groups, "frozen", "keep", True)
    if fz:
        ax.axhline(final(fz), color="gray", ls=":", label="frozen")
    ax.set_xscale("log")
    ax.set_xticks(WALK_STEPS, [str(e) for e in WALK_STEPS])
    ax.minorticks_off()
    ax.set_xlabel("walk step size (largest angle per update, rad)")
    ax.set_ylabel("final eval loss (dots: seeds)")
    ax.set_title("(iv) walk: full tangent vs rank 1 (rotate + recovery)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for j, tr in enumerate(("keep", "rotate", "reset")):
        for i, (rule, q) in enumerate(TRANSPORT_RULES):
            rs = find(groups, rule, tr, True, q=q)
            if rs:
                ax.bar(i + (j - 1) * 0.27, final(rs), 0.27, color=plt.cm.tab10(j), label=tr if i == 0 else None)
                ax.plot([i + (j - 1) * 0.27] * len(rs), list(by_seed(rs).values()), "k.", ms=4)
    ax.set_xticks(range(len(TRANSPORT_RULES)), [f"{r} (full)" if q == "full" else r for r, q in TRANSPORT_RULES])
    vals = [final(find(groups, r, tr, True, q=q)) for r, q in TRANSPORT_RULES for tr in ("keep", "rotate", "reset")]
    vals = [v for v in vals if v is not None]
    if vals:
        ax.set_ylim(min(vals) - 0.03, max(vals) + 0.03)
    ax.set_ylabel("final eval loss (dots: seeds)")
    ax.set_title("(v) moment transport at each update (recovery on)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TRANSPORT_RULES = (("jump", DEFAULT_Q), ("walk", "full"), ("track", DEFAULT_Q), ("svd", DEFAULT_Q))


def extension(groups, noise, figdir: Path, shadowed=()) -> list[str]:
    """Sections (iv) and (v): the full-tangent walk and the reset transport (issue 18's extension)."""
    full = {e: find(groups, "walk", q="full", eta=e) for e in WALK_STEPS}
    resets = {r: find(groups, r, "reset", True, q=q) for r, q in TRANSPORT_RULES}
    if not any(full.values()) and not any(resets.values()):
        return []
    plot_extension(groups, figdir / "walk_reset.png")
    fz = find(groups, "frozen", "keep", True)
    L = ["## (iv) The full-tangent walk, and hybrid with it", "",
         "`walk` with `update_rank=\"full\"`: every update turns all 64 directions of the basis along a random "
         "tangent, the largest angle equal to the step size (the rank-1 walk of (iii) turned one). Rotate + "
         "recovery unless said otherwise.", "",
         "| walk: step size (rad) | " + " | ".join(str(e) for e in WALK_STEPS) + " |", "|---|" + "---|" * len(WALK_STEPS),
         "| full tangent | " + " | ".join(cell(full[e]) for e in WALK_STEPS) + " |",
         "| rank 1, from (iii) | " + " | ".join(cell(find(groups, "walk", eta=e)) for e in WALK_STEPS) + " |", "",
         f"Beside it: `frozen` {cell(fz)}; the full walk (0.1 rad) with `keep` "
         f"{cell(find(groups, 'walk', 'keep', True, q='full'))}; `hybrid` (walk steps of 0.1 rad, jump probability "
         f"0.3) with the full tangent {cell(find(groups, 'hybrid', q='full'))}, with the rank-1 walk (from (i)) "
         f"{cell(find(groups, 'hybrid'))}.", ""]
    best_eta = min((e for e in WALK_STEPS if full[e]), key=lambda e: final(full[e]), default=None)
    if best_eta is not None and fz:
        d = {s: by_seed(fz)[s] - v for s, v in by_seed(full[best_eta]).items() if s in by_seed(fz)}
        m = statistics.fmean(d.values())
        verdict_walk = ("moves off frozen and trains better" if m > noise and all(v > 0 for v in d.values()) else
                        "worse than frozen" if m < -noise and all(v < 0 for v in d.values()) else
                        "within the seed noise of frozen")
        L += [f"Best full-walk step size {best_eta:g} rad: loss(frozen) - loss(walk) = "
              + ", ".join(f"seed {s}: {v:+.4f}" for s, v in sorted(d.items())) + f" (mean {m:+.4f}; noise {noise:.4f}):"
              f" **{verdict_walk}**.", ""]
    L += ["## (v) Resetting the moments at each update, beside keeping and rotating them", "",
          "Recovery on. `keep` and `rotate` of `jump`, `track` and `svd` come from (i); `walk` is the full-tangent "
          "walk at 0.1 rad. Position of rotate between keep (0) and reset (1): `(rotate - keep) / (reset - keep)` per "
          "seed, given only where `|reset - keep|` exceeds the seed noise.", "",
          "| rule | keep | rotate | reset | rotate - keep | reset - keep | position of rotate |",
          "|---|---|---|---|---|---|---|"]
    for rule, q in TRANSPORT_RULES:
        k, ro, re = (find(groups, rule, tr, True, q=q) for tr in ("keep", "rotate", "reset"))
        bk, bro, bre = by_seed(k), by_seed(ro), by_seed(re)
        seeds = sorted(set(bk) & set(bro) & set(bre))
        pos = [(bro[s] - bk[s]) / (bre[s] - bk[s]) for s in seeds if abs(bre[s] - bk[s]) > noise]
        diff = lambda a, b: fmt(statistics.fmean(a[s] - b[s] for s in seeds), "+.4f") if seeds else "–"  # noqa: E731, B023  used in this iteration
        L.append(f"| {rule}{' (full)' if q == 'full' else ''} | {cell(k)} | {cell(ro)} | {cell(re)} | {diff(bro, bk)} | "
                 f"{diff(bre, bk)} | {', '.join(f'{p:.2f}' for p in pos) or '–'} |")
    L += ["", f"For a random jump, the singular values of `C = Q_old^T Q_new` have mean square `r/d` = {R_OVER_D:g} on "
              f"`tiny` (rank 64, every projected matrix's short side 256): rotating multiplies the first moment's "
              f"energy by about {R_OVER_D:g} (its norm by {math.sqrt(R_OVER_D):.2f}), a partial reset; for `track`, whose "
              "updates turn a few degrees, `C` is close to the identity and rotate is close to keep.", ""]
    if shadowed and fz:
        old = by_seed(shadowed_group := [r for r in shadowed if key(r) == key(fz[0])])
        new = {s: v for s, v in by_seed([r for r in fz if not r.get("archived_from")]).items()}
        if old and new and shadowed_group:
            L += ["**Control.** `frozen` (keep + recovery) ran again with today's code beside (iv) and (v); "
                  "(i)-(iii) come from runs of an earlier code version (`" + shadowed_group[0]["archived_from"] +
                  "`): " + ", ".join(f"seed {s}: {old[s]:.4f} then, {new[s]:.4f} now ({new[s] - old[s]:+.4f})"
                                     for s in sorted(set(old) & set(new))) + ".", ""]
    L += ["![walk and reset](ablations/walk_reset.png)", ""]
    return L


# ---------------------------------------------------------------------------------------- text
ANALYSIS_START, ANALYSIS_END = "<!-- analysis: hand-written, kept on regeneration -->", "<!-- end of analysis -->"


def write_with_analysis(path: Path, lines: list[str]) -> str:
    """Write ``lines`` to the markdown report ``path``, followed by the hand-written analysis of the report
    it replaces (:func:`kept_analysis`); returns the text. The other benchmark reports use it too."""
    analysis = kept_analysis(path)
    text = "\n".join(lines + ([analysis, ""] if analysis else [])) + "\n"
    path.write_text(text)
    return text


def kept_analysis(path: Path) -> str:
    """The hand-written analysis of an earlier ``ablations.md`` (between the markers), to carry over."""
    if not path.is_file():
        return ""
    text = path.read_text()
    i, j = text.find(ANALYSIS_START), text.find(ANALYSIS_END)
    return text[i:j + len(ANALYSIS_END)] if 0 <= i < j else ""


# ---------------------------------------------------------------------------------------- claims
def verdict(diffs: list[float], noise: float) -> str:
    if not diffs:
        return "not measured"
    m = statistics.fmean(diffs)
    pos = sum(d > 0 for d in diffs)
    if m > noise and pos >= 0.75 * len(diffs):
        return "holds"
    if m < -noise and pos <= 0.25 * len(diffs):
        return "reversed"
    return "not shown (within seed noise)"


def report(runs, dest: Path, source: Path, shadowed=()) -> str:
    global BASE_T
    BASE_T = statistics.mode(r["T"] for r in runs)
    groups = group(runs)
    spreads = [spread(rs) for rs in groups.values() if spread(rs) is not None]
    noise = statistics.median(spreads) if spreads else 0.0
    seeds = sorted({r["seed"] for r in runs})
    live = [r for r in runs if r.get("config") is not None]
    any_run = next((r for r in live if r["preset"] == "subtrack++"), live[0])
    c = any_run["config"]
    dest.mkdir(parents=True, exist_ok=True)
    figdir = dest / "ablations"
    figdir.mkdir(exist_ok=True)
    plot_rules(groups, figdir / "rules.png")
    plot_curves(groups, figdir / "curves.png")
    plot_sweeps(groups, figdir / "sweeps.png")
    L = ["# Ablations of the papers, at small scale", "",
         f"Model `{c['model']}` on SOTU, {any_run['summary']['tokens']:,} training tokens per run "
         f"({c['batch_size']} x {c['seq_len']} tokens per step, {any_run['summary']['steps']} steps), "
         f"{'bf16 autocast' if c['bf16'] else 'fp32'}, rank {c['rank']}, lr {c['lr']:g} "
         f"(alpha 0.25), warmup then cosine decay, seeds {seeds} (model init and data order; every configuration "
         "sees the same tokens for a seed). Every configuration is a variant of the `subtrack++` preset "
         "(`grassopt bench --presets 'subtrack++:rule=walk,transport=keep,recovery=False' ...`): Adam inside the "
         f"subspace, basis update every {BASE_T} steps unless said otherwise. Made by "
         "[`benchmarks/ablations.sh`](ablations.sh) and [`benchmarks/ablations_report.py`](ablations_report.py) "
         f"from `{source}`" + (f" and, for the configurations not rerun there, the runs archived in "
                               f"`{archived[0]}` (run folders gone; the control in (v) shows today's code "
                               "reproduces them)" if (archived := sorted({r['archived_from'] for r in runs
                                                                          if r.get('archived_from')})) else "") + ".", "",
         f"Losses are final eval losses over the whole validation split, mean ± half the spread of the {len(seeds)} "
         f"seeds. **Seed noise**: the median over configurations of the seed-to-seed spread is "
         f"{noise:.4f} nats; below, a difference counts only when its mean exceeds that.", ""]
    # (i)
    L += ["## (i) Update rule x moment rotation x recovery scaling", "",
          "| rule | rotate + recovery | keep + recovery | rotate, no recovery | keep, no recovery | "
          "opt. step (ms, rotate + rec.) | train time (s, rotate + rec.) |", "|---|---|---|---|---|---|---|"]
    for rule in RULES:
        cells = []
        for tr, rs in COMBOS:
            if rule == "frozen":
                cells.append(cell(find(groups, rule, "keep", rs)) + (" (= keep)" if tr == "rotate" else ""))
            else:
                cells.append(cell(find(groups, rule, tr, rs)))
        base = find(groups, rule, "keep" if rule == "frozen" else "rotate", True)
        opt_ms = final(base, "mean_opt_step_s")
        L.append(f"| {rule} | " + " | ".join(cells) +
                 f" | {fmt(None if opt_ms is None else 1e3 * opt_ms, '.1f')} | {fmt(final(base, 'train_time_s'), '.0f')} |")
    ref = [r for rs in groups.values() for r in rs if r["preset"] == "adamw-torch"]
    if ref:
        L += ["", f"Full-rank reference, `torch.optim.AdamW` (lr {(ref[0]['config'] or ref[0])['lr']:g}, not tuned): "
                  f"{cell(ref)}."]
    L += ["", "`frozen` never changes its basis, so rotation cannot act: it ran once, with `keep`.", "",
          "![rules](ablations/rules.png)", "", "![curves](ablations/curves.png)", ""]
    # (ii), (iii)
    L += ["## (ii) Update interval and update rank of `track`; (iii) step size of `walk`", "",
          "| track: update interval T | " + " | ".join(str(t) for t in (25, 50, 100, 200, 500)) + " |",
          "|---|" + "---|" * 5,
          "| eval loss | " + " | ".join(cell(find(groups, "track", T=t)) for t in (25, 50, 100, 200, 500)) + " |",
          "| basis updates in the run | " + " | ".join(
              str(max(0, (any_run['summary']['steps'] - 1) // t)) for t in (25, 50, 100, 200, 500)) + " |", "",
          "| track: update rank q | 1 | 2 | 4 | 8 |", "|---|---|---|---|---|",
          "| eval loss | " + " | ".join(cell(find(groups, "track", q=q)) for q in (1, 2, 4, 8)) + " |", "",
          "| walk: step size (rad) | 0.03 | 0.1 | 0.3 | 1.0 |", "|---|---|---|---|---|",
          "| eval loss | " + " | ".join(cell(find(groups, "walk", eta=e)) for e in (0.03, 0.1, 0.3, 1.0)) + " |", "",
          "![sweeps](ablations/sweeps.png)", ""]
    L += extension(groups, noise, figdir, shadowed)
    # claims
    data_rules = [r for r in RULES if r != "frozen"]
    rot = [(f"{rule} rec={rs} s{s}", lk[s] - lr_[s])
           for rule in data_rules for rs in (True, False)
           for lr_, lk in [(by_seed(find(groups, rule, "rotate", rs)), by_seed(find(groups, rule, "keep", rs)))]
           for s in sorted(set(lr_) & set(lk))]
    rec = [(f"{rule} {tr} s{s}", lo[s] - lw[s])
           for rule in RULES for tr in (("keep",) if rule == "frozen" else ("rotate", "keep"))
           for lw, lo in [(by_seed(find(groups, rule, tr, True)), by_seed(find(groups, rule, tr, False)))]
           for s in sorted(set(lw) & set(lo))]
    L += ["## The papers' claims, here", "",
          "| claim | criterion | differences (nats, positive = the claim's side better) | verdict |",
          "|---|---|---|---|"]
    for name, crit, diffs in (
            ("moment rotation helps (AO)", "loss(keep) - loss(rotate), each rule but frozen, with and without "
             "recovery, each seed; holds if the mean exceeds the seed noise and >= 75% are positive", rot),
            ("recovery scaling helps (RS)", "loss(no recovery) - loss(recovery), each rule and transport, each "
             "seed; same rule", rec)):
        vals = [d for _, d in diffs]
        per_rule = defaultdict(list)
        for lab, d in diffs:
            per_rule[lab.split()[0]].append(d)
        detail = "; ".join(f"{k} {statistics.fmean(v):+.3f}" for k, v in per_rule.items())
        L.append(f"| {name} | {crit} | mean {fmt(statistics.fmean(vals) if vals else None, '+.4f')} "
                 f"({sum(v > 0 for v in vals)}/{len(vals)} positive); by rule: {detail} | "
                 f"**{verdict(vals, noise)}** |")
    # tracking vs SVD in wall time at equal loss
    rows = []
    for tr, rs in COMBOS:
        t_rs, s_rs = find(groups, "track", tr, rs), find(groups, "svd", tr, rs)
        for s in sorted(set(by_seed(t_rs)) & set(by_seed(s_rs))):
            tr_run = next(r for r in t_rs if r["seed"] == s)
            sv_run = next(r for r in s_rs if r["seed"] == s)
            # the worse of the two final running losses: both runs reach it, at the latest at their end
            target = max(running_loss(tr_run["history"])[-1][1], running_loss(sv_run["history"])[-1][1])
            rows.append((tr, rs, s, time_to_loss(tr_run["history"], target), time_to_loss(sv_run["history"], target),
                         tr_run["summary"]["final_eval_loss"] - sv_run["summary"]["final_eval_loss"],
                         tr_run["summary"]["mean_opt_step_s"], sv_run["summary"]["mean_opt_step_s"]))
    timed = [r for r in rows if r[3] is not None and r[4] is not None]
    faster = [r for r in timed if r[3] < r[4]]
    equal = [r for r in rows if abs(r[5]) <= noise]
    if timed:
        wall = ("holds" if len(faster) == len(timed) and all(r[5] <= noise for r in rows) else
                "reversed" if not faster else "mixed")
    else:
        wall = "not measured"
    L.append("| tracking beats SVD in wall time at equal loss | time for the training loss (mean of 5 log lines) "
             "to reach the worse of the two runs' final values of that mean, track vs svd, same transport, "
             f"recovery and seed; holds if track is faster in every pair and never worse by more than the noise | "
             f"track faster in {len(faster)}/{len(rows)} pairs; final eval loss equal within noise in "
             f"{len(equal)}/{len(rows)} | **{wall}** |")
    # random walk / jump late in training
    best = {s: min(v for v in (by_seed(find(groups, "track")).get(s), by_seed(find(groups, "svd")).get(s)) if v is not None)
            for s in seeds if any(by_seed(find(groups, r)).get(s) is not None for r in ("track", "svd"))}
    late = []
    for rule in ("walk", "jump", "hybrid"):
        for r in find(groups, rule):
            ref_runs = [x for x in find(groups, "track") + find(groups, "svd") if x["seed"] == r["seed"]]
            if not ref_runs:
                continue
            mid = eval_at(r["history"], 0.5) - min(eval_at(x["history"], 0.5) for x in ref_runs)
            end = r["summary"]["final_eval_loss"] - best[r["seed"]]
            late.append((rule, r["seed"], mid, end))
    if late:
        holds = [x for x in late if x[3] <= noise and x[3] <= x[2] + 1e-12]
        lv = "holds" if len(holds) >= 0.75 * len(late) else "not shown" if holds else "does not hold"
        detail = "; ".join(f"{r} s{s}: {m:+.3f} → {e:+.3f}" for r, s, m, e in late)
    else:
        lv, detail = "not measured", ""
    L.append("| a random walk or jump holds its own late in training | eval-loss gap of walk/jump/hybrid (rotate + "
             "recovery) to the better of track and svd, at mid-run → at the end; holds if, in >= 75% of runs, the "
             f"final gap is within the seed noise and no larger than at mid-run | {detail} | **{lv}** |")
    L += ["", "### Wall time, track vs svd", "",
          "| transport | recovery | seed | track: time to target (s) | svd: time to target (s) | "
          "final eval loss, track - svd | opt. step track / svd (ms) |", "|---|---|---|---|---|---|---|"]
    for tr, rs, s, tt, ts, dl, ot, os_ in rows:
        L.append(f"| {tr} | {rs} | {s} | {fmt(tt, '.1f')} | {fmt(ts, '.1f')} | {dl:+.4f} | "
                 f"{1e3 * ot:.1f} / {1e3 * os_:.1f} |")
    L += ["", "Wall times come from two runs side by side on 2 shared cores (one thread each): compare them "
              "within this table, not with other machines. The optimizer step (the only part that differs between "
              "rules) is also given on its own.", ""]
    text = write_with_analysis(dest / "ablations.md", L)
    compact = [{"dir": r["dir"], "seed": r["seed"], "preset": r["preset"], "rule": r["rule"], "transport": r["transport"],
                "recovery": r["recovery"], "T": r["T"], "q": r["q"], "eta": r["eta"],
                "final_eval_loss": r["summary"]["final_eval_loss"], "train_time_s": r["summary"]["train_time_s"],
                "mean_opt_step_s": r["summary"]["mean_opt_step_s"],
                "eval": [(h["step"], h["eval_loss"]) for h in r["history"] if "eval_loss" in h],
                "train": [(h["step"], h["train_time"], h["loss"]) for h in r["history"] if "loss" in h],
                "lr": r["config"]["lr"] if r.get("config") else r.get("lr"),
                "archived_from": r.get("archived_from")} for r in runs]
    (figdir / "results.json").write_text(json.dumps({"noise": noise, "runs": compact}, indent=0))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="the output folder of benchmarks/ablations.sh (e.g. runs/ablations)")
    ap.add_argument("--dest", default="benchmarks", help="where ablations.md and ablations/*.png go")
    ap.add_argument("--archive", default="benchmarks/ablations/runs_2026-12-02.json",
                    help="an earlier report's results.json (default: the runs of (i)-(iii), measured on 2026-12-02, "
                         "whose folders are gone): its runs join the report where no live run has the same "
                         "configuration and seed ('' for none)")
    args = ap.parse_args(argv)
    runs = load_runs(Path(args.runs))
    shadowed = []
    if runs and args.archive:
        archived = load_archive(Path(args.archive), runs)
        runs += [r for r in archived if not r["shadowed"]]
        shadowed = [r for r in archived if r["shadowed"]]
    if not runs:
        print(f"no finished runs under {args.runs}/s*/runs/", file=sys.stderr)
        return 2
    print(report(runs, Path(args.dest), Path(args.runs), shadowed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
