"""``grassopt bench``: several presets on the same model, data order and seeds, side by side.

Each run is a normal ``grassopt train`` run (its own folder under ``--out/runs``), all in this
one process, one after the other. The report (``report.md``, ``results.json``, loss against step
and against wall time as PNGs) sets every preset beside ``torch.optim.AdamW``. An optional
learning-rate sweep first picks each preset's best rate on a short horizon; an optional sweep of a
preset's ``plain_lr`` (the rate of what it does not project) then picks that at the chosen rate.
Finished runs are reused when the bench is started again with the same settings (``--no-reuse`` to
redo them), and a run stopped with a checkpoint (Ctrl-C) is resumed from it; where the runs are (``out``,
``cache_dir``) does not count, so a bench folder moved or copied elsewhere keeps its runs.
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
from ..engine.cli import key_value, run_command
from ..engine.config import RunConfig
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


#: The bench's own flags, which set no field of a run's config, and why.
BENCH_FLAGS = {
    "presets": "names the runs: each one's preset (the config's preset) and its variant keys",
    "no_refs": "which runs: adds (or not) the reference packages of grassopt's presets",
    "seeds": "one run per seed (each run's config seed)",
    "lrs": "a learning rate per preset (each run's config lr)",
    "sweep": "learning rates to try first", "sweep_lrs": "learning rates to try first, per preset",
    "sweep_plain_lrs": "plain_lr values to try, per preset", "lrs_from": "one preset's rates for another",
    "widen": "how far a sweep may grow", "sweep_only": "stop after the sweep",
    "sweep_seed": "the sweep runs' seed", "sweep_model": "the sweep runs' model", "sweep_steps": "the sweep runs' steps",
    "sweep_eval_tokens": "the sweep runs' eval_tokens",
    "out": "the bench's folder (each run's out is a folder under it)",
    "report_dir": "where the report goes", "no_reuse": "rerun finished runs", "title": "the report's title",
}
#: Fields of a run's config the bench sets itself (no run flag of the bench), and why.
BENCH_FIELDS = {
    "preset": "a variant's NAME (--presets)",
    "out": "each run's folder under --out (runs/<variant>-s<seed>, sweep/...)",
    "resume": "a finished run is reused, a stopped one with the same settings resumed from its checkpoint, any other "
              "started afresh (--no-reuse: always afresh)",
    "overwrite": "as resume", "checkpoint_every": "each run checkpoints at its end only",
    "stop_after": "each run runs to its end", "plot": "each run writes its loss.png (the sweep's do not)",
    "profile_memory": "not measured by the bench", "subspace_quality": "not measured by the bench",
}
#: Fields that are not variant keys although they change the numbers, and why.
NOT_VARIANT_KEYS = {
    "preset": "the variant's NAME", "seed": "--seeds (every variant runs with every seed)",
    "options": "a variant's keys that are not config fields are its options",
    "betas": "ref-soap:betas=(...) stays the reference's own setting, as before --betas existed",
}
#: Run control (does not change the numbers) but still a variant key: memory and speed settings worth setting beside
#: each other (``subtrack++:compile=True`` beside ``subtrack++``).
RUN_CONTROL_VARIANT_KEYS = {"checkpoint_activations", "compile"}
def variant_keys(cls: type[RunConfig] = TrainConfig) -> frozenset[str]:
    """The keys a variant ``NAME:key=value`` sets as config fields (every other key is an option of the
    preset): every field of the config class ``cls`` that is not run control (but those of
    :data:`RUN_CONTROL_VARIANT_KEYS`) nor one of :data:`NOT_VARIANT_KEYS`. A new field is a variant key."""
    return frozenset(f.name for f in dataclasses.fields(cls)
                     if (f.name not in cls.RUN_CONTROL or f.name in RUN_CONTROL_VARIANT_KEYS)
                     and f.name not in NOT_VARIANT_KEYS)


_CONFIG_KEYS = variant_keys(TrainConfig)


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c in "([{") - (c in ")]}")
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def parse_variant(text: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``NAME[:key=value,key=value]`` -> (preset, TrainConfig overrides, subspace options).

    Lets one bench compare ablations, e.g. ``subtrack++:transport=keep`` or
    ``subtrack++:recovery=False,update_interval=50``; a value in brackets may hold commas
    (``betas=(0.0,0.999)``).
    """
    name, _, rest = text.partition(":")
    fields: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in _split_top(rest))):
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
    known = sorted(registry.ENTRIES)
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


def _shared_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options shared by the bench's variants (``--opt``) that preset ``name`` gets: all of them for a preset
    that takes options of its own; ``eps`` only for a plain AdamW; for a reference package of our presets
    (``ref-galore``, ``ref-apollo``), those it takes (its own variant keys are checked, not filtered)."""
    entry = registry.ENTRIES[name]
    if entry.family in ("subspace", "torch") and registry.PRESETS.get(name) is None:
        return {k: v for k, v in options.items() if k == "eps"}
    if entry.family == "reference" and entry.options is not None:
        return {k: v for k, v in options.items() if k in entry.options}
    return dict(options)


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


#: Fields that only say where things are (the run's folder, the token cache): a finished run is reused whatever
#: they were when it ran, so that a bench folder moved or copied (``cp -r runs/a runs/b``), or named by a relative
#: instead of an absolute --out, still reuses its runs. Safe for ``out``: the run checked is the one in ``cfg.out``.
LOCATION_FIELDS = ("out", "cache_dir")
#: Fields a reused run may differ in: the location fields and those that do not change its numbers or files.
REUSE_IGNORES = ("progress", "threads", "plot", "overwrite", "resume", "stop_after", *LOCATION_FIELDS)


def _run(cfg: TrainConfig, reuse: bool, label: str) -> dict[str, Any]:
    """Train ``cfg`` unless a finished run with the same settings (but :data:`REUSE_IGNORES`) is already in
    ``cfg.out``. A run with the same settings that was stopped before its end with a checkpoint (Ctrl-C:
    ``grassopt train`` writes one as it stops) is resumed from it, which gives the numbers of an
    uninterrupted run; anything else is run afresh."""
    out = Path(cfg.out)
    summary_path, config_path = out / "summary.json", out / "config.json"
    if reuse and config_path.is_file():
        saved = json.loads(config_path.read_text())
        same = not config_differences(saved, cfg, ignore=REUSE_IGNORES)
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        if same and summary.get("finished"):
            print(f"[bench] {label}: reusing the finished run in {out}", file=sys.stderr)
            return summary
        if same and (out / "checkpoint.pt").is_file():
            print(f"[bench] {label}: resuming the stopped run in {out}", file=sys.stderr, flush=True)
            return train(dataclasses.replace(cfg, resume=True, overwrite=False))
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
            print(f"[bench] {label}: best {what} {best[0]:g} at the edge of the sweep; widening to {grid[-1]:g}",  # type: ignore[index]
                  file=sys.stderr)  # (widen() gave a value: something finished finite, so best is set)
    return None if best is None else best[0]


def _command(argv: list[str] | None) -> str:
    return "grassopt bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


@dataclasses.dataclass
class _Plan:
    """What one bench runs: its variants (label -> (preset, config fields, options)), in order, their rates
    and the base config every run starts from."""

    args: argparse.Namespace
    labels: list[str]
    variants: dict[str, tuple[str, dict[str, Any], dict[str, Any]]]
    base: TrainConfig
    lrs: dict[str, float] = dataclasses.field(default_factory=dict)
    plain_lrs: dict[str, float | None] = dataclasses.field(default_factory=dict)
    sweep_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    def config(self, label: str, **kw: Any) -> TrainConfig:
        name, fields, options = self.variants[label]
        base = self.base
        c = dataclasses.replace(base, preset=name, options={**_shared_options(name, base.options), **options}, **fields)
        return dataclasses.replace(c, **kw)


def _variants(args: argparse.Namespace) -> tuple[list[str], dict[str, tuple[str, dict[str, Any], dict[str, Any]]]]:
    """The labels and variants to run (with the reference packages unless --no-refs; those whose package is
    missing skipped, with a line saying so). An unknown preset is a ``ValueError``."""
    labels = list(dict.fromkeys(args.presets))
    known = set(registry.ENTRIES)
    variants = {label: parse_variant(label) for label in labels}
    for name, _, _ in variants.values():
        if name not in known:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(known)}")
    if not args.no_refs:
        for p in REFERENCE_PRESETS:
            if p not in variants and _available(p):
                labels.append(p)
                variants[p] = (p, {}, {})
    missing = [label for label in labels if not _available(variants[label][0])]
    for label in missing:
        print(f"[bench] skipping {label}: {_missing(variants[label][0])}", file=sys.stderr)
    return [label for label in labels if label not in missing], variants


def _check(plan: _Plan) -> None:
    """Refuse (``ValueError``, one line) rates named for presets not in the bench, --sweep-only with nothing to
    sweep, and any run's settings (:func:`preflight`), before the first run starts (not after the earlier
    runs took minutes)."""
    args, labels = plan.args, plan.labels
    sweep_lrs, sweep_plain = dict(args.sweep_lrs), dict(args.sweep_plain_lrs)
    unknown = sorted((set(sweep_lrs) | set(sweep_plain) | set(dict(args.lrs))
                      | {p for pair in args.lrs_from for p in pair}) - set(labels))
    if unknown:
        raise ValueError(f"--lrs/--sweep-lrs/--sweep-plain-lrs/--lrs-from name {unknown}, which are not among "
                         "--presets")
    if args.sweep_only and not (args.sweep or sweep_lrs or sweep_plain):
        raise ValueError("--sweep-only needs rates to sweep: give --sweep, --sweep-lrs or --sweep-plain-lrs")
    plan.lrs = {label: plan.config(label).lr for label in labels}
    plan.lrs.update(dict(args.lrs))
    plan.plain_lrs = {label: plan.config(label).plain_lr for label in labels}  # None: the same as lr
    for label in labels:
        folder = str(plan.out / "runs" / _slug(label))
        for lr in sorted({plan.lrs[label], *sweep_lrs.get(label, args.sweep or [])}):
            preflight(label, plan.config(label, lr=lr, out=folder))
        for plain_lr in sweep_plain.get(label, []):
            preflight(label, plan.config(label, lr=plan.lrs[label], plain_lr=plain_lr, out=folder))


def _sweep_all(plan: _Plan) -> None:
    """The sweeps (--sweep, --sweep-lrs, then --sweep-plain-lrs), each preset then at its best rates; and
    --lrs-from."""
    args, base, out = plan.args, plan.base, plan.out
    sweep_lrs, sweep_plain = dict(args.sweep_lrs), dict(args.sweep_plain_lrs)
    steps = args.sweep_steps or max(1, base.total_steps() // 4)
    seed = args.seeds[0] if args.sweep_seed is None else args.sweep_seed

    def sweep_run(label: str, lr: float, plain_lr: float | None, folder: str) -> float | None:
        c = plan.config(label, lr=lr, plain_lr=plain_lr, seed=seed, model=args.sweep_model or base.model,
                        tokens=None, steps=steps, eval_every=steps, plot=False,
                        eval_tokens=args.sweep_eval_tokens or base.eval_tokens, out=str(out / "sweep" / folder))
        shown = "" if plain_lr is None else f" plain_lr={plain_lr:g}"
        loss = _run(c, not args.no_reuse, f"sweep {label} lr={lr:g}{shown}")["final_eval_loss"]
        plan.sweep_rows.append({"preset": label, "lr": lr, "plain_lr": plain_lr, "final_eval_loss": loss})
        return loss

    # (sweep() calls its score function before it returns: the lambdas below see this iteration's label and lr)
    for label in plan.labels:
        grid = sweep_lrs.get(label, args.sweep or [])
        if grid:
            best = sweep(grid, args.widen,
                         lambda lr: sweep_run(label, lr, plan.plain_lrs[label], f"{_slug(label)}-lr{lr:g}"),  # noqa: B023
                         label)
            if best is not None and label not in dict(args.lrs):
                plan.lrs[label] = best
        if label in sweep_plain:  # at the rate just chosen (or given)
            lr = plan.lrs[label]
            best = sweep(sweep_plain[label], args.widen,
                         lambda p: sweep_run(label, lr, p, f"{_slug(label)}-lr{lr:g}-plain{p:g}"),  # noqa: B023
                         label, "plain_lr")
            if best is not None:
                plan.plain_lrs[label] = best
    for label, other in args.lrs_from:
        plan.lrs[label] = plan.lrs[other]
        if other in sweep_plain:
            plan.plain_lrs[label] = plan.plain_lrs[other]


def _final_runs(plan: _Plan) -> list[dict[str, Any]]:
    """Every variant with every seed, at its rates."""
    runs = []
    for label in plan.labels:
        lr, plain_lr = plan.lrs[label], plan.plain_lrs[label]
        for seed in plan.args.seeds:
            c = plan.config(label, lr=lr, plain_lr=plain_lr, seed=seed,
                            out=str(plan.out / "runs" / f"{_slug(label)}-s{seed}"))
            shown = "" if plain_lr is None else f" plain_lr={plain_lr:g}"
            s = _run(c, not plan.args.no_reuse, f"{label} seed={seed} lr={lr:g}{shown}")
            runs.append({"preset": label, "seed": seed, "lr": lr, "plain_lr": plain_lr, "summary": s,
                         "history": _history(c.out)})
    return runs


def _bench(args: argparse.Namespace, argv: list[str] | None) -> int:
    labels, variants = _variants(args)
    plan = _Plan(args, labels, variants, config_from_args(args, plot=True))
    _check(plan)
    started = time.time()
    _sweep_all(plan)
    report_dir = Path(args.report_dir) if args.report_dir else plan.out
    versions = reference_versions(dict.fromkeys(variants[label][0] for label in labels))
    runs = [] if args.sweep_only else _final_runs(plan)
    table = write_report(report_dir, runs, plan.sweep_rows, plan.base, command=_command(argv),
                         wall_time=time.time() - started, title=args.title, versions=versions)
    if args.sweep_only:
        for label in labels:
            plain = plan.plain_lrs[label]
            print(f"{label}: lr {plan.lrs[label]:g}" + ("" if plain is None else f", plain_lr {plain:g}"))
        return 0
    print(table)
    print("\npackages: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"\nreport: {report_dir / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command("grassopt bench", lambda: _bench(args, argv))


if __name__ == "__main__":
    sys.exit(main())
