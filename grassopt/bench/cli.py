"""``grassopt bench``: several presets on the same model, data order and seeds, side by side.

Each run is a normal ``grassopt train`` run (its own folder under ``--out/runs``), all in this
one process, one after the other. The report (``report.md``, ``results.json``, loss against step
and against wall time as PNGs) sets every preset beside ``torch.optim.AdamW``. An optional
learning-rate sweep first picks each preset's best rate on a short horizon. Finished runs are
reused when the bench is started again with the same settings (``--no-reuse`` to redo them).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..presets import PRESETS
from ..train.cli import add_run_arguments, config_from_args
from ..train.loop import EXTRA_PRESETS, TrainConfig, train
from .report import write_report

DEFAULT_PRESETS = ["adamw-torch", "galore", "fira", "subtrack++", "grasswalk", "grassjump"]
REFERENCE_PRESETS = {"ref-galore": "galore_torch", "ref-apollo": "apollo_torch"}


def _preset_lr(text: str) -> tuple[str, float]:
    preset, _, lr = text.partition("=")
    try:
        return preset.strip(), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRESET=LR, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="grassopt bench",
        description="Run several presets on the same model, data order and seed(s) and write a side-by-side "
                    "report (report.md, results.json, loss_vs_step.png, loss_vs_time.png) to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(ap, with_preset=False)
    g = ap.add_argument_group("benchmark")
    known = sorted(set(PRESETS) | set(EXTRA_PRESETS))
    g.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, metavar="PRESET",
                   help=f"presets to compare; known: {', '.join(known)}")
    g.add_argument("--no-refs", action="store_true",
                   help="do not add ref-galore / ref-apollo even when galore-torch / apollo-torch are installed")
    g.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (model init and data order)")
    g.add_argument("--lrs", nargs="+", type=_preset_lr, default=[], metavar="PRESET=LR",
                   help="learning rate per preset, overriding --lr (e.g. galore=0.01 adamw-torch=0.003)")
    g.add_argument("--sweep", type=_float_list, default=None, metavar="LRS",
                   help="learning rates to sweep first, e.g. '1e-3,3e-3,1e-2'; each preset then runs at its best")
    g.add_argument("--sweep-model", default=None, help="model for the sweep (default: --model)")
    g.add_argument("--sweep-steps", type=int, default=None, help="steps of each sweep run (default: --steps / 4)")
    g.add_argument("--out", default="runs/bench", help="output folder")
    g.add_argument("--no-reuse", action="store_true", help="rerun finished runs instead of reusing their results")
    g.add_argument("--title", default=None, help="title of the report")
    return ap


def _available(preset: str) -> bool:
    mod = REFERENCE_PRESETS.get(preset)
    return mod is None or importlib.util.find_spec(mod) is not None


def _run(cfg: TrainConfig, reuse: bool, label: str) -> dict[str, Any]:
    """Train ``cfg`` unless a finished run with the same settings is already in ``cfg.out``."""
    out = Path(cfg.out)
    summary_path, config_path = out / "summary.json", out / "config.json"
    if reuse and summary_path.is_file() and config_path.is_file():
        saved = json.loads(config_path.read_text())
        mine = cfg.to_dict()
        same = all(saved.get(k) == v for k, v in mine.items() if k not in ("progress", "threads", "plot"))
        summary = json.loads(summary_path.read_text())
        if same and summary.get("finished"):
            print(f"[bench] {label}: reusing the finished run in {out}", file=sys.stderr)
            return summary
    print(f"[bench] {label}", file=sys.stderr, flush=True)
    return train(cfg)


def _history(out: str) -> list[dict[str, Any]]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    presets = list(dict.fromkeys(args.presets))
    known = set(PRESETS) | set(EXTRA_PRESETS)
    for p in presets:
        if p not in known:
            print(f"grassopt bench: error: unknown preset {p!r}; choose from {sorted(known)}", file=sys.stderr)
            return 2
    if not args.no_refs:
        presets += [p for p in REFERENCE_PRESETS if p not in presets and _available(p)]
    missing = [p for p in presets if not _available(p)]
    if missing:
        print(f"[bench] skipping {missing}: install the reference packages with pip install grassopt[bench]",
              file=sys.stderr)
        presets = [p for p in presets if p not in missing]
    out = Path(args.out)
    base = config_from_args(args, plot=True)
    lrs = {p: base.lr for p in presets}
    lrs.update(dict(args.lrs))
    started = time.time()
    sweep_rows = []
    if args.sweep:
        sweep_steps = args.sweep_steps or max(1, base.total_steps() // 4)
        for p in presets:
            best = None
            for lr in args.sweep:
                c = dataclasses.replace(base, preset=p, lr=lr, seed=args.seeds[0], model=args.sweep_model or base.model,
                                        tokens=None, steps=sweep_steps, eval_every=sweep_steps, plot=False,
                                        out=str(out / "sweep" / f"{p}-lr{lr:g}"))
                s = _run(c, not args.no_reuse, f"sweep {p} lr={lr:g}")
                loss = s["final_eval_loss"]
                sweep_rows.append({"preset": p, "lr": lr, "final_eval_loss": loss})
                if loss is not None and math.isfinite(loss) and (best is None or loss < best[1]):
                    best = (lr, loss)
            if best is not None and p not in dict(args.lrs):
                lrs[p] = best[0]
    runs = []
    for p in presets:
        for seed in args.seeds:
            c = dataclasses.replace(base, preset=p, lr=lrs[p], seed=seed, out=str(out / "runs" / f"{p}-s{seed}"))
            s = _run(c, not args.no_reuse, f"{p} seed={seed} lr={lrs[p]:g}")
            runs.append({"preset": p, "seed": seed, "lr": lrs[p], "summary": s, "history": _history(c.out)})
    cmd = "grassopt bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    table = write_report(out, runs, sweep_rows, base, command=cmd, wall_time=time.time() - started,
                         title=args.title)
    print(table)
    print(f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
