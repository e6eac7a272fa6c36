"""Optimizer step time and state bytes on the projected matrices of the LLaMA-60M protocol model.

8 blocks of q, k, v, o (512 x 512), gate and up (1376 x 512), down (512 x 1376); fp32; rank 128;
basis updates every T = 200 steps; 400 steps. Every optimizer runs in this one process on its own
copy of the weights, and the optimizers take turns step by step (round robin), so a slow phase of
the shared machine hits them all alike; ratios are computed within this run.

    python benchmarks/step_time.py [--steps 400] [--interval 200] [--rank 128] [--out benchmarks]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import grassopt
from grassopt.presets import DEFAULT_RANKS, resolve_rank

SHAPES = [(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]
BLOCKS = 8


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.02 * torch.randn(s, generator=g)) for _ in range(BLOCKS) for s in SHAPES]


def make_grads(n_sets: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """A few gradient sets cycled over the steps (drawing 25M normals per step would dominate)."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        sets.append([torch.randn(s, generator=g) + 3 * torch.outer(torch.randn(s[0], generator=g),
                                                                  torch.randn(s[1], generator=g))
                     for _ in range(BLOCKS) for s in SHAPES])
    return sets


def contestants(rank: int, interval: int, lr: float = 1e-3):
    """(label, factory) pairs; each factory takes a parameter list and returns an optimizer.

    Presets with a default rank of their own use it (``apollo``: ``d/4``, which is 128 on these
    matrices; ``apollo-mini``: 1); ``ldadam`` updates its basis every step whatever ``interval``.
    ``ref-apollo`` is apollo-torch's APOLLO at the rank ``apollo`` uses.
    """
    out = [("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=lr))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW
        out.append(("galore-torch", lambda ps: GaLoreAdamW(
            [{"params": ps, "rank": rank, "update_proj_gap": interval, "scale": 0.25, "proj_type": "std"}], lr=lr)))
    except ImportError:
        print("galore-torch not installed: its row is skipped (pip install -e .[bench])", file=sys.stderr)

    def groups(ps, preset, settings):
        spec = DEFAULT_RANKS.get(preset, rank)
        by_rank = {}
        for p in ps:
            by_rank.setdefault(resolve_rank(spec, p.shape), []).append(p)
        return [{"params": q, "rank": r, "update_interval": interval, "alpha": 0.25, **settings}
                for r, q in by_rank.items()]

    for preset, settings in grassopt.PRESETS.items():
        if settings is None:
            out.append(("adamw", lambda ps: grassopt.SubspaceAdamW(ps, lr=lr)))
        else:
            out.append((preset, lambda ps, p=preset, s=settings: grassopt.SubspaceAdamW(groups(ps, p, s), lr=lr)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from apollo_torch import APOLLOAdamW

        def ref_apollo(ps):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return APOLLOAdamW([{**g, "proj": "random", "scale_type": "channel", "update_proj_gap": interval,
                                     "scale": 1, "proj_type": "std"}
                                    for g in ({"params": q["params"], "rank": q["rank"]}
                                              for q in groups(ps, "apollo", {}))], lr=lr)
        out.append(("ref-apollo", ref_apollo))
    except ImportError:
        print("apollo-torch not installed: its row is skipped (pip install apollo-torch==1.0.3)", file=sys.stderr)
    return out


def state_bytes(opt) -> int:
    """Bytes of tensors in the optimizer state (for galore-torch, its projector's basis too)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and torch.is_tensor(v.ortho_matrix):
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--interval", type=int, default=200)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--grad-sets", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    grads = make_grads(args.grad_sets)
    runs = []
    for label, factory in contestants(args.rank, args.interval):
        if args.only and label not in args.only:
            continue
        ps = make_params()
        runs.append({"label": label, "params": ps, "opt": factory(ps), "times": []})
    for step in range(args.steps):
        gs = grads[step % len(grads)]
        for run in runs:
            for p, g in zip(run["params"], gs):
                p.grad = g
            t0 = time.perf_counter()
            run["opt"].step()
            run["times"].append(time.perf_counter() - t0)
        if step % 50 == 0:
            print(f"step {step}/{args.steps}", file=sys.stderr, flush=True)
    rows = []
    by = {}
    for run in runs:
        t = run["times"]
        row = {"label": run["label"], "mean_ms": 1e3 * statistics.fmean(t), "median_ms": 1e3 * statistics.median(t),
               "update_steps_ms": 1e3 * statistics.fmean(t[i] for i in range(0, len(t), args.interval)),
               "state_bytes": state_bytes(run["opt"])}
        rows.append(row)
        by[row["label"]] = row
    write_report(rows, by, args)


def write_report(rows, by, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = by.get("galore-torch")
    adamw = by.get("torch.optim.AdamW")
    cmd = "python benchmarks/step_time.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Optimizer step time on the LLaMA-60M projected matrices",
        "",
        f"56 matrices (8 blocks of q, k, v, o 512x512; gate, up 1376x512; down 512x1376), fp32, rank {args.rank}, "
        f"basis updates every {args.interval} steps, {args.steps} steps, all optimizers in one process taking turns "
        f"step by step; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        "| optimizer | mean step (ms) | median step (ms) | mean at basis updates (ms) | state (MB) | step / galore-torch | state / AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rt = f"{r['mean_ms'] / ref['mean_ms']:.2f}x" if ref else "n/a"
        rs = f"{r['state_bytes'] / adamw['state_bytes']:.3f}x" if adamw else "n/a"
        lines.append(f"| {r['label']} | {r['mean_ms']:.1f} | {r['median_ms']:.1f} | {r['update_steps_ms']:.0f} | "
                     f"{r['state_bytes'] / 2**20:.1f} | {rt} | {rs} |")
    (out / "step_time.md").write_text("\n".join(lines) + "\n")
    (out / "step_time.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [r["label"] for r in rows]
        ax.barh(labels, [r["mean_ms"] for r in rows], color="tab:blue", label="mean step")
        ax.barh(labels, [r["median_ms"] for r in rows], color="tab:orange", alpha=0.6, label="median step")
        ax.set_xlabel("ms per optimizer step")
        ax.invert_yaxis()
        ax.legend()
        ax.set_title(f"LLaMA-60M projected matrices, rank {args.rank}, T={args.interval}")
        fig.tight_layout()
        fig.savefig(out / "step_time.png", dpi=120)
    except ImportError:
        pass
    print("\n".join(lines))


if __name__ == "__main__":
    main()
