"""Optimizer step time against its matrix-product floor, and the cost of one basis update at 1B/7B shapes.

Part 1 (the step). The 56 projected matrices of the LLaMA-60M protocol model (8 blocks of q, k, v, o
512 x 512, gate and up 1376 x 512, down 512 x 1376), fp32, rank 128. Every contestant runs in this
one process on its own copy of the weights, and they take turns step by step (round robin), so a
slow phase of the shared machine hits them all alike; ratios are computed within this run.

- ``floor``: what every projected step must do, two products per matrix with a fixed orthonormal
  ``Q``: ``R = Q^T X``, then the back-projection added into the weight with ``addmm_``;
- ``torch.optim.AdamW(fused=True)`` and ``torch.optim.AdamW(foreach=True)``: full-rank AdamW;
- ``galore-torch``'s ``GaLoreAdamW`` and ``apollo-torch``'s ``APOLLOAdamW`` (if installed);
- every grassopt preset (``adamw`` is the plain group on the same tensors);
- int8 moments: ``adamw`` and ``galore`` with ``state_dtype="int8"``, beside ``bitsandbytes``' and
  ``torchao``'s ``AdamW8bit`` (if installed);
- each grassopt row followed by the same optimizer with ``compile=True`` (``grassopt.optim._compiled``;
  ``--no-compile`` leaves them out). Its first step compiles the kernels: the report gives that warm-up
  (first step minus the eager row's first step) and the steps it takes to pay for itself.

Reported: the median at non-update steps, the mean at basis-update steps (the first step, which
builds the first basis, is left out), their ratios to the floor, and the state bytes (from
``grassopt.memory.state_bytes``, plus galore-torch's projector). Then ``torch.profiler`` tables of
where the time above the floor goes.

Part 2 (one basis update). At the LLaMA-1B (2048 x 5461) and LLaMA-7B (4096 x 11008) MLP shapes,
ranks 512 and 1024: the seconds of one ``update`` of each rule (``svd``, ``rsvd``, ``power``,
``track``, ``walk``, ``jump``), called as the optimizer calls it (plus its re-orthonormalisation),
the floor step at that shape, and the update interval ``T`` at which updates cost 5% of the
optimizer's time (``T = 20 * update / floor``).

    python benchmarks/step_time.py [--steps 300] [--interval 50] [--rank 128] [--no-shapes] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import grassopt
from grassopt.linalg import is_transposed, orient, reorthonormalize
from grassopt.presets import DEFAULT_RANKS
from grassopt.rules import RuleContext, get_rule
from grassopt.targets import resolve_rank
from grassopt.train.loop import optimizer_state_bytes

SHAPES = [(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]
BLOCKS = 8
BIG = {"1B": (5461, 2048), "7B": (11008, 4096)}  # nn.Linear weights (out, in) of the MLP up projection
BIG_RANKS = (512, 1024)
UPDATE_RULES = ("svd", "rsvd", "power", "track", "walk", "jump")
FUSED = "torch.optim.AdamW(fused=True)"
FOREACH = "torch.optim.AdamW(foreach=True)"


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


class Floor:
    """The two products of a projected step, with a fixed orthonormal basis per matrix."""

    def __init__(self, params: list[torch.Tensor], rank: int) -> None:
        g = torch.Generator().manual_seed(2)
        self.params = params
        self.qs = [torch.linalg.qr(torch.randn(min(p.shape), rank, generator=g))[0] for p in params]
        self.state: dict = {}

    @torch.no_grad()
    def step(self) -> None:
        for p, q in zip(self.params, self.qs):
            rt = orient(p.grad).mT @ q
            if is_transposed(p.shape):
                p.addmm_(rt, q.mT, alpha=-1e-3)
            else:
                p.addmm_(q, rt.mT, alpha=-1e-3)


def contestants(rank: int, interval: int, lr: float = 1e-3, compiled: bool = True):
    """(label, factory) pairs; each factory takes a parameter list and returns an optimizer. With
    ``compiled``, each grassopt row is followed by the same optimizer with ``compile=True``.

    Presets with a default rank of their own use it (``apollo``: ``d/4``, which is 128 on these
    matrices; ``apollo-mini``: 1); ``ldadam`` updates its basis every step whatever ``interval``.
    """
    out = [("floor", lambda ps: Floor(ps, rank)),
           (FUSED, lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True)),
           (FOREACH, lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True))]
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

    def ours(label, factory):  # grassopt's row, and its compiled row beside it (compile=True)
        out.append((label, factory))
        if compiled:
            out.append((f"{label}, compile=True", lambda ps: factory(ps, compile=True)))

    for preset, settings in grassopt.PRESETS.items():
        if settings is None:
            ours("adamw", lambda ps, **kw: grassopt.SubspaceAdamW(ps, lr=lr, **kw))
            # the same without the finite check (one read pass over the gradients)
            ours("adamw, check_finite=False", lambda ps, **kw: grassopt.SubspaceAdamW(ps, lr=lr, check_finite=False,
                                                                                      **kw))
        else:
            ours(preset, lambda ps, p=preset, s=settings, **kw: grassopt.SubspaceAdamW(groups(ps, p, s), lr=lr, **kw))
    # int8 moments (state_dtype="int8") beside the 8-bit AdamW of bitsandbytes and torchao
    ours("adamw, state_dtype=int8", lambda ps, **kw: grassopt.SubspaceAdamW(ps, lr=lr, state_dtype="int8", **kw))
    ours("galore, state_dtype=int8", lambda ps, **kw: grassopt.SubspaceAdamW(
        groups(ps, "galore", {**grassopt.PRESETS["galore"], "state_dtype": "int8"}), lr=lr, **kw))
    for label, module in (("bitsandbytes AdamW8bit", "bitsandbytes.optim"), ("torchao AdamW8bit", "torchao.optim")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls = __import__(module, fromlist=["AdamW8bit"]).AdamW8bit
            out.append((label, lambda ps, cls=cls: cls(ps, lr=lr)))
        except ImportError:
            print(f"{module.split('.')[0]} not installed: its row is skipped (pip install -e .[bench])",
                  file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from apollo_torch import APOLLOAdamW

        def ref_apollo(ps):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return APOLLOAdamW([{"params": q["params"], "rank": q["rank"], "proj": "random",
                                     "scale_type": "channel", "update_proj_gap": interval, "scale": 1,
                                     "proj_type": "std"} for q in groups(ps, "apollo", {})], lr=lr)
        out.append(("apollo-torch", ref_apollo))
    except ImportError:
        print("apollo-torch not installed: its row is skipped (pip install -e .[bench])", file=sys.stderr)
    return out


def run_steps(args, grads) -> tuple[list[dict], dict]:
    runs = []
    for label, factory in contestants(args.rank, args.interval, compiled=args.compile):
        if args.only and label not in args.only and label != "floor":
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
    for run in runs:
        t = run["times"]
        # ldadam updates its basis at every step: all its steps are update steps
        every = run["label"] == "ldadam"
        updates = list(range(1, len(t))) if every else list(range(args.interval, len(t), args.interval))
        plain = [t[i] for i in range(1, len(t)) if i not in set(updates)] or [t[i] for i in updates]
        rows.append({"label": run["label"], "first_s": t[0], "median_ms": 1e3 * statistics.median(plain),
                     "update_ms": 1e3 * statistics.fmean(t[i] for i in updates) if updates else None,
                     "state_bytes": optimizer_state_bytes(run["opt"]) if run["label"] != "floor" else 0})
    return rows, {r["label"]: r for r in runs}


def profile(run: dict, grads, steps: int = 6) -> list[tuple[str, float, int]]:
    """Self CPU ms per step of the top operators of ``run``'s optimizer at non-update steps."""
    from torch.profiler import ProfilerActivity, profile as prof

    opt, ps = run["opt"], run["params"]
    for q, g in zip(ps, grads[0]):  # the run ended on an update interval: take that update first
        q.grad = g
    opt.step()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for i in range(steps):
            for q, g in zip(ps, grads[i % len(grads)]):
                q.grad = g
            opt.step()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in p.key_averages()]
    return sorted(rows, key=lambda r: -r[1])[:12]


def basis_updates(repeats: int) -> list[dict]:
    """Seconds of one basis update per rule at the 1B and 7B shapes (median of ``repeats``)."""
    out = []
    for name, shape in BIG.items():
        g = torch.Generator().manual_seed(3)
        grad = torch.randn(shape, generator=g) + 3 * torch.outer(torch.randn(shape[0], generator=g),
                                                                 torch.randn(shape[1], generator=g))
        x = orient(grad)
        svd_s = None
        for rank in BIG_RANKS:
            q = torch.linalg.qr(torch.randn(x.shape[0], rank, generator=g))[0]
            w = torch.zeros(shape)
            floor = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                rt = x.mT @ q
                w.addmm_(rt, q.mT, alpha=-1e-3) if is_transposed(shape) else w.addmm_(q, rt.mT, alpha=-1e-3)
                floor.append(time.perf_counter() - t0)
            floor_s = statistics.median(floor)
            for rule_name in UPDATE_RULES:
                rule = get_rule(rule_name)
                if rule_name == "svd" and svd_s is not None:  # a full SVD whatever the rank: measured once
                    secs = svd_s
                else:
                    times = []
                    for i in range(1 if rule_name == "svd" else repeats):
                        ctx = RuleContext(rank=rank, transposed=is_transposed(shape), options=dict(rule.OPTIONS),
                                          generator=torch.Generator().manual_seed(i))
                        ctx.projected = q.mT @ x  # the optimizer passes Q^T X, which its step computes anyway
                        t0 = time.perf_counter()
                        new = rule.update(q, x, ctx)
                        reorthonormalize(new.contiguous())
                        times.append(time.perf_counter() - t0)
                    secs = statistics.median(times)
                    if rule_name == "svd":
                        svd_s = secs
                out.append({"model": name, "shape": list(shape), "rank": rank, "rule": rule_name, "seconds": secs,
                            "floor_seconds": floor_s})
                print(f"{name} r={rank} {rule_name}: {secs:.3f} s", file=sys.stderr, flush=True)
    return out


def compiled_lines(by: dict, floor: float, fused: float | None) -> list[str]:
    """The compiled rows against issue 29's targets, and each one's warm-up and payback."""
    c = ", compile=True"
    lines = ["", "Compiled (`compile=True`) targets (issue 29): "]
    checks = [(f"galore{c}", "floor", 1.05)] + [(f"{p}{c}", "floor", 1.15) for p in
                                                 ("subtrack++", "fira", "grasswalk", "grassjump")]
    checks += [(f"adamw, state_dtype=int8{c}", FUSED, 2.5), (f"galore, state_dtype=int8{c}", f"galore{c}", 1.2)]
    for label, base, target in checks:
        if label in by and base in by:
            ratio = by[label]["median_ms"] / by[base]["median_ms"]
            lines.append(f"- `{label}` / `{base}` = {ratio:.3f} (target <= {target}): "
                         f"{'met' if ratio <= target else 'missed'}")
    lines += ["", "| compiled row | warm-up (s): first step above the eager row's | ms saved per step | "
                  "steps to pay for the warm-up |", "|---|---:|---:|---:|"]
    for label, row in by.items():
        eager = by.get(label[:-len(c)]) if label.endswith(c) else None
        if eager is not None:
            warm, saved = row["first_s"] - eager["first_s"], eager["median_ms"] - row["median_ms"]
            pays = "0" if warm <= 0 else f"{1e3 * warm / saved:.0f}" if saved > 0 else "never"
            lines.append(f"| {label} | {warm:.1f} | {saved:.1f} | {pays} |")
    return lines


def write_report(rows, profiles, updates, args, out: Path) -> None:
    by = {r["label"]: r for r in rows}
    floor = by["floor"]["median_ms"]
    fused = by.get(FUSED, {}).get("median_ms")
    svd_update = by.get("galore", {}).get("update_ms")
    cmd = "python benchmarks/step_time.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    versions = f"torch {torch.__version__}"
    for pkg in ("galore_torch", "apollo_torch", "bitsandbytes", "torchao"):
        try:
            from importlib.metadata import version
            versions += f", {pkg.replace('_', '-')} {version(pkg.replace('_', '-'))}"
        except Exception:  # noqa: BLE001 - not installed
            pass
    lines = [
        "# Optimizer step time against its matrix-product floor",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, {versions}, Python "
        f"{platform.python_version()}.",
        "",
        "## The step on the LLaMA-60M projected matrices",
        "",
        f"56 matrices (8 blocks of q, k, v, o 512x512; gate, up 1376x512; down 512x1376), fp32, rank {args.rank}, "
        f"basis updates every {args.interval} steps, {args.steps} steps, every contestant in one process taking "
        "turns step by step on the same gradients. `floor`: the two products every projected step needs "
        "(`Q^T X`, then the back-projection added into the weight with `addmm_`). Medians over non-update steps; "
        "update steps are averaged separately (the first step, which builds the first basis, is left out). "
        f"The full-rank rows are `{FUSED}` and `{FOREACH}`; `adamw` is grassopt's plain group on the same tensors.",
        "",
        "| optimizer | median step (ms) | / floor | / AdamW fused | mean at update steps (ms) | update / galore's | state (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        upd = r["update_ms"]
        lines.append(
            f"| {r['label']} | {r['median_ms']:.1f} | {r['median_ms'] / floor:.2f}x | "
            f"{r['median_ms'] / fused:.2f}x | {'' if upd is None else f'{upd:.0f}'} | "
            f"{'' if upd is None or not svd_update or r['label'] in ('floor',) else f'{upd / svd_update:.2f}'} | "
            f"{r['state_bytes'] / 2**20:.1f} |")
    lines += ["", "Targets (medians, this run): "]
    checks = [("galore", "floor", 1.10), ("subtrack++", "floor", 1.15), ("fira", "floor", 1.15),
              ("grasswalk", "floor", 1.15), ("grassjump", "floor", 1.15), ("adamw", FUSED, 1.25),
              ("adamw, check_finite=False", FUSED, 1.25)]
    for label, base, target in checks:
        if label in by and base in by:
            ratio = by[label]["median_ms"] / by[base]["median_ms"]
            lines.append(f"- `{label}` / `{base}` = {ratio:.3f} (target <= {target}): "
                         f"{'met' if ratio <= target else 'missed'}")
    if svd_update:
        for label in ("subtrack++", "grasswalk", "grassjump"):
            if label in by and by[label]["update_ms"]:
                # the update's own cost: the update step minus a normal step of the same preset
                own = by[label]["update_ms"] - by[label]["median_ms"]
                svd_own = svd_update - by["galore"]["median_ms"]
                lines.append(f"- `{label}` basis update {own:.0f} ms above its normal step, `galore`'s (SVD) "
                             f"{svd_own:.0f} ms: ratio {own / svd_own:.3f} (target <= 0.2): "
                             f"{'met' if own <= 0.2 * svd_own else 'missed'}")
    lines += compiled_lines(by, floor, fused)
    for label, table in profiles.items():
        lines += ["", f"### Where `{label}`'s time goes (torch.profiler, self CPU ms per non-update step)", "",
                  "| operator | ms per step | calls per step |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {ms:.2f} | {n} |" for k, ms, n in table]
    if updates:
        lines += ["", "## One basis update at the LLaMA-1B and LLaMA-7B shapes", "",
                  "The up projection of the MLP (`nn.Linear` weight 5461 x 2048 for 1B, 11008 x 4096 for 7B), fp32; "
                  "one `update` of each rule as the optimizer calls it (given `Q^T X`, then the "
                  "re-orthonormalisation check). `svd` is a full thin SVD whatever the rank (measured once per shape). "
                  "`floor` is one projected step of that matrix (the two products); `T for 5%` is the update interval "
                  "at which the updates cost 5% of the optimizer's time on this matrix (`20 * update / floor`)."
                  + (f" These rows are reused from the run of {updates[0]['from']} (`--reuse-shapes`): they time "
                     "the rules' updates alone, which the step's code does not touch." if "from" in updates[0] else ""),
                  "",
                  "| model | rank | rule | one update (s) | / svd | floor step (s) | T for 5% |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        svd = {(u["model"], u["rank"]): u["seconds"] for u in updates if u["rule"] == "svd"}
        for u in updates:
            lines.append(f"| {u['model']} | {u['rank']} | {u['rule']} | {u['seconds']:.3f} | "
                         f"{u['seconds'] / svd[(u['model'], u['rank'])]:.3f} | {u['floor_seconds']:.3f} | "
                         f"{20 * u['seconds'] / u['floor_seconds']:.0f} |")
    analysis = out / "step_time.md"
    keep = ""
    if analysis.exists():
        text = analysis.read_text()
        if "<!-- analysis -->" in text:
            keep = text[text.index("<!-- analysis -->"):]
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.md").write_text("\n".join(lines) + "\n\n" + (keep or "<!-- analysis -->\n<!-- /analysis -->\n"))
    (out / "step_time.json").write_text(json.dumps({"args": vars(args), "rows": rows, "updates": updates,
                                                    "profiles": profiles}, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if updates else 1, figsize=(13 if updates else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    labels = [r["label"] for r in rows]
    ax.barh(labels, [r["median_ms"] / floor for r in rows], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("median step / floor (two products per matrix)")
    ax.invert_yaxis()
    ax.set_title(f"LLaMA-60M projected matrices, rank {args.rank}")
    if updates:
        ax = axes[0][1]
        for (model, rank) in sorted({(u["model"], u["rank"]) for u in updates}):
            us = [u for u in updates if u["model"] == model and u["rank"] == rank]
            ax.plot([u["rule"] for u in us], [u["seconds"] for u in us], "o-", label=f"{model}, r={rank}")
        ax.set_yscale("log")
        ax.set_ylabel("seconds per basis update")
        ax.legend()
        ax.set_title("One basis update at the 1B / 7B MLP shapes")
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=120)
    print("\n".join(lines))


def reused_shapes(out: Path) -> list[dict]:
    """The basis-update rows of the previous run in ``out``, each marked with that run's date."""
    path = out / "step_time.json"
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        raise SystemExit(f"step_time.py: --reuse-shapes needs a previous {path}; run without it once") from None
    updates = prev.get("updates") or []
    if not updates:
        raise SystemExit(f"step_time.py: {path} has no basis-update rows to reuse; run without --reuse-shapes")
    import subprocess  # the date of the commit that stored them (a clone's files all carry its checkout time)
    git = subprocess.run(["git", "log", "-1", "--format=%cs", "--", path.name], cwd=out, capture_output=True, text=True)
    when = git.stdout.strip() or time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime))
    return [{**u, "from": u.get("from", when)} for u in updates]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--interval", type=int, default=50)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--grad-sets", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="labels to run (default: all; the floor always runs)")
    ap.add_argument("--profile", nargs="*", default=["fira", "subtrack++", "adamw", "fira, compile=True",
                                                     "adamw, state_dtype=int8", "adamw, state_dtype=int8, compile=True"],
                    help="presets whose non-update steps are profiled")
    ap.add_argument("--no-shapes", action="store_true", help="skip the 1B/7B basis-update part")
    ap.add_argument("--reuse-shapes", action="store_true",
                    help="take the 1B/7B basis-update part from the previous step_time.json in --out (it times the "
                         "rules' updates alone, which the step's code does not touch), with the date of that run")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="no compile=True rows (by default each grassopt row is followed by its compiled row)")
    ap.add_argument("--shape-repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    grads = make_grads(args.grad_sets)
    rows, runs = run_steps(args, grads)
    profiles = {label: profile(runs[label], grads) for label in args.profile if label in runs}
    updates = [] if args.no_shapes else reused_shapes(Path(args.out)) if args.reuse_shapes \
        else basis_updates(args.shape_repeats)
    write_report(rows, profiles, updates, args, Path(args.out))


if __name__ == "__main__":
    main()
