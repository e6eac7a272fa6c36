"""``grassopt bench``: several presets on the same model, data order and seeds, side by side.

Each run is a normal ``grassopt train`` run (its own folder under ``--out/runs``), all in this
one process, one after the other. The report (``report.md``, ``results.json``, loss against step
and against wall time as PNGs) sets every preset beside ``torch.optim.AdamW``. An optional
learning-rate sweep first picks each preset's best rate on a short horizon; an optional sweep of a
preset's ``plain_lr`` (the rate of what it does not project) then picks that at the chosen rate.
Finished runs are reused when the bench is started again with the same settings (``--no-reuse`` to
redo them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .. import registry
from ..references import MissingPackageError, reference_versions, require
from ..engine.cli import key_value
from ..train.cli import add_run_arguments, config_from_args
from ..train.loop import TrainConfig, config_differences, train
from .report import write_report

DEFAULT_PRESETS = ["adamw-torch", "galore", "fira", "subtrack++", "grasswalk", "grassjump"]
#: added to every bench (unless --no-refs) when installed: the reference packages of grassopt's own presets
REFERENCE_PRESETS = {"ref-galore": "galore_torch", "ref-apollo": "apollo_torch"}


def _preset_lr(text: str) -> tuple[str, float]:
    preset, _, lr = text.rpartition("=")
    try:
        return preset.strip(), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRESET=LR, got {text!r}") from None


_CONFIG_KEYS = {"rank", "update_interval", "lr", "weight_decay", "plain_lr", "plain_weight_decay", "clip", "clip_mode",
                "param_dtype", "bf16", "layerwise", "sketch", "sketch_rank", "lean_activations", "state_dtype",
                "stochastic_rounding", "checkpoint_activations"}


def parse_variant(text: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``NAME[:key=value,key=value]`` -> (preset, TrainConfig overrides, subspace options).

    Lets one bench compare ablations, e.g. ``subtrack++:transport=keep`` or
    ``subtrack++:recovery=False,update_interval=50``.
    """
    name, _, rest = text.partition(":")
    fields: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, value = key_value(item)
        (fields if key in _CONFIG_KEYS else options)[key] = value
    return name, fields, options


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "+-._" else "_" for c in label)


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one learning rate")
    return values


def _preset_pair(text: str) -> tuple[str, str]:
    preset, sep, other = text.rpartition("=")
    if not sep or not preset.strip() or not other.strip():
        raise argparse.ArgumentTypeError(f"expected PRESET=OTHER, got {text!r}")
    return preset.strip(), other.strip()


def _preset_lrs(text: str) -> tuple[str, list[float]]:
    preset, sep, lrs = text.rpartition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected PRESET=LR,LR,..., got {text!r}")
    return preset.strip(), _float_list(lrs)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="grassopt bench",
        description="Run several presets on the same model, data order and seed(s) and write a side-by-side "
                    "report (report.md, results.json, loss_vs_step.png, loss_vs_time.png) to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(ap, with_preset=False)
    g = ap.add_argument_group("benchmark")
    known = sorted(registry.KINDS)
    g.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, metavar="PRESET[:K=V,...]",
                   help=f"presets to compare, each optionally with overrides (e.g. subtrack++:transport=keep,"
                        f"recovery=False or galore:update_interval=50); known presets: {', '.join(known)}")
    g.add_argument("--no-refs", action="store_true",
                   help="do not add ref-galore / ref-apollo even when galore-torch / apollo-torch are installed")
    g.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (model init and data order)")
    g.add_argument("--lrs", nargs="+", type=_preset_lr, default=[], metavar="PRESET=LR",
                   help="learning rate per preset, overriding --lr (e.g. galore=0.01 adamw-torch=0.003)")
    g.add_argument("--sweep", type=_float_list, default=None, metavar="LRS",
                   help="learning rates to sweep first, e.g. '1e-3,3e-3,1e-2'; each preset then runs at its best")
    g.add_argument("--sweep-lrs", nargs="+", type=_preset_lrs, default=[], metavar="PRESET=LR,LR,...",
                   help="learning rates to sweep for one preset instead of --sweep (e.g. adamw-torch=1e-3,3e-3,1e-2)")
    g.add_argument("--sweep-plain-lrs", nargs="+", type=_preset_lrs, default=[], metavar="PRESET=LR,LR,...",
                   help="plain_lr values (the rate of the parameters PRESET does not project: embedding, head, norms, "
                        "biases) to sweep for PRESET at its fixed learning rate: the one --sweep/--sweep-lrs chose, "
                        "else --lrs or --lr; a coordinate sweep after the lr sweep, not a grid of both. Same steps, "
                        "seed and --widen as the lr sweep; PRESET then runs at its best plain_lr "
                        "(e.g. adamw-torch=1e-3,3e-3,1e-2)")
    g.add_argument("--lrs-from", nargs="+", type=_preset_pair, default=[], metavar="PRESET=OTHER",
                   help="use OTHER's learning rate (swept or given) for PRESET, and its swept plain_lr if it has "
                        "one, e.g. ref-galore=galore: the reference package of an algorithm at the rate chosen "
                        "for ours")
    g.add_argument("--widen", type=int, default=0, metavar="N",
                   help="while a preset's best sweep rate is at an edge of its grid, sweep one more rate beyond "
                        "that edge (the grid's own ratio between neighbours, else x3), at most N more per preset, "
                        "so that the rate chosen is an interior optimum (default: 0, the grid as given)")
    g.add_argument("--sweep-only", action="store_true",
                   help="stop after the sweep (its table in the report): several processes can sweep disjoint "
                        "presets into one --out, and a later invocation reuses their runs")
    g.add_argument("--sweep-seed", type=int, default=None,
                   help="seed of the sweep runs (default: the first of --seeds); give it when processes with "
                        "different --seeds share one sweep")
    g.add_argument("--sweep-model", default=None, help="model for the sweep (default: --model)")
    g.add_argument("--sweep-steps", type=int, default=None, help="steps of each sweep run (default: --steps / 4)")
    g.add_argument("--sweep-eval-tokens", type=int, default=None,
                   help="validation tokens each sweep run is scored on (default: --eval-tokens, i.e. all)")
    g.add_argument("--out", default="runs/bench", help="output folder")
    g.add_argument("--report-dir", default=None,
                   help="where report.md, results.json and the PNGs go (default: --out); runs stay under --out, so "
                        "several reports can share (and reuse) the same runs")
    g.add_argument("--no-reuse", action="store_true", help="rerun finished runs instead of reusing their results")
    g.add_argument("--title", default=None, help="title of the report")
    return ap


def _missing(preset: str) -> str | None:
    """Why ``preset`` cannot run here (its optional package is missing), or None."""
    try:
        require(preset)
    except MissingPackageError as e:
        return str(e)
    return None


def _available(preset: str) -> bool:
    return _missing(preset) is None


def _takes_options(name: str) -> bool:
    """Whether preset ``name`` takes options of its own (the --opt options shared by the bench's variants
    apply to those; a plain AdamW takes only eps)."""
    kind = registry.KINDS[name]
    return kind.family not in ("preset", "torch") or registry.PRESETS.get(name) is not None


def preflight(label: str, cfg: TrainConfig) -> None:
    """Check one run of the bench before any run starts: its config (:meth:`TrainConfig.validate`) and
    its optimizer's options, by building the optimizer over a small stand-in of the model (one block,
    on the CPU, matrices just wide enough that the rank projects where it would in the real model;
    the global random states are left as they were). Raises ``ValueError`` naming the variant."""
    import torch

    from ..train.loop import build_optimizer, sketch_model
    from ..train.model import Llama, config as model_config

    try:
        cfg.validate()
        real = model_config(cfg.model)
        rank = cfg.rank if isinstance(cfg.rank, int) else 0
        hidden = min(real.hidden_size, max(64, rank + 8))
        inter = max(hidden, real.intermediate_size * hidden // real.hidden_size)
        shape = model_config(cfg.model, vocab_size=min(cfg.vocab_size, 512), hidden_size=hidden,
                             intermediate_size=inter, num_heads=1, num_kv_heads=None, num_layers=1,
                             max_seq_len=cfg.seq_len)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a rank larger than some matrices: plain AdamW there
            model = Llama(shape)
            sketch_model(model, cfg)
            build_optimizer(model, cfg)
    except (ValueError, TypeError) as e:
        plain = "" if cfg.plain_lr is None else f", plain_lr={cfg.plain_lr!r}"
        raise ValueError(f"variant {label!r} (lr={cfg.lr!r}{plain}): {e}") from None


def _run(cfg: TrainConfig, reuse: bool, label: str) -> dict[str, Any]:
    """Train ``cfg`` unless a finished run with the same settings is already in ``cfg.out``."""
    out = Path(cfg.out)
    summary_path, config_path = out / "summary.json", out / "config.json"
    if reuse and summary_path.is_file() and config_path.is_file():
        saved = json.loads(config_path.read_text())
        same = not config_differences(saved, cfg, ignore=("progress", "threads", "plot", "overwrite"))
        summary = json.loads(summary_path.read_text())
        if same and summary.get("finished"):
            print(f"[bench] {label}: reusing the finished run in {out}", file=sys.stderr)
            return summary
    print(f"[bench] {label}", file=sys.stderr, flush=True)
    return train(dataclasses.replace(cfg, overwrite=True))  # not reusable: run it afresh


def _history(out: str) -> list[dict[str, Any]]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def widen(losses: dict[float, Any]) -> float | None:
    """The next rate to sweep when the best of ``losses`` ({lr: score}, lowest best; a score is a number
    or a tuple of numbers compared in order; None or non-finite = diverged) sits at an edge of the grid:
    one grid step beyond that edge (the ratio between the edge and its neighbour, or 3 for a single
    rate); None when the best is interior or nothing finished finite. The first of equal scores wins."""
    def finite(v):
        return v is not None and all(math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,)))

    done = sorted(lr for lr, v in losses.items() if finite(v))
    if not done:
        return None
    grid = sorted(losses)
    best = min(done, key=lambda lr: losses[lr])
    if len(grid) == 1:
        return best * 3
    if best == grid[0]:
        return grid[0] ** 2 / grid[1]
    if best == grid[-1]:
        return grid[-1] ** 2 / grid[-2]
    return None


def sweep(values: list[float], extra: int, score, label: str, what: str = "rate") -> float | None:
    """Score each of ``values`` (``score(v)``: a final eval loss, None or non-finite when diverged), widening
    the grid (:func:`widen`) at most ``extra`` times while the best sits at an edge; the best value, or
    None when nothing finished finite."""
    best, grid, losses = None, list(values), {}
    while grid:
        v = grid.pop(0)
        loss = score(v)
        losses[v] = loss
        if loss is not None and math.isfinite(loss) and (best is None or loss < best[1]):
            best = (v, loss)
        if not grid and extra > 0 and (nxt := widen(losses)) is not None:
            extra -= 1
            grid.append(float(f"{nxt:.3g}"))  # a widened value, to 3 digits (the given ones stay exact)
            print(f"[bench] {label}: best {what} {best[0]:g} at the edge of the sweep; widening to {grid[-1]:g}",
                  file=sys.stderr)
    return None if best is None else best[0]


def _command(argv: list[str] | None) -> str:
    return "grassopt bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    labels = list(dict.fromkeys(args.presets))
    known = set(registry.KINDS)
    try:
        variants = {label: parse_variant(label) for label in labels}
    except argparse.ArgumentTypeError as e:
        print(f"grassopt bench: error: {e}", file=sys.stderr)
        return 2
    for label, (name, _, _) in variants.items():
        if name not in known:
            print(f"grassopt bench: error: unknown preset {name!r}; choose from {sorted(known)}", file=sys.stderr)
            return 2
    if not args.no_refs:
        for p in REFERENCE_PRESETS:
            if p not in variants and _available(p):
                labels.append(p)
                variants[p] = (p, {}, {})
    missing = [label for label in labels if not _available(variants[label][0])]
    for label in missing:
        print(f"[bench] skipping {label}: {_missing(variants[label][0])}", file=sys.stderr)
    labels = [label for label in labels if label not in missing]
    out = Path(args.out)
    base = config_from_args(args, plot=True)

    def config_for(label: str, **kw: Any) -> TrainConfig:
        name, fields, options = variants[label]
        shared = base.options if _takes_options(name) else {k: v for k, v in base.options.items() if k == "eps"}
        c = dataclasses.replace(base, preset=name, options={**shared, **options}, **fields)
        return dataclasses.replace(c, **kw)

    sweep_lrs, sweep_plain = dict(args.sweep_lrs), dict(args.sweep_plain_lrs)
    unknown = sorted((set(sweep_lrs) | set(sweep_plain) | set(dict(args.lrs))
                      | {p for pair in args.lrs_from for p in pair}) - set(labels))
    if unknown:
        print(f"grassopt bench: error: --lrs/--sweep-lrs/--sweep-plain-lrs/--lrs-from name {unknown}, which are not "
              "among --presets", file=sys.stderr)
        return 2
    if args.sweep_only and not (args.sweep or sweep_lrs or sweep_plain):
        print("grassopt bench: error: --sweep-only needs rates to sweep: give --sweep, --sweep-lrs or "
              "--sweep-plain-lrs", file=sys.stderr)
        return 2
    lrs = {label: config_for(label).lr for label in labels}
    lrs.update(dict(args.lrs))
    plain_lrs = {label: config_for(label).plain_lr for label in labels}  # None: the same as lr
    # every run's settings are checked before the first one starts (not after the earlier runs took minutes)
    try:
        for label in labels:
            tried = {lrs[label], *sweep_lrs.get(label, args.sweep or [])}
            for lr in sorted(tried):
                preflight(label, config_for(label, lr=lr, out=str(out / "runs" / _slug(label))))
            for plain_lr in sweep_plain.get(label, []):
                preflight(label, config_for(label, lr=lrs[label], plain_lr=plain_lr,
                                            out=str(out / "runs" / _slug(label))))
    except (ValueError, TypeError, MissingPackageError) as e:
        print(f"grassopt bench: error: {e}", file=sys.stderr)
        return 2
    started = time.time()
    sweep_rows = []
    sweep_steps = args.sweep_steps or max(1, base.total_steps() // 4)
    sweep_seed = args.seeds[0] if args.sweep_seed is None else args.sweep_seed

    def sweep_run(label: str, lr: float, plain_lr: float | None, folder: str) -> float | None:
        c = config_for(label, lr=lr, plain_lr=plain_lr, seed=sweep_seed, model=args.sweep_model or base.model,
                       tokens=None, steps=sweep_steps, eval_every=sweep_steps, plot=False,
                       eval_tokens=args.sweep_eval_tokens or base.eval_tokens, out=str(out / "sweep" / folder))
        shown = "" if plain_lr is None else f" plain_lr={plain_lr:g}"
        loss = _run(c, not args.no_reuse, f"sweep {label} lr={lr:g}{shown}")["final_eval_loss"]
        sweep_rows.append({"preset": label, "lr": lr, "plain_lr": plain_lr, "final_eval_loss": loss})
        return loss

    for label in labels:
        grid = sweep_lrs.get(label, args.sweep or [])
        if grid:
            best = sweep(grid, args.widen,
                         lambda lr: sweep_run(label, lr, plain_lrs[label], f"{_slug(label)}-lr{lr:g}"), label)
            if best is not None and label not in dict(args.lrs):
                lrs[label] = best
        if label in sweep_plain:  # at the rate just chosen (or given)
            lr = lrs[label]
            best = sweep(sweep_plain[label], args.widen,
                         lambda p: sweep_run(label, lr, p, f"{_slug(label)}-lr{lr:g}-plain{p:g}"), label, "plain_lr")
            if best is not None:
                plain_lrs[label] = best
    for label, other in args.lrs_from:
        lrs[label] = lrs[other]
        if other in sweep_plain:
            plain_lrs[label] = plain_lrs[other]

    def rates(label: str) -> str:
        return f"lr {lrs[label]:g}" + ("" if plain_lrs[label] is None else f", plain_lr {plain_lrs[label]:g}")

    if args.sweep_only:
        report_dir = Path(args.report_dir) if args.report_dir else out
        write_report(report_dir, [], sweep_rows, base, command=_command(argv), wall_time=time.time() - started,
                     title=args.title, versions=reference_versions(dict.fromkeys(variants[label][0] for label in labels)))
        for label in labels:
            print(f"{label}: {rates(label)}")
        return 0
    runs = []
    for label in labels:
        for seed in args.seeds:
            c = config_for(label, lr=lrs[label], plain_lr=plain_lrs[label], seed=seed,
                           out=str(out / "runs" / f"{_slug(label)}-s{seed}"))
            shown = "" if plain_lrs[label] is None else f" plain_lr={plain_lrs[label]:g}"
            s = _run(c, not args.no_reuse, f"{label} seed={seed} lr={lrs[label]:g}{shown}")
            runs.append({"preset": label, "seed": seed, "lr": lrs[label], "plain_lr": plain_lrs[label], "summary": s,
                         "history": _history(c.out)})
    cmd = _command(argv)
    report_dir = Path(args.report_dir) if args.report_dir else out
    versions = reference_versions(dict.fromkeys(variants[label][0] for label in labels))
    table = write_report(report_dir, runs, sweep_rows, base, command=cmd, wall_time=time.time() - started,
                         title=args.title, versions=versions)
    print(table)
    print("\npackages: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"\nreport: {report_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
