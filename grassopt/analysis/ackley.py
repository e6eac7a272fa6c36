"""``grassopt ackley``: the 2-D Ackley function optimised inside a moving 1-D subspace.

The SubTrack++ paper (Figure 5) contrasts Grassmannian subspace tracking with GaLore's SVD
subspace on the Ackley function: 100 steps, a subspace update every 10 steps, scale factors 1 and 3.
The paper gives no more detail, so this demo fixes its own (all are options):

- the point ``w = (x, y)`` is the parameter; its gradient, as a ``2 x 1`` matrix ``X`` (``d = 2``
  rows, ``k = 1`` column), is what the subspace rule sees: ``Q`` is ``2 x 1`` (rank 1). The rules
  are the library's own, ``grassopt.rules.get_rule("track")`` and ``("svd")``, called with ``X``;
  for a single column the SVD basis is the current gradient's direction, and ``track`` turns ``Q``
  toward it by a geodesic step of angle ``eta * sigma / ||X||^2`` (``normalized``, the library
  default, ``eta = 0.5``);
- inside the subspace, Adam with the library's convention (docs/algorithms.md#projected-step:
  ``betas = (0.9, 0.999)``, ``eps = 1e-6``, bias correction folded into the step size), update
  ``w <- w - lr_t * alpha * Q N`` with ``alpha`` the scale factor (``--inner sgd``:
  ``w <- w - lr * alpha * Q Q^T g``);
- the moments are kept unchanged across basis updates (``keep``: GaLore's behaviour, and the
  tracking paper's before it added its projection-aware optimizer), so the two runs differ only
  in the rule; ``--transport rotate`` gives the projection-aware variant;
- start ``(-2.2, 1.5)`` and ``lr = 0.5``, chosen with the full-space reference only (``--rules
  full``: the same Adam with ``Q = I``), never with the subspace runs: Ackley is so rugged that
  plain Adam from most points ends in a local minimum. The first start tried, ``(-2.7, 1.9)``,
  traps the full-space Adam at every ``lr`` in 0.1-0.7; from ``(-2.2, 1.5)`` it reaches the
  global minimum at ``lr`` 0.5 and 0.7, and 0.5 is the smaller;
- ``--grid`` runs every configuration from 16 start points on a circle (radius 3 by default,
  angles ``(2 j + 1) pi / 16``, never on an axis or a diagonal) and reports the median final
  distance and how many runs end within 0.5 of the minimum: one start point proves little here.

Everything is float64 and deterministic: no random numbers are drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..functional import adam_direction_
from ..rules import RuleContext, get_rule
from ..transport import TRANSPORTS, transport
from .metrics import principal_angles

__all__ = ["ackley", "ackley_grad", "AckleyConfig", "run", "run_all", "main"]


def ackley(w: torch.Tensor) -> torch.Tensor:
    """The 2-D Ackley function (a=20, b=0.2, c=2 pi); minimum 0 at the origin. ``w``: ``(..., 2)``."""
    rho = torch.sqrt(0.5 * (w * w).sum(-1))
    return (-20.0 * torch.exp(-0.2 * rho) - torch.exp(0.5 * torch.cos(2 * math.pi * w).sum(-1))
            + math.e + 20.0)


def ackley_grad(w: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`ackley` at ``w`` (shape ``(2,)``), in closed form; 0 at the origin
    (where the cone term is not differentiable and both one-sided slopes cancel)."""
    rho = torch.sqrt(0.5 * (w * w).sum())
    cone = 2.0 * torch.exp(-0.2 * rho) * w / rho if float(rho) > 0 else torch.zeros_like(w)
    wave = math.pi * torch.exp(0.5 * torch.cos(2 * math.pi * w).sum()) * torch.sin(2 * math.pi * w)
    return cone + wave


@dataclass
class AckleyConfig:
    """One run: the rule, the scale factor and the optimizer inside the subspace."""

    rule: str = "track"
    scale: float = 1.0
    start: tuple[float, float] = (-2.2, 1.5)
    steps: int = 100
    update_interval: int = 10
    lr: float = 0.5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    transport: str = "keep"
    inner: str = "adam"  # the optimizer inside the subspace: "adam" or "sgd" (w <- w - lr alpha Q R)
    options: dict[str, Any] = field(default_factory=dict)  # rule options, e.g. step_size for track

    def label(self) -> str:
        return f"{self.rule} SF{self.scale:g}"


#: Pseudo-rule of the full-space reference: ``Q = I`` (no projection), the same optimizer.
FULL = "full"


def run(cfg: AckleyConfig) -> dict[str, Any]:
    """Optimise Ackley from ``cfg.start``; returns the trajectory (``steps + 1`` points), the values,
    the basis direction at every step, the angle of every basis update, and the final distance."""
    if cfg.transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {cfg.transport!r}; choose one of {list(TRANSPORTS)}")
    if cfg.inner not in ("adam", "sgd"):
        raise ValueError(f"unknown inner optimizer {cfg.inner!r}; choose 'adam' or 'sgd'")
    full = cfg.rule == FULL
    rule = None if full else get_rule(cfg.rule)
    ctx = RuleContext(rank=1, transposed=False, options=dict(cfg.options),
                      generator=torch.Generator().manual_seed(0) if rule is not None and rule.NEEDS_GENERATOR else None)
    b1, b2 = cfg.betas
    w = torch.tensor(cfg.start, dtype=torch.float64)
    r_dim = 2 if full else 1
    mt = torch.zeros(1, r_dim, dtype=torch.float64)  # moments, k x r as the optimizer stores them
    vt = torch.zeros(1, r_dim, dtype=torch.float64)
    q = torch.eye(2, dtype=torch.float64) if full else None
    t_adam = 0
    path, values, bases, angles = [w.clone()], [float(ackley(w))], [], []
    for step in range(cfg.steps):
        x = ackley_grad(w).reshape(2, 1)  # the 2 x 1 "matrix" gradient: d = 2, k = 1
        if q is None:
            q = rule.init(x, ctx)  # type: ignore[union-attr]  # (rule is None only when full, and q is set)
        elif not full and step % cfg.update_interval == 0:
            ctx.angle = None
            q_new = rule.update(q, x, ctx)  # type: ignore[union-attr]  # (as above)
            angles.append(math.degrees(float(principal_angles(q, q_new)[0])))
            if transport(cfg.transport, q, q_new, mt, vt):
                t_adam = 0
            q = q_new
        r = (x.mT @ q)  # k x r = 1 x 1, the low-rank gradient
        if cfg.inner == "adam":
            t_adam += 1
            n = adam_direction_([r], [mt], [vt], t_adam, betas=cfg.betas, eps=cfg.eps)[0]
            lr_t = cfg.lr * math.sqrt(1 - b2**t_adam) / (1 - b1**t_adam)
        else:
            n, lr_t = r, cfg.lr
        w = w - lr_t * cfg.scale * (q @ n.mT).reshape(2)
        path.append(w.clone())
        values.append(float(ackley(w)))
        bases.append(q[:, 0].clone())
    traj = torch.stack(path)
    return {"config": {**asdict(cfg), "start": list(cfg.start), "betas": list(cfg.betas)}, "label": cfg.label(),
            "path": traj, "values": values, "bases": torch.stack(bases), "update_angles_deg": angles,
            "final_distance": float(torch.linalg.vector_norm(traj[-1])), "final_value": values[-1],
            "min_distance": float(torch.linalg.vector_norm(traj, dim=1).min())}


def grid_starts(n: int = 16, radius: float = 3.0) -> list[tuple[float, float]]:
    """``n`` start points on a circle, at angles ``(2 j + 1) pi / n`` (never on an axis or diagonal for n = 16)."""
    return [(radius * math.cos((2 * j + 1) * math.pi / n), radius * math.sin((2 * j + 1) * math.pi / n))
            for j in range(n)]


def run_all(base: AckleyConfig, rules=("track", "svd"), scales=(1.0, 3.0)) -> list[dict[str, Any]]:
    """Every (rule, scale) pair from ``base`` (the order of the paper's figure: scale, then rule)."""
    out = []
    for s in scales:
        for r in rules:
            opts = dict(base.options) if r != FULL and get_rule(r).OPTIONS else {}
            out.append(run(AckleyConfig(**{**asdict(base), "rule": r, "scale": s, "options": opts,
                                           "start": tuple(base.start), "betas": tuple(base.betas)})))
    return out


def plot(results: list[dict[str, Any]], path: Path, lim: float = 4.0) -> None:
    """The trajectories over the contour plot of Ackley: a row per scale factor, a column per rule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.linspace(-lim, lim, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    zz = ackley(torch.stack([xx, yy], -1)).numpy()
    scales = list(dict.fromkeys(r["config"]["scale"] for r in results))
    rules = list(dict.fromkeys(r["config"]["rule"] for r in results))
    fig, axes = plt.subplots(len(scales), len(rules), figsize=(4.0 * len(rules), 4.1 * len(scales)), squeeze=False)
    for res in results:
        ax = axes[scales.index(res["config"]["scale"])][rules.index(res["config"]["rule"])]
        ax.contourf(xx.numpy(), yy.numpy(), zz, levels=30, cmap="viridis", alpha=0.85)
        p = res["path"].numpy()
        T = res["config"]["update_interval"]
        ax.plot(p[:, 0], p[:, 1], "-", color="white", lw=1.1)
        ax.plot(p[:, 0], p[:, 1], ".", color="white", ms=2.5)
        if res["config"]["rule"] != FULL:
            ax.plot(p[:-1:T, 0], p[:-1:T, 1], "o", mfc="none", mec="orange", ms=6,
                    label=f"basis update (every {T} steps)")
        ax.plot(*p[0], "s", color="red", ms=6, label="start")
        ax.plot(*p[-1], "*", color="red", ms=12, label="end")
        ax.plot(0, 0, "+", color="black", ms=10, mew=2)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        name = "full space (no projection)" if res["config"]["rule"] == FULL else res["config"]["rule"]
        ax.set_title(f"{name}, SF {res['config']['scale']:g}: final distance {res['final_distance']:.3f}", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tuple2(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'x,y', got {text!r}") from None
    return x, y


def parser() -> argparse.ArgumentParser:
    d = AckleyConfig()
    ap = argparse.ArgumentParser(
        prog="grassopt ackley",
        description="The 2-D Ackley function optimised in a moving 1-D subspace (SubTrack++ paper, Figure 5): the "
                    "library's `track` and `svd` rules on the 2 x 1 gradient, Adam inside the subspace, scale "
                    "factors 1 and 3, an update every 10 steps over 100 steps. Writes ackley.png (trajectories over "
                    "the contour plot) and ackley.json (the final distances to the global minimum) to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rules", nargs="+", default=["track", "svd"], help="subspace rules to compare")
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0, 3.0], help="scale factors (alpha)")
    ap.add_argument("--start", type=_tuple2, default=d.start, metavar="X,Y", help="start point")
    ap.add_argument("--steps", type=int, default=d.steps, help="optimization steps")
    ap.add_argument("--update-interval", type=int, default=d.update_interval, help="steps between basis updates")
    ap.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate inside the subspace")
    ap.add_argument("--inner", default=d.inner, choices=["adam", "sgd"],
                    help="optimizer inside the subspace (sgd: w <- w - lr * scale * Q Q^T g)")
    ap.add_argument("--transport", default=d.transport, choices=list(TRANSPORTS),
                    help="moment transport at basis updates (keep: GaLore; rotate: projection-aware Adam)")
    ap.add_argument("--step-size", type=float, default=None,
                    help="eta of the track rule (default: the rule's own, 0.5 normalized)")
    ap.add_argument("--step-mode", default=None, choices=["normalized", "raw"], help="step mode of the track rule")
    ap.add_argument("--grid", action="store_true",
                    help="also run every configuration from 16 start points on a circle (see --grid-radius)")
    ap.add_argument("--grid-radius", type=float, default=3.0, help="radius of the circle of --grid start points")
    ap.add_argument("--out", default="runs/ackley", help="output folder")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.steps < 1 or args.update_interval < 1 or args.lr <= 0:
        print("grassopt ackley: error: --steps and --update-interval must be >= 1 and --lr > 0", file=sys.stderr)
        return 2
    options: dict[str, Any] = {}
    if args.step_size is not None:
        options["step_size"] = args.step_size
    if args.step_mode is not None:
        options["step_mode"] = args.step_mode
    base = AckleyConfig(start=args.start, steps=args.steps, update_interval=args.update_interval, lr=args.lr,
                        transport=args.transport, inner=args.inner, options=options)
    try:
        results = run_all(base, args.rules, args.scales)
    except ValueError as e:
        print(f"grassopt ackley: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "ackley.png")
    report: dict[str, Any] = {"setup": {**asdict(base), "start": list(base.start), "betas": list(base.betas)},
                              "runs": [{"label": r["label"], "final_distance": r["final_distance"],
                                        "final_value": r["final_value"], "min_distance": r["min_distance"],
                                        "update_angles_deg": r["update_angles_deg"],
                                        "path": r["path"].tolist()} for r in results]}
    print(f"start {tuple(base.start)}, {base.steps} steps, update every {base.update_interval}, {base.inner} "
          f"lr {base.lr:g}, transport {base.transport}, rule options {options or 'defaults'}")
    print("| run | final distance to (0, 0) | final f | closest approach |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['final_distance']:.4f} | {r['final_value']:.4f} | {r['min_distance']:.4f} |")
    if args.grid:
        rows = []
        starts = grid_starts(16, args.grid_radius)
        for s in args.scales:
            for rule in args.rules:
                dists = []
                for st in starts:
                    c = AckleyConfig(**{**asdict(base), "rule": rule, "scale": s, "start": st,
                                        "betas": tuple(base.betas),
                                        "options": options if rule != FULL and get_rule(rule).OPTIONS else {}})
                    dists.append(run(c)["final_distance"])
                rows.append({"label": f"{rule} SF{s:g}", "median_final_distance": statistics.median(dists),
                             "reached": sum(d < 0.5 for d in dists), "final_distances": dists})
        report["grid"] = {"radius": args.grid_radius, "starts": starts, "rows": rows}
        print(f"\n{len(starts)} starts on the circle of radius {args.grid_radius:g}:")
        print("| run | median final distance | runs ending within 0.5 of (0, 0) |")
        print("|---|---|---|")
        for row in rows:
            print(f"| {row['label']} | {row['median_final_distance']:.4f} | {row['reached']}/{len(starts)} |")
    (out / "ackley.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out / 'ackley.png'} and {out / 'ackley.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
