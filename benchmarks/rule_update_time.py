"""Time of one basis update per subspace rule, as the optimizer performs it, at LLaMA-60M shapes.

A basis update in ``SubspaceAdamW`` is ``rule.update(Q, X, ctx)``, then ``reorthonormalize`` of the
result, then ``largest_angle(Q_old, Q_new)`` when the rule did not set ``ctx.angle``. This script
times the three together ("total") and the rule alone ("update") and prints the medians. With
``--baseline CHECKOUT`` it loads a second copy of ``grassopt/linalg.py`` and ``grassopt/rules/`` from
another checkout (e.g. a worktree of ``main``) and times both, interleaved call by call, so that a
change in the machine's load hits both alike; the ratio column is this checkout / baseline.

    PYTHONPATH=. python benchmarks/rule_update_time.py [--baseline ../main] [--reps 15] [--rank 128] [--clock cpu]

(``PYTHONPATH=.`` so that this checkout's ``grassopt`` is timed, not an installed one.) Configurations
are ``rule[:option=value,...]``; ``update_rank=full`` is the full-tangent step (passed as the integer
rank to code that predates ``update_rank="full"``).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import grassopt
from grassopt import linalg
from grassopt import rules as rules_mod

#: LLaMA-60M's projected matrices (hidden 512, MLP 1376): attention 512x512, up/gate 1376x512, down 512x1376
SHAPES = [(512, 512), (1376, 512), (512, 1376)]
CONFIGS = ["svd", "rsvd", "power", "track", "track:update_rank=full", "walk:update_rank=1",
           "walk:update_rank=full", "jump"]


def load_copy(checkout: str):
    """``(linalg, rules)`` of another checkout, imported as a separate package (``grassopt_baseline``)."""
    tmp = Path(tempfile.mkdtemp()) / "grassopt_baseline"
    tmp.mkdir()
    (tmp / "__init__.py").write_text("")
    shutil.copy(Path(checkout) / "grassopt" / "linalg.py", tmp / "linalg.py")
    shutil.copytree(Path(checkout) / "grassopt" / "rules", tmp / "rules")
    sys.path.insert(0, str(tmp.parent))
    return importlib.import_module("grassopt_baseline.linalg"), importlib.import_module("grassopt_baseline.rules")


def parse(spec: str, rank: int, la):
    name, _, rest = spec.partition(":")
    opts = {}
    full = "full" if hasattr(la, "resolve_update_rank") else rank
    for item in filter(None, rest.split(",")):
        k, v = item.split("=")
        opts[k] = full if v == "full" and k == "update_rank" else int(v) if v.isdigit() else v
    return name, opts


CLOCK = time.perf_counter


def one_update(la, rm, name, opts, q0, x, r, transposed, seed):
    """Seconds for ``(update, update + reorthonormalize + angle)``."""
    ctx = rm.RuleContext(rank=r, transposed=transposed, options=opts, generator=torch.Generator().manual_seed(seed))
    ctx.projected = q0.mT @ x
    rule = rm.get_rule(name)
    t0 = CLOCK()
    q_new = rule.update(q0, x, ctx)
    t1 = CLOCK()
    q_new = la.reorthonormalize(q_new)
    angle = ctx.angle if ctx.angle is not None else la.largest_angle(q0, q_new)
    float(angle)
    return t1 - t0, CLOCK() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--baseline", help="another checkout to compare with (interleaved)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (with one thread, insensitive to "
                         "other processes competing for the cores)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    r = args.rank
    impls = {"this": (linalg, rules_mod)}
    if args.baseline:
        impls["baseline"] = load_copy(args.baseline)
    print(f"grassopt from {Path(grassopt.__file__).parent}" + (f", baseline {args.baseline}" if args.baseline else ""))
    print(f"torch {torch.__version__}, {args.threads} thread(s), rank {r}, {args.reps} reps, median ms "
          f"of {'CPU' if args.clock == 'cpu' else 'wall'} time")

    for m, n in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = linalg.orient(torch.randn(m, n, generator=g))
        transposed = linalg.is_transposed((m, n))
        d = x.shape[0]
        q0 = linalg.svd_basis(x, r, transposed)
        q1 = linalg.haar(d, r, g, "cpu")
        times = {(spec, k): ([], []) for spec in args.configs for k in impls}
        pieces = {("largest_angle", k): [] for k in impls}
        for rep in range(args.reps + 2):  # two warm-up rounds
            for spec in args.configs:
                for k, (la, rm) in impls.items():
                    name, opts = parse(spec, r, la)
                    u, t = one_update(la, rm, name, opts, q0, x, r, transposed, rep)
                    if rep >= 2:
                        times[spec, k][0].append(u)
                        times[spec, k][1].append(t)
            for k, (la, _) in impls.items():
                t0 = CLOCK()
                la.largest_angle(q0, q1)
                if rep >= 2:
                    pieces["largest_angle", k].append(CLOCK() - t0)
        med = lambda v: 1e3 * statistics.median(v)  # noqa: E731
        print(f"\nW {m}x{n}: X is {d}x{x.shape[1]}, Q is {d}x{r}")
        head = f"  {'rule':24s} {'update':>8s} {'total':>8s}"
        if args.baseline:
            head += f" | {'base upd':>8s} {'base tot':>8s} | {'total ratio':>11s}"
        print(head)
        for spec in args.configs:
            u, t = times[spec, "this"]
            line = f"  {spec:24s} {med(u):8.2f} {med(t):8.2f}"
            if args.baseline:
                bu, bt = times[spec, "baseline"]
                line += f" | {med(bu):8.2f} {med(bt):8.2f} | {med(t) / med(bt):11.2f}"
            print(line)
        line = f"  {'largest_angle (alone)':24s} {med(pieces['largest_angle', 'this']):8.2f}"
        if args.baseline:
            line += f" {'':8s} | {med(pieces['largest_angle', 'baseline']):8.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
