"""``grassopt memory``: the memory a model config needs for a preset (weights, gradients, optimizer
states, saved activations), from formulas that agree exactly with the live optimizer.

    grassopt memory 7b --preset galore --rank 1024 --param-dtype bf16
    grassopt memory 7b --preset subtrack++ --rank 1024 --state-dtype int8 --param-dtype bf16 --layerwise \
        --checkpoint-activations --batch-size 1 --seq-len 2048        # LLaMA-7B on one 24 GiB GPU?
    grassopt memory 1b --preset adamw galore apollo apollo-mini ldadam --rank 512 --state-dtype bf16
    grassopt memory tiny --preset subtrack++ --rank 64 --per-layer
    grassopt memory path/to/config.json --preset apollo --activations estimator --sketch-rank 0.125 --json

The model is built on the ``meta`` device (nothing is allocated), so any size costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..engine.cli import rank_spec as _rank

__all__ = ["main", "build_parser"]


def _sketch_rank(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor a fraction") from None
        if not 0 < v < 1:
            raise argparse.ArgumentTypeError(f"{text}: a fractional sketch rank lies in (0, 1)") from None
        return v


def _budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB such as 24, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text}: the memory budget must be > 0 GiB")
    return v


def _fsdp_table(results: list, world_sizes: list[int], unit: str, owners: bool = True) -> int:
    """``grassopt memory --fsdp``: per preset and world size, the bytes on each rank, and whether they fit
    on devices of 24 and 80 GiB."""
    from .estimate import _human
    cols = ("weights", "gradients", "states", "activations", "transient", "total")
    first = results[0]
    print(f"{first.model}, FSDP2, weights {first.dtype}, states {first.state_dtype}, batch {first.batch_size} x "
          f"{first.seq_len} tokens per rank" + (", activation checkpointing" if first.checkpoint_activations else ""))
    print("bytes on the fullest rank; the projected matrices' state " + ("on each one's owner rank (grassopt train "
          "--fsdp)" if owners else "whole on every rank (--replicated)") + "; transient: what FSDP2 or the projected "
          "step gathers at the worst moment (an upper bound)")
    print()
    w = max(len(f"{r.preset} (rank {r.rank})") for r in results)
    print(f"{'preset':<{w}}  {'ranks':>5}  " + "  ".join(f"{c:>12}" for c in cols) + f"  {'24 GiB':>6}  {'80 GiB':>6}")
    try:
        for r in results:
            label = r.preset if r.rank is None else f"{r.preset} (rank {r.rank})"
            for n in world_sizes:
                t = r.per_rank(n, owners=owners)
                print(f"{label:<{w}}  {n:>5}  " + "  ".join(f"{_human(t[c], unit):>12}" for c in cols)
                      + "".join(f"  {'yes' if t['total'] <= g * 2**30 else 'no':>6}" for g in (24, 80)))
    except ValueError as e:
        print(f"grassopt memory: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..bases import BASIS_DTYPES
    from ..codecs import CODECS
    from .estimate import INT8_BLOCK, PARAM_DTYPES, STATE_DTYPES
    from ..presets import DEFAULT_RANK, DEFAULT_RANKS, PRESETS
    from .model import CONFIGS

    defaults = ", ".join(f"{p}: {r}" for p, r in DEFAULT_RANKS.items())
    ap = argparse.ArgumentParser(
        prog="grassopt memory", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Optimizer states: SubspaceAdamW keeps them in float32 by default whatever the weights' dtype; "
               "--state-dtype int8 counts its 8-bit Adam moments; --state-dtype bf16 reproduces the convention "
               "of papers' 'BF16' tables. Saved activations: an exact count for grassopt's LLaMA with a fused "
               "attention kernel (no T x T matrix). Not counted anywhere: the CUDA context, the allocator's "
               "caches and fragmentation, and the temporaries of the optimizer step.")
    ap.add_argument("model", help=f"a config name ({', '.join(CONFIGS)}) or a Hugging Face-style config.json")
    ap.add_argument("--preset", nargs="+", default=["adamw"], choices=sorted(PRESETS), metavar="PRESET",
                    help=f"one or more presets ({', '.join(PRESETS)}); several give a comparison table "
                         "(default: adamw)")
    ap.add_argument("--rank", type=_rank, default=None,
                    help=f"rank of the projected matrices: an integer or 'd/N' (a fraction of each matrix's "
                         f"short side); default: the preset's ({defaults}; otherwise {DEFAULT_RANK})")
    ap.add_argument("--targets", nargs="+", default=["all-linear"],
                    help="projected (and sketched) linear layers: 'all-linear' or module-name patterns")
    ap.add_argument("--param-dtype", "--dtype", dest="dtype", default="fp32", choices=sorted(PARAM_DTYPES),
                    help="dtype of the weights, and so of the gradients and activations (bf16: 2 bytes each); "
                         "int8: the targeted linear layers' weights as int8 codes plus a float32 scale per 256 "
                         "(grassopt train --param-dtype int8), the rest bf16; --dtype is the same option "
                         "(default fp32)")
    ap.add_argument("--state-dtype", default="fp32", choices=sorted(STATE_DTYPES),
                    help="optimizer-state dtype: fp32 (default; what SubspaceAdamW allocates by default), int8 "
                         f"(SubspaceAdamW's 8-bit Adam moments: n one-byte codes plus one float32 scale per "
                         f"{INT8_BLOCK} elements per moment tensor; the basis Q and the other state stay float32), "
                         "any other moment codec of grassopt.codecs.CODECS as it lays its moments out, "
                         "or bf16/fp16 (every state element in 2 bytes, the papers' convention)")
    ap.add_argument("--plain-state-dtype", default=None, choices=sorted(CODECS),
                    help="moment format of the plain parameters (embedding, head, norms, biases) in place of "
                         "--state-dtype (default: the same), e.g. factored beside int8 subspace moments")
    ap.add_argument("--basis-dtype", default="float32", choices=list(BASIS_DTYPES),
                    help="how the projected presets store their bases Q (the group option basis_dtype, "
                         "grassopt.bases): float32 (default), bfloat16, or int8 or int4 with a float32 scale per "
                         "column")
    ap.add_argument("--layerwise", action="store_true",
                    help="layer-wise updates (grassopt train --layerwise): each gradient is stepped and freed as "
                         "soon as it is complete, so only the largest single gradient counts (one micro-batch "
                         "per step)")
    ap.add_argument("--checkpoint-activations", action="store_true",
                    help="activation checkpointing per block (grassopt train --checkpoint-activations): each "
                         "block keeps only its input (hidden x tokens), plus one block's activations "
                         "recomputed during backward, plus the head (final norm, logits, loss)")
    ap.add_argument("--budget", type=_budget, default=24.0, metavar="GIB",
                    help="say whether the total fits in this many GiB (default 24, one 24 GiB GPU)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="sequences per micro-batch, for the saved activations (default 1)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="tokens per sequence, for the saved activations (default: the config's max_seq_len)")
    ap.add_argument("--vocab-size", type=int, default=None, help="override the config's vocabulary size")
    ap.add_argument("--activations", choices=["none", "estimator", "rso"], default="none",
                    help="activation-saving linear layers (grassopt.sketch): 'estimator' (unbiased low-rank "
                         "gradient estimator) or 'rso' (randomized subspace optimization); default none")
    ap.add_argument("--sketch-rank", type=_sketch_rank, default=0.125,
                    help="sketch rank of the activation-saving layers: an integer or a fraction of each "
                         "layer's in_features (default 0.125)")
    ap.add_argument("--fsdp", action="store_true",
                    help="the bytes on each rank of an FSDP2 run (grassopt train --fsdp): weights, gradients and the "
                         "plain state sharded, each projected matrix's state on its owner rank, plus what FSDP gathers")
    ap.add_argument("--world-size", type=int, nargs="+", default=[1, 2, 4, 8], metavar="N",
                    help="with --fsdp: the numbers of ranks to price (default 1 2 4 8)")
    ap.add_argument("--replicated", action="store_true",
                    help="with --fsdp: every rank holds and steps every projected matrix (FSDPSubspaceAdamW's "
                         "owners=False) instead of its owner alone")
    ap.add_argument("--per-layer", action="store_true", help="also print the breakdown per layer")
    ap.add_argument("--unit", default="auto", choices=["auto", "B", "KiB", "MiB", "GiB", "KB", "MB", "GB"],
                    help="unit of the human-readable columns (default: auto, binary units)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..presets import PRESETS
    from .estimate import NOT_COUNTED, _human, estimate

    args = build_parser().parse_args(argv)
    mode = None if args.activations == "none" else args.activations
    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 1):
        print("grassopt memory: --batch-size and --seq-len must be >= 1", file=sys.stderr)
        return 2
    results = []
    try:
        for preset in args.preset:
            results.append(estimate(args.model, preset, args.rank, args.dtype, batch_size=args.batch_size,
                                    seq_len=args.seq_len, mode=mode, sketch_rank=args.sketch_rank if mode else None,
                                    targets=args.targets, state_dtype=args.state_dtype, vocab_size=args.vocab_size,
                                    layerwise=args.layerwise, checkpoint_activations=args.checkpoint_activations,
                                    **({} if args.plain_state_dtype is None else
                                       {"plain_state_dtype": args.plain_state_dtype}),
                                    **({} if args.basis_dtype == "float32" or PRESETS[preset] is None
                                       else {"basis_dtype": args.basis_dtype})))
            if mode == "rso":  # RSO replaces the optimizer (inner Adam on B, AdamW elsewhere): one row
                if args.preset != ["adamw"]:
                    print("grassopt memory: --activations rso brings its own optimizer; --preset is ignored",
                          file=sys.stderr)
                break
    except ValueError as e:
        print(f"grassopt memory: {e}", file=sys.stderr)
        return 2
    budget = round(args.budget * 2**30)
    if args.fsdp:
        return _fsdp_table(results, args.world_size, args.unit, owners=not args.replicated)
    if args.json:
        out = [{**r.to_dict(per_layer=args.per_layer), "budget_bytes": budget,
                "fits": r.totals()["total"] <= budget} for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        return 0
    if len(results) == 1:
        print(results[0].table(per_layer=args.per_layer, unit=args.unit, budget=budget))
        return 0
    cols = ("weights", "gradients", "bases", "moments", "other", "states", "activations",
            *(("sketch_matrices",) if mode else ()), "total")
    first = results[0]
    print(f"{first.model}, weights {first.dtype}, states {first.state_dtype}, batch {first.batch_size} x "
          f"{first.seq_len} tokens" + (", layer-wise updates" if args.layerwise else "")
          + (", activation checkpointing" if args.checkpoint_activations else "")
          + (f", activations {mode} (sketch rank {args.sketch_rank})" if mode else ""))
    print()
    w = max(len(f"{r.preset} (rank {r.rank})") for r in results)
    fits = f"fits {args.budget:g} GiB"
    print(f"{'preset':<{w}}  " + "  ".join(f"{c:>12}" for c in cols) + f"  {fits:>12}")
    for r in results:
        t = r.totals()
        label = r.preset if r.rank is None else f"{r.preset} (rank {r.rank})"
        print(f"{label:<{w}}  " + "  ".join(f"{_human(t[c], args.unit):>12}" for c in cols)
              + f"  {'yes' if t['total'] <= budget else 'no':>12}")
    print()
    print(f"budget {_human(budget, args.unit)}; {NOT_COUNTED}")
    if args.per_layer:
        for r in results:
            print()
            print(r.table(per_layer=True, unit=args.unit))
    notes = sorted({n for r in results for n in r.notes})
    for n in notes[:10]:
        print(f"note: {n}")
    if len(notes) > 10:
        print(f"note: ... and {len(notes) - 10} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
