"""The contest: every method against an AdamW tuned as well as they are (benchmarks/contest.md).

Protocol (``tiny`` LLaMA on SOTU, 8 x 256 tokens a step, fp32, one thread per run, two runs at a time):

1. **The common parts, once for all.** Embedding, head, norms and biases (every parameter no method
   projects or orthogonalizes) train with AdamW (betas 0.9/0.999, eps 1e-6, no decay) at one rate,
   ``plain_lr``, for every method. That rate comes from a two-dimensional sweep of AdamW: the hidden
   matrices' rate x ``plain_lr``, each run a quarter of the horizon, widened until both are interior.
2. **The hidden matrices, per method.** Each method's own rate is swept at that fixed ``plain_lr``, runs
   of a quarter of the horizon, widened until the best rate is interior.
3. **The finals.** Every method at its rates for the whole horizon (``--steps``, 1,000 by default:
   2,048,000 tokens), basis updates every 40 steps (25 per run); seeds 0 and 1, and seed 2 for AdamW and
   the two best grassopt methods. The report pairs each method's final eval loss with AdamW's by seed.

Everything runs through ``grassopt bench`` (which reuses a finished run whose settings are identical), so
the command is resumable and can be run in parts: ``--stage 1``, ``--stage 2``, ``--stage 3``, or all.
Finished runs live under ``benchmarks/contest/runs`` (summaries, configs and metrics only; checkpoints are
deleted) and are committed, so a later session continues where this one stopped.

    bash benchmarks/contest.sh                 # everything (about 10 h of machine time: see contest.md)
    bash benchmarks/contest.sh --stage 1       # only the AdamW grid
    bash benchmarks/contest.sh --smoke         # the pipeline on a few steps of nano, into /tmp
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

#: The AdamW that every method's common parts get, and the contest's baseline (grassopt's plain AdamW
#: uses eps 1e-6; torch's AdamW is given the same so that the common parts train identically).
ADAMW = "adamw-torch:eps=1e-06"
#: name in the report -> (bench variant, hidden-rate grid). The references train their common parts
#: with torch's AdamW at eps 1e-6 too (``adamw_eps``; Adafactor on the hidden matrices only).
METHODS: dict[str, tuple[str, list[float]]] = {
    "subtrack++": ("subtrack++", [3e-3, 1e-2, 3e-2]),
    "grassjump": ("grassjump", [3e-3, 1e-2, 3e-2]),
    "galore": ("galore", [3e-3, 1e-2, 3e-2]),
    "fira": ("fira", [3e-3, 1e-2, 3e-2]),
    "grasswalk": ("grasswalk", [3e-3, 1e-2, 3e-2]),
    "subtrack++ int8": ("subtrack++:state_dtype=int8", [3e-3, 1e-2, 3e-2]),
    "apollo-mini": ("apollo-mini:rank=1", [1e-3, 3e-3, 1e-2]),
    "ref-adafactor": ("ref-adafactor:rest=adamw,adamw_eps=1e-06", [3e-2, 9e-2, 0.27]),
    "ref-muon": ("ref-muon:adamw_eps=1e-06", [3e-3, 1e-2, 3e-2]),
}
OURS = ("subtrack++", "grassjump", "galore", "fira", "grasswalk", "subtrack++ int8", "apollo-mini")
#: Stage 4, the memory frontier (benchmarks/frontier.md): the other points of the state-bytes axis, the peers
#: (each from its package or, SCALE, written from its paper) and grassopt's lean configurations (the plain
#: parameters' own moment format), swept like stage 2 at the same plain_lr; Adafactor and SCALE as their
#: papers (on every parameter: their own state for embedding and head).
FRONTIER: dict[str, tuple[str, list[float]]] = {
    "subtrack++ int8, plain factored": ("subtrack++:state_dtype=int8,plain_state_dtype=factored", [3e-3, 1e-2, 3e-2]),
    "subtrack++ factored, no M": ("subtrack++:state_dtype=factored-no-m,plain_state_dtype=factored-no-m,"
                                  "betas=(0.0,0.999)", [3e-3, 1e-2, 3e-2]),
    "grassjump int8": ("grassjump:state_dtype=int8", [3e-3, 1e-2, 3e-2]),
    "subtrack++ int4": ("subtrack++:state_dtype=int4", [3e-3, 1e-2, 3e-2]),
    "ref-adafactor (all)": ("ref-adafactor", [3e-2, 9e-2, 0.27]),
    "ref-scale": ("ref-scale", [1e-3, 3e-3, 1e-2]),
    "ref-scale (hidden)": ("ref-scale:rest=adamw,adamw_eps=1e-06", [1e-3, 3e-3, 1e-2]),
    "ref-normuon": ("ref-normuon:adamw_eps=1e-06", [3e-3, 1e-2, 3e-2]),
    "ref-racs": ("ref-racs:adamw_eps=1e-06", [1e-2, 3e-2, 1e-1]),
    "ref-alice": ("ref-alice", [3e-3, 1e-2, 3e-2]),
    "ref-galore-adafactor": ("ref-galore-adafactor", [3e-3, 1e-2, 3e-2]),
    "ref-adam-mini": ("ref-adam-mini:eps=1e-06", [1e-3, 2e-3, 4e-3]),
    "ref-adamw8bit": ("ref-adamw8bit:eps=1e-06", [1e-3, 2e-3, 4e-3]),
}
ADAMW_HIDDEN = [1e-3, 2e-3, 4e-3]
ADAMW_PLAIN = [1e-2, 3e-2, 1e-1]


def _bench(args: argparse.Namespace, extra: list[str], steps: int | None = None, eval_every: int | None = None) -> list[str]:
    """``grassopt bench`` at the contest's settings, runs of ``steps`` (default: a final's, ``args.steps``)
    evaluated every ``eval_every`` steps (default: half of them)."""
    steps = args.steps if steps is None else steps
    eval_every = steps // 2 if eval_every is None else eval_every
    common = ["--model", args.model, "--steps", str(steps), "--batch-size", "8", "--seq-len", "256",
              "--rank", "64", "--update-interval", str(args.update_interval), "--eval-every", str(eval_every),
              "--sweep-steps", str(args.steps // 4), "--threads", "1", "--no-refs", "--no-progress",
              "--widen", "2", "--sweep-seed", "0", "--out", str(args.out)]
    return ["grassopt", "bench", *common, *extra]


def _run_all(commands: list[tuple[str, list[str]]], jobs: int) -> None:
    """Run the bench invocations ``commands`` (name, argv), ``jobs`` at a time; each one's log goes to
    ``<out>/logs/<name>.log``. Fails (after the others finish) if any failed."""
    def one(item):
        name, cmd = item
        log = Path(cmd[cmd.index("--out") + 1]) / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t = time.time()
        with log.open("w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        print(f"[contest] {name}: {'ok' if rc == 0 else f'FAILED ({log})'} in {(time.time() - t) / 60:.1f} min",
              flush=True)
        prune(ROOT / log.parent.parent)
        return rc

    with ThreadPoolExecutor(jobs) as pool:
        failed = [n for (n, _), rc in zip(commands, pool.map(one, commands)) if rc]
    if failed:
        raise SystemExit(f"[contest] failed: {failed}")


def _sweep_rows(args: argparse.Namespace, name: str) -> list[dict]:
    path = Path(args.out) / "reports" / name / "results.json"
    return json.loads(path.read_text())["sweep"] if path.is_file() else []


def _best(rows: list[dict]) -> dict:
    done = [r for r in rows if r["final_eval_loss"] is not None and r["final_eval_loss"] == r["final_eval_loss"]]
    return min(done, key=lambda r: r["final_eval_loss"])


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "+-._" else "_" for c in text)


def stage1(args: argparse.Namespace) -> float:
    """The AdamW grid (hidden rate x plain_lr): its best plain_lr, widened until interior."""
    plains = list(ADAMW_PLAIN)
    for _ in range(3):
        cmds = [(f"1-adamw-plain{p:g}", _bench(args, [
            "--presets", f"{ADAMW},plain_lr={p:g}", "--sweep-lrs", f"{ADAMW},plain_lr={p:g}=" + ",".join(
                f"{x:g}" for x in ADAMW_HIDDEN), "--sweep-only", "--report-dir",
            str(Path(args.out) / "reports" / f"1-adamw-plain{p:g}")])) for p in plains]
        _run_all(cmds, args.jobs)
        best = {p: _best(_sweep_rows(args, f"1-adamw-plain{p:g}")) for p in plains}
        top = min(plains, key=lambda p: best[p]["final_eval_loss"])
        if top == plains[0]:
            plains.insert(0, plains[0] ** 2 / plains[1])
        elif top == plains[-1]:
            plains.append(plains[-1] ** 2 / plains[-2])
        else:
            break
    print(f"[contest] common parts: plain_lr {top:g} (AdamW's hidden rate there: {best[top]['lr']:g})", flush=True)
    (Path(args.out) / "common.json").write_text(json.dumps(
        {"plain_lr": top, "adamw_lr": best[top]["lr"], "grid": {f"{p:g}": _sweep_rows(args, f"1-adamw-plain{p:g}")
                                                              for p in plains}}, indent=1))
    return top


def _common(args: argparse.Namespace) -> dict:
    path = Path(args.out) / "common.json"
    if not path.is_file():
        raise SystemExit(f"[contest] {path} is missing: run --stage 1 first")
    return json.loads(path.read_text())


def stage2(args: argparse.Namespace) -> None:
    """Each method's hidden rate at the fixed plain_lr."""
    plain = _common(args)["plain_lr"]
    _run_all([_sweep(args, "2", name, variant, grid, plain)
              for name, (variant, grid) in METHODS.items() if name in args.methods], args.jobs)


def _sweep(args: argparse.Namespace, stage: str, name: str, variant: str, grid: list[float], plain: float):
    """The bench invocation that sweeps ``variant``'s hidden rate over ``grid`` at ``plain`` (report ``<stage>-<name>``)."""
    return (f"{stage}-{_slug(name)}", _bench(args, [
        "--presets", variant, "--plain-lr", f"{plain:g}", "--sweep-lrs", f"{variant}=" + ",".join(f"{x:g}" for x in grid),
        "--sweep-only", "--report-dir", str(Path(args.out) / "reports" / f"{stage}-{_slug(name)}")]))


def _rates(args: argparse.Namespace) -> dict[str, tuple[str, float]]:
    """name -> (variant, chosen rate) of every method whose sweep is done (AdamW's from the grid)."""
    common = _common(args)
    out = {"adamw": (ADAMW, common["adamw_lr"])}
    for name, (variant, _) in METHODS.items():
        rows = _sweep_rows(args, f"2-{_slug(name)}")
        if rows:
            out[name] = (variant, _best(rows)["lr"])
    return out


def _final(args, name, variant, lr, plain, seed):
    return (f"3-{_slug(name)}-s{seed}", _bench(args, [
        "--presets", variant, "--lrs", f"{variant}={lr:g}", "--plain-lr", f"{plain:g}", "--seeds", str(seed),
        "--report-dir", str(Path(args.out) / "reports" / f"3-{_slug(name)}-s{seed}")]))


def stage3(args: argparse.Namespace) -> None:
    """The finals: seeds 0 and 1 for every swept method, then seed 2 for AdamW and the two best of ours."""
    plain = _common(args)["plain_lr"]
    swept = _rates(args)
    rates = {n: r for n, r in swept.items() if n == "adamw" or n in args.methods}
    _run_all([_final(args, n, v, lr, plain, s) for s in (0, 1) for n, (v, lr) in rates.items()], args.jobs)
    finals = collect(Path(args.out))
    ours = sorted((n for n in finals if n in OURS and n in swept and len(finals[n]) >= 2),
                  key=lambda n: sum(finals[n].values()) / len(finals[n]))[:2]
    _run_all([_final(args, n, *swept[n], plain, 2) for n in ["adamw", *ours]], args.jobs)


def stage4(args: argparse.Namespace) -> None:
    """The frontier: each FRONTIER method's hidden rate swept as in stage 2 (seed 0, a quarter of a final),
    then, for AdamW, every contest method and every FRONTIER method, seed 1 at its chosen rate over the same
    horizon and evaluation steps (so that seed 0 is its sweep run at that rate, with the same settings)."""
    plain = _common(args)["plain_lr"]
    chosen = {n: v for n, v in FRONTIER.items() if n in args.frontier}
    _run_all([_sweep(args, "4", name, variant, grid, plain) for name, (variant, grid) in chosen.items()], args.jobs)
    rates = _rates(args)
    for name, (variant, _) in chosen.items():
        rows = _sweep_rows(args, f"4-{_slug(name)}")
        if rows:
            rates[name] = (variant, _best(rows)["lr"])
    quarter = args.steps // 4
    _run_all([(f"4s1-{_slug(name)}", _bench(args, [
        "--presets", variant, "--lrs", f"{variant}={lr:g}", "--plain-lr", f"{plain:g}", "--seeds", "1",
        "--report-dir", str(Path(args.out) / "reports" / f"4s1-{_slug(name)}")], steps=quarter, eval_every=quarter))
        for name, (variant, lr) in rates.items()], args.jobs)


def frontier_points(out: Path) -> dict[str, dict]:
    """{method: {"variant", "lr", "losses": {seed: final eval loss}, "state_bytes"}} of stage 4 (seed 0 from
    the sweeps of stages 1, 2 and 4 at the chosen rate, seed 1 from its own run)."""
    res: dict[str, dict] = {}
    names = {_slug(n): n for n in ["adamw", *METHODS, *FRONTIER]}
    for path in sorted((out / "reports").glob("4s1-*/results.json")):
        name = names.get(path.parent.name[4:], path.parent.name[4:])
        data = json.loads(path.read_text())
        for run in data["runs"]:
            s = run["summary"]
            if not s.get("finished"):
                continue
            cfg = json.loads((out / "runs" / f"{_slug(run['preset'])}-s{run['seed']}" / "config.json").read_text())
            seed0 = _seed0(out, cfg)
            res[name] = {"variant": run["preset"], "lr": s["lr"], "state_bytes": s["optimizer_state_bytes"],
                         "losses": {1: s["final_eval_loss"], **({0: seed0} if seed0 is not None else {})}}
    return res


def _seed0(out: Path, cfg: dict) -> float | None:
    """The final eval loss of the finished sweep run (seed 0) with ``cfg``'s settings but the seed."""
    for summary in (out / "sweep").glob("*/summary.json"):
        saved = json.loads((summary.parent / "config.json").read_text())
        keys = set(cfg) - {"seed", "out", "cache_dir", "progress", "threads", "plot", "overwrite"}  # (bench's reuse)
        if saved.get("seed") == 0 and all(saved.get(k) == cfg.get(k) for k in keys):
            s = json.loads(summary.read_text())
            return s["final_eval_loss"] if s.get("finished") else None
    return None


def collect(out: Path) -> dict[str, dict[int, float]]:
    """{method: {seed: final eval loss}} of the finished finals under ``out``."""
    res: dict[str, dict[int, float]] = {}
    names = {_slug(n): n for n in ["adamw", *METHODS]}
    for path in sorted((out / "reports").glob("3-*/results.json")):
        name, seed = path.parent.name[2:].rsplit("-s", 1)
        for run in json.loads(path.read_text())["runs"]:
            if run["summary"].get("finished"):
                res.setdefault(names.get(name, name), {})[int(seed)] = run["summary"]["final_eval_loss"]
    return res


def prune(out: Path) -> None:
    """Delete from every finished run (and report) what a later invocation does not need to reuse it
    (checkpoints, locks, plots): what stays is small enough to commit. Unfinished runs are left alone."""
    for folder in out.glob("*/*/"):
        summary = folder / "summary.json"
        if folder.parent.name != "reports" and not (summary.is_file() and json.loads(summary.read_text()).get("finished")):
            continue
        for pattern in ("*.pt", "*.pt.sha256", "*.safetensors", ".lock", "loss*.png", "report.md"):
            for p in folder.glob(pattern):
                p.unlink()
        for d in folder.glob("checkpoint*"):
            if d.is_dir():
                shutil.rmtree(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=(1, 2, 3, 4), action="append",
                    help="run only these stages (default: 1 to 3, then the report; 4 is the frontier's)")
    ap.add_argument("--frontier", nargs="+", default=list(FRONTIER), choices=list(FRONTIER),
                    help="the methods of stage 4 beside the contest's")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="the methods of stages 2 and 3 (AdamW always)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    ap.add_argument("--steps", type=int, default=1000, help="steps of a final (a sweep run: a quarter)")
    ap.add_argument("--update-interval", type=int, default=40)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", default=str(HERE / "contest"), help="where the runs and reports go")
    ap.add_argument("--smoke", action="store_true", help="nano, 8 steps, into /tmp/contest-smoke")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.steps, args.update_interval, args.out = "nano", 8, 2, "/tmp/contest-smoke"
    args.out = str(Path(args.out).resolve().relative_to(ROOT)) if Path(args.out).resolve().is_relative_to(ROOT) \
        else args.out
    stages = args.stage or [1, 2, 3]
    t = time.time()
    try:
        if 1 in stages:
            stage1(args)
        if 2 in stages:
            stage2(args)
        if 3 in stages:
            stage3(args)
        if 4 in stages:
            stage4(args)
    finally:
        prune(Path(ROOT / args.out))
        print(f"[contest] {(time.time() - t) / 60:.1f} min", flush=True)
    if not args.stage:
        from contest_report import main as report
        return report(["--out", args.out] + (["--dest", "/tmp/contest-smoke/contest.md"] if args.smoke else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
