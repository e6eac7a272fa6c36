"""Plots and a summary of the records of :class:`~grassopt.analysis.hook.SubspaceAnalyzer`.

Every plot has one panel per layer type (q, k, v, o, gate, up, down, then any other) and, unless
said otherwise, a line per depth, over training steps:

- ``energy_svd.png``: share of the gradient's energy in its best rank-``r`` subspace;
- ``energy_basis.png``: share in the optimizer's current basis;
- ``df_spectrum.png``: the top singular values of ``grad F`` (the derivative of the subspace
  estimation error), the maximum over depths of the ``i``-th value, a line per ``i`` (the
  GrassWalk/GrassJump paper's Figure 2); ``df_spectrum_rel.png`` the same divided by ``||G||^2``;
- ``basis_angles.png``: the largest principal angle of each basis update of the optimizer;
- ``svd_drift.png``: the mean principal angle between the SVD subspaces of successive records (the
  largest one is close to 90 degrees for any noisy minibatch gradient, so it says little);
- ``capture_next.png``: the subspace quality (``type="quality"`` records), the mean share of the
  next gradients' energy captured by each basis over its interval, at the interval's end step.

``summarize`` condenses the records into early/late means (first and last quarter of the recorded
steps) and, with :func:`summarize_quality`, the quality per rule and layer type (means over the
basis intervals), written with the tables of ``analysis.md``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .metrics import LAYER_KINDS

__all__ = ["write_outputs", "summarize", "summarize_quality", "markdown", "quality_markdown", "plot_by_kind",
           "plot_spectrum"]


def _kinds(records) -> list[str]:
    present = list(dict.fromkeys(r["kind"] for r in records))
    return [k for k in LAYER_KINDS if k in present] + [k for k in present if k not in LAYER_KINDS]


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def _panels(n: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(4, max(1, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False, sharex=True)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return plt, fig, flat[:n]


def plot_by_kind(records: list[dict[str, Any]], key: str, path: Path, ylabel: str, title: str,
                 marker: str = "", logy: bool = False) -> bool:
    """One panel per layer type, a line per depth: ``key`` against the step. False if nothing to plot."""
    recs = [r for r in records if r.get(key) is not None]
    if not recs:
        return False
    kinds = _kinds(recs)
    depths = sorted({r["depth"] for r in recs if r["depth"] is not None})
    plt, fig, axes = _panels(len(kinds))
    cmap = plt.cm.viridis
    for ax, kind in zip(axes, kinds):
        by_depth: dict[Any, list[tuple[int, float]]] = defaultdict(list)
        for r in recs:
            if r["kind"] == kind:
                by_depth[r["depth"]].append((r["step"], r[key]))
        for depth, pts in sorted(by_depth.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            pts.sort()
            color = cmap(depths.index(depth) / max(1, len(depths) - 1)) if depth in depths else "k"
            ax.plot(*zip(*pts), marker or "-", color=color, lw=1.2, ms=3,
                    label=f"layer {depth}" if depth is not None else "other")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        if logy:
            ax.set_yscale("log")
    fig.supxlabel("step", fontsize=9)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_spectrum(records: list[dict[str, Any]], path: Path, key: str = "df_sv", title: str = "") -> bool:
    """Per layer type, the ``i``-th singular value of ``grad F`` (maximum over depths), a line per ``i``."""
    recs = [r for r in records if r.get(key)]
    if not recs:
        return False
    kinds = _kinds(recs)
    plt, fig, axes = _panels(len(kinds))
    top = max(len(r[key]) for r in recs)
    for ax, kind in zip(axes, kinds):
        by_step: dict[int, list[list[float]]] = defaultdict(list)
        for r in recs:
            if r["kind"] == kind:
                by_step[r["step"]].append(r[key])
        steps = sorted(by_step)
        for i in range(top):
            ys = [max((sv[i] for sv in by_step[s] if len(sv) > i), default=float("nan")) for s in steps]
            ax.plot(steps, ys, color=plt.cm.plasma(i / max(1, top - 1)), lw=1, label=f"sigma_{i + 1}" if i in (0, top - 1) else None)
        ax.set_title(kind)
        ax.grid(alpha=0.3)
    fig.supxlabel("step", fontsize=9)
    axes[0].set_ylabel("singular value (max over layers)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _windows(steps: list[int]) -> tuple[set[int], set[int]]:
    """The first and last quarter of the recorded steps (at least one step each)."""
    steps = sorted(set(steps))
    q = max(1, len(steps) // 4)
    return set(steps[:q]), set(steps[-q:])


def summarize_quality(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The subspace quality (``type="quality"`` records) per rule and layer type, then over all the
    rule's matrices (``kind="all"``): means over the basis intervals of ``capture_next`` (and its
    early/late means: intervals ending in the first and last quarter of the interval end steps),
    ``capture_min``, the interval length and the update angles (updates only: a last, still open
    interval has none)."""
    quality = [r for r in records if r.get("type") == "quality"]
    rows = []
    for rule in dict.fromkeys(r.get("rule") for r in quality):
        rr = [r for r in quality if r.get("rule") == rule]
        early, late = _windows([r["step"] for r in rr])
        for kind in [*_kinds(rr), "all"]:
            rk = rr if kind == "all" else [r for r in rr if r["kind"] == kind]
            rows.append({
                "rule": rule, "kind": kind, "intervals": len(rk),
                "steps_per_interval": _mean([r["steps"] for r in rk]),
                "capture_next": _mean([r["capture_next"] for r in rk]),
                "capture_next_early_late": (_mean([r["capture_next"] for r in rk if r["step"] in early]),
                                            _mean([r["capture_next"] for r in rk if r["step"] in late])),
                "capture_min": _mean([r["capture_min"] for r in rk]),
                "angle_max_deg": _mean([r["angle_max_deg"] for r in rk]),
                "angle_mean_deg": _mean([r["angle_mean_deg"] for r in rk]),
            })
    return rows


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Early/late means by layer type and by depth (first and last quarter of the recorded steps), and
    the subspace quality (:func:`summarize_quality`, under ``"quality"``)."""
    grads = [r for r in records if r.get("type") == "grad"]
    bases = [r for r in records if r.get("type") == "basis"]
    quality = summarize_quality(records)
    if not grads:
        return {"steps": [], "kinds": {}, "depths": {}, "quality": quality}
    early, late = _windows([r["step"] for r in grads])
    kinds = _kinds(grads)
    depths = sorted({r["depth"] for r in grads if r["depth"] is not None})

    def stat(rs, key, f=lambda v: v):
        return _mean([f(r[key]) for r in rs if r.get(key) is not None])

    def uniformity(sv):  # the last kept singular value over the first: 1 = a flat spectrum
        return sv[-1] / sv[0] if sv and sv[0] > 0 else None

    out: dict[str, Any] = {"steps": [min(early), max(early), min(late), max(late)], "kinds": {}, "depths": {},
                           "cells": {}, "quality": quality}
    for kind in kinds:
        rk = [r for r in grads if r["kind"] == kind]
        e, l_ = [r for r in rk if r["step"] in early], [r for r in rk if r["step"] in late]
        # maximum over depths of sigma_1 at each step, then the window mean (the paper's Figure 2 view)
        def max_sigma(rs, key):
            by_step = defaultdict(list)
            for r in rs:
                if r.get(key):
                    by_step[r["step"]].append(r[key][0])
            return _mean([max(v) for v in by_step.values()])
        out["kinds"][kind] = {
            "energy_svd": (stat(e, "energy_svd"), stat(l_, "energy_svd")),
            "energy_basis": (stat(e, "energy_basis"), stat(l_, "energy_basis")),
            "df_sigma1": (max_sigma(e, "df_sv"), max_sigma(l_, "df_sv")),
            "df_sigma1_rel": (max_sigma(e, "df_sv_rel"), max_sigma(l_, "df_sv_rel")),
            "df_uniformity": (stat(e, "df_sv", uniformity), stat(l_, "df_sv", uniformity)),
            "svd_drift_mean_deg": (stat(e, "svd_drift_mean_deg"), stat(l_, "svd_drift_mean_deg")),
            "basis_angle_max_deg": _mean([b["angle_max_deg"] for b in bases if b["kind"] == kind]),
        }
        for d in depths:
            rd = [r for r in rk if r["depth"] == d]
            out["cells"][f"{kind}/{d}"] = (stat([r for r in rd if r["step"] in early], "energy_svd"),
                                           stat([r for r in rd if r["step"] in late], "energy_svd"))
    for d in depths:
        rd = [r for r in grads if r["depth"] == d]
        out["depths"][str(d)] = {
            "energy_svd": (stat([r for r in rd if r["step"] in early], "energy_svd"),
                           stat([r for r in rd if r["step"] in late], "energy_svd")),
            "energy_basis": (stat([r for r in rd if r["step"] in early], "energy_basis"),
                             stat([r for r in rd if r["step"] in late], "energy_basis")),
        }
    return out


def _pair(p, spec=".3f"):
    a, b = p
    f = lambda x: "n/a" if x is None else format(x, spec)  # noqa: E731
    return f"{f(a)} → {f(b)}"


def _num(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def quality_markdown(rows: list[dict[str, Any]]) -> str:
    """The table of :func:`summarize_quality`."""
    lines = ["Subspace quality: the share of the next gradients' energy captured by the optimizer's basis, "
             "||Q^T G||² / ||G||² at the steps after the update that built it (its own gradient excluded) up to the "
             "update that replaces it; means over the basis intervals ('a → b': intervals ending in the first → "
             "last quarter).", "",
             "| rule | layer type | intervals | steps per interval | capture of next gradients | early → late "
             "| lowest capture in an interval | largest update angle (deg) | mean update angle (deg) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kind = "**all**" if r["kind"] == "all" else r["kind"]
        lines.append(f"| {r['rule']} | {kind} | {r['intervals']} | {_num(r['steps_per_interval'], '.1f')} "
                     f"| {_num(r['capture_next'])} | {_pair(r['capture_next_early_late'])} | {_num(r['capture_min'])} "
                     f"| {_num(r['angle_max_deg'], '.1f')} | {_num(r['angle_mean_deg'], '.2f')} |")
    return "\n".join(lines) + "\n"


def markdown(summary: dict[str, Any]) -> str:
    """The tables of ``analysis.md``."""
    quality = quality_markdown(summary["quality"]) if summary.get("quality") else ""
    if not summary.get("kinds"):
        return quality or "No gradient records.\n"
    s = summary["steps"]
    lines = [f"Early = recorded steps {s[0]}-{s[1]}, late = steps {s[2]}-{s[3]} (means; 'a → b' is early → late).", "",
             "| layer type | energy in rank-r SVD subspace | energy in optimizer basis | sigma_1(grad F), max over layers "
             "| sigma_1 / ‖G‖² | sigma_last / sigma_1 | SVD drift between records, mean angle (deg) | largest angle of a basis update (deg) |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, v in summary["kinds"].items():
        ang = v["basis_angle_max_deg"]
        lines.append(f"| {kind} | {_pair(v['energy_svd'])} | {_pair(v['energy_basis'])} | {_pair(v['df_sigma1'], '.3g')} "
                     f"| {_pair(v['df_sigma1_rel'], '.3g')} | {_pair(v['df_uniformity'], '.3f')} "
                     f"| {_pair(v['svd_drift_mean_deg'], '.1f')} | {'n/a' if ang is None else format(ang, '.1f')} |")
    if summary["depths"]:
        lines += ["", "| depth | energy in rank-r SVD subspace | energy in optimizer basis |", "|---|---|---|"]
        lines += [f"| {d} | {_pair(v['energy_svd'])} | {_pair(v['energy_basis'])} |" for d, v in summary["depths"].items()]
        kinds = list(summary["kinds"])
        depths = list(summary["depths"])
        lines += ["", "Energy in the rank-r SVD subspace, late window, by layer type (rows) and depth (columns):", "",
                  "| type | " + " | ".join(depths) + " |", "|---|" + "---|" * len(depths)]
        for kind in kinds:
            cells = [summary["cells"].get(f"{kind}/{d}", (None, None))[1] for d in depths]
            lines.append(f"| {kind} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells) + " |")
    if quality:
        lines += ["", quality.rstrip("\n")]
    return "\n".join(lines) + "\n"


def write_outputs(records: list[dict[str, Any]], out: str | Path) -> list[str]:
    """Write the PNGs, ``analysis_summary.json`` and ``analysis.md`` into ``out``; returns the file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grads = [r for r in records if r.get("type") == "grad"]
    bases = [r for r in records if r.get("type") == "basis"]
    quality = [r for r in records if r.get("type") == "quality"]
    written = []
    plots = [
        (grads, "energy_svd", "energy_svd.png", "energy share", "Share of gradient energy in its rank-r SVD subspace", ""),
        (grads, "energy_basis", "energy_basis.png", "energy share", "Share of gradient energy in the optimizer's basis", ""),
        (bases, "angle_max_deg", "basis_angles.png", "degrees", "Largest principal angle of each basis update", "o-"),
        (grads, "svd_drift_mean_deg", "svd_drift.png", "degrees",
         "Mean principal angle between the rank-r SVD subspaces of successive records", ""),
        (quality, "capture_next", "capture_next.png", "energy share",
         "Share of the next gradients' energy captured by the optimizer's basis (mean over each basis interval)", ".-"),
    ]
    for recs, key, name, ylabel, title, marker in plots:
        if plot_by_kind(recs, key, out / name, ylabel, title, marker=marker):
            written.append(name)
    if plot_spectrum(grads, out / "df_spectrum.png", "df_sv",
                     "Top singular values of the estimation-error derivative grad F (max over layers)"):
        written.append("df_spectrum.png")
    if plot_spectrum(grads, out / "df_spectrum_rel.png", "df_sv_rel",
                     "Top singular values of grad F / ||G||^2 (max over layers)"):
        written.append("df_spectrum_rel.png")
    summary = summarize(records)
    (out / "analysis_summary.json").write_text(json.dumps(summary, indent=1))
    text = ["# Gradient-subspace analysis", "", markdown(summary), ""] + [f"![{p}]({p})" for p in written]
    (out / "analysis.md").write_text("\n".join(text) + "\n")
    return written + ["analysis_summary.json", "analysis.md"]
