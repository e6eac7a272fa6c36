"""``grassopt analyze``: a training run with gradient-subspace diagnostics (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..train.cli import add_run_arguments, config_from_args
from .hook import SubspaceAnalyzer, SubspaceQuality, read_records
from .report import markdown, summarize, write_outputs


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="grassopt analyze",
        description="Train like `grassopt train` and record, every --every steps and for every projected matrix: "
                    "the share of gradient energy in its rank-r SVD subspace and in the optimizer's current basis, "
                    "the top singular values of the derivative of the subspace estimation error (grad F = -2 E A^T), "
                    "and the principal angles between successive bases. Writes analysis.jsonl, one PNG per "
                    "measurement (a panel per layer type, a line per depth) and analysis.md to --out, beside the "
                    "run's own metrics. With --quality, also the subspace quality: at every step, the share of the "
                    "gradient's energy captured by the optimizer's current basis, averaged over each interval "
                    "between two basis updates (the gradient that built the basis excluded), and the principal "
                    "angles of each update (--quality-only: that alone, cheap enough for long runs). With --replot, "
                    "only redraws the plots of an existing analysis.jsonl.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(ap)
    g = ap.add_argument_group("analysis")
    g.add_argument("--every", type=int, default=10, help="record every N steps (and at the last step)")
    g.add_argument("--analysis-rank", type=int, default=None,
                   help="rank r of the SVD subspace (default: each matrix's optimizer rank, or --rank for full-rank "
                        "optimizers)")
    g.add_argument("--top", type=int, default=20, help="singular values of grad F to keep")
    g.add_argument("--energy-ranks", type=int, nargs="*", default=[],
                   help="further ranks at which to record the SVD energy share")
    g.add_argument("--no-basis-angles", action="store_true", help="do not record the angles of basis updates")
    g.add_argument("--quality", action="store_true",
                   help="also record the subspace quality per basis interval (capture of the next gradients by the "
                        "optimizer's basis, measured at every step: one Q^T G product per matrix; needs a projecting "
                        "preset)")
    g.add_argument("--quality-only", action="store_true",
                   help="record only the subspace quality (no SVDs; --every, --analysis-rank, --top, --energy-ranks "
                        "and --no-basis-angles do not apply)")
    g.add_argument("--out", default="runs/analyze", help="output folder (the run and the analysis)")
    g.add_argument("--replot", action="store_true", help="do not train: redraw from --out/analysis.jsonl")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    if args.replot:
        path = out / "analysis.jsonl"
        if not path.is_file():
            print(f"grassopt analyze: error: no {path} to replot", file=sys.stderr)
            return 2
        records = read_records(path)
    else:
        try:
            hook: SubspaceQuality | SubspaceAnalyzer
            if args.quality_only:
                hook = SubspaceQuality(out=out, plot=False)
            else:
                hook = SubspaceAnalyzer(every=args.every, out=out, rank=args.analysis_rank, top=args.top,
                                        energy_ranks=args.energy_ranks, track_bases=not args.no_basis_angles,
                                        quality=args.quality, plot=False)
        except ValueError as e:
            print(f"grassopt analyze: error: {e}", file=sys.stderr)
            return 2
        cfg = config_from_args(args, out=str(out), overwrite=True)  # analyze has no --resume: always afresh
        from ..engine import CheckpointError
        from ..train.loop import train
        try:
            summary = train(cfg, hooks=[hook])
        except (CheckpointError, ValueError, FloatingPointError, FileNotFoundError) as e:
            print(f"grassopt analyze: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            from ..engine.cli import os_error
            print(f"grassopt analyze: error: {os_error(e)}", file=sys.stderr)
            return 2
        records = read_records(out / "analysis.jsonl")
        print(json.dumps({k: summary.get(k) for k in ("preset", "steps", "final_eval_loss", "tokens_per_s")}))
    written = write_outputs(records, out)
    print(markdown(summarize(records)))
    print(f"wrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
