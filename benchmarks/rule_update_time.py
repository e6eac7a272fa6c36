"""Time of one basis update per subspace rule, as the optimizer performs it, at LLaMA-60M shapes.

A basis update in ``SubspaceAdamW`` is ``rule.update(Q, X, ctx)``, then ``reorthonormalize`` of the
result, then ``largest_angle(Q_old, Q_new)`` when the rule did not set ``ctx.angle``. This script
times the three together ("total") and the rule alone ("update"), interleaved round robin over the
configurations so that a change in the machine's load hits them all alike, and prints the medians.
It also times the linear-algebra pieces on their own (the SVD of a ``d x r`` tangent, QR, ...).

    PYTHONPATH=. python benchmarks/rule_update_time.py [--reps 15] [--rank 128] [--threads 1]

(``PYTHONPATH=.`` so that the checkout's ``grassopt`` is timed, not an installed one.) Configurations are
``rule[:option=value,...]``; ``update_rank=full`` is the full-tangent step (passed as the integer rank
to code older than ``update_rank="full"``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import grassopt
from grassopt import linalg
from grassopt.rules import RuleContext, get_rule

#: LLaMA-60M's projected matrices (hidden 512, MLP 1376): attention 512x512, up/gate 1376x512, down 512x1376
SHAPES = [(512, 512), (1376, 512), (512, 1376)]
CONFIGS = ["svd", "rsvd", "power", "track", "track:update_rank=full", "walk:update_rank=1",
           "walk:update_rank=full", "jump"]


def parse(spec: str, rank: int):
    name, _, rest = spec.partition(":")
    opts = {}
    full = "full" if hasattr(linalg, "resolve_update_rank") else rank
    for item in filter(None, rest.split(",")):
        k, v = item.split("=")
        opts[k] = full if v == "full" and k == "update_rank" else int(v) if v.isdigit() else v
    return name, opts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = args.rank
    print(f"grassopt from {grassopt.__file__}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), rank {r}, {args.reps} reps, median ms")

    for m, n in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = linalg.orient(torch.randn(m, n, generator=g))
        transposed = linalg.is_transposed((m, n))
        d = x.shape[0]
        q0 = linalg.svd_basis(x, r, transposed)
        cases = []
        for spec in args.configs:
            name, opts = parse(spec, r)
            cases.append((spec, get_rule(name), opts))
        times = {spec: ([], []) for spec, _, _ in cases}
        pieces = {
            "svd(d x r)": lambda h=torch.randn(d, r, generator=g): torch.linalg.svd(h, full_matrices=False),
            "svd(d x k) (GaLore)": lambda: torch.linalg.svd(x, full_matrices=False),
            "qr(d x r)": lambda z=torch.randn(d, r, generator=g): torch.linalg.qr(z),
            "largest_angle": lambda q1=linalg.haar(d, r, g, "cpu"): linalg.largest_angle(q0, q1),
            "reorthonormalize (no-op)": lambda: linalg.reorthonormalize(q0),
        }
        ptimes = {k: [] for k in pieces}
        for rep in range(args.reps + 2):  # two warm-up rounds
            for spec, rule, opts in cases:
                ctx = RuleContext(rank=r, transposed=transposed, options=opts,
                                  generator=torch.Generator().manual_seed(rep))
                ctx.projected = q0.mT @ x
                t0 = time.perf_counter()
                q_new = rule.update(q0, x, ctx)
                t1 = time.perf_counter()
                q_new = linalg.reorthonormalize(q_new)
                angle = ctx.angle if ctx.angle is not None else linalg.largest_angle(q0, q_new)
                float(angle)
                t2 = time.perf_counter()
                if rep >= 2:
                    times[spec][0].append(t1 - t0)
                    times[spec][1].append(t2 - t0)
            for k, f in pieces.items():
                t0 = time.perf_counter()
                f()
                if rep >= 2:
                    ptimes[k].append(time.perf_counter() - t0)
        print(f"\nW {m}x{n}: X is {d}x{x.shape[1]}, Q is {d}x{r}")
        print(f"  {'rule':28s} {'update':>9s} {'total':>9s}")
        for spec, (u, t) in times.items():
            print(f"  {spec:28s} {1e3 * statistics.median(u):9.2f} {1e3 * statistics.median(t):9.2f}")
        for k, v in ptimes.items():
            print(f"  [{k}] {1e3 * statistics.median(v):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
