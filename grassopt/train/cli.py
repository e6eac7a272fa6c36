"""``grassopt train``: train a LLaMA-style model on real text with any preset (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..engine import CheckpointError, default_device
from ..engine.cli import add_output_arguments, key_value, os_error, output_settings, rank_spec
from .. import registry
from ..references import MissingPackageError
from .loop import TrainConfig, train
from .model import CONFIGS


def _rank_or_fraction(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or an integer >= 1, got {text!r}") from None
    return int(value) if value >= 1 and value.is_integer() else value


def add_run_arguments(ap: argparse.ArgumentParser, *, with_preset: bool = True) -> None:
    """The options shared by ``grassopt train`` and ``grassopt bench``."""
    d = TrainConfig()
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, choices=sorted(CONFIGS), help="model config (default: %(default)s)")
    g.add_argument("--corpus", default=None,
                   help="a folder of .txt files or a .jsonl with a 'text' field (default: the SOTU corpus)")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size (default: %(default)s)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per micro-batch on each process (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default: $GRASSOPT_CACHE or ~/.cache/grassopt)")
    g = ap.add_argument_group("optimizer")
    if with_preset:
        g.add_argument("--preset", default=d.preset, choices=sorted(registry.KINDS),
                       help="optimizer preset (default: %(default)s); adamw-torch is torch.optim.AdamW; ref-* are "
                            "reference optimizers (ref-muon, ref-adafactor: torch's own; the others need "
                            "pip install grassopt[bench])")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="final LR as a fraction of the peak after cosine decay (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: 10%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay (default: %(default)s)")
    g.add_argument("--plain-lr", type=float, default=None,
                   help="peak learning rate of the parameters the method does not project or orthogonalize "
                        "(embedding, head, norms, biases); the schedule scales it as --lr (default: the same as "
                        "--lr)")
    g.add_argument("--plain-weight-decay", type=float, default=None,
                   help="weight decay of those parameters; norms and biases stay undecayed (default: the same as "
                        "--weight-decay)")
    g.add_argument("--rank", type=rank_spec, default=None,
                   help="subspace rank r: an integer, or 'd/N' for a fraction of each matrix's short side "
                        "(default: the preset's: 128; apollo d/4; apollo-mini 1)")
    g.add_argument("--update-interval", type=int, default=None,
                   help="steps between basis updates T (default: the preset's: 200; ldadam 1)")
    g.add_argument("--targets", nargs="+", default=d.targets,
                   help="modules to project: 'all-linear', name substrings or regexes (default: all-linear)")
    g.add_argument("--opt", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="any other subspace option, e.g. --opt alpha=0.25 --opt step_size=0.3 --opt transport=keep "
                        "--opt recovery=False (repeatable)")
    g.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clipping, 0 = off (default: %(default)s)")
    g.add_argument("--clip-mode", default=d.clip_mode, choices=["global", "per-parameter"],
                   help="clip the norm of all gradients together (torch's clip_grad_norm_) or of each parameter's "
                        "gradient separately; --layerwise needs per-parameter (default: %(default)s)")
    g.add_argument("--layerwise", action="store_true",
                   help="step each parameter inside backward as soon as its gradient is complete, then free the "
                        "gradient (grassopt.layerwise): the full set of gradients is never resident. Global-norm "
                        "clipping needs all gradients at once: use --clip-mode per-parameter or --clip 0")
    g.add_argument("--state-dtype", default=d.state_dtype, choices=["float32", "int8"],
                   help="Adam moments of grassopt's presets (projected and plain groups): float32, or int8 codes "
                        "with a float32 scale per block of 256 (about 1/4 of the bytes; grassopt.functional)")
    g.add_argument("--stochastic-rounding", action="store_true",
                   help="with --param-dtype bfloat16: round each weight update stochastically (unbiased), so that "
                        "updates below half a bf16 ulp are not lost; seeded, resumable, identical on every rank")
    g = ap.add_argument_group("activation memory")
    g.add_argument("--sketch", default=None, choices=["haar", "gaussian", "coordinate"],
                   help="store only x P (tokens x r) for the backward pass of the covered linear layers, with a "
                        "random P of this law: W.grad gets the unbiased estimate G P P^T, a fresh P every step, "
                        "under any preset; with --preset rso, the law of its subspaces (haar if not given)")
    g.add_argument("--sketch-rank", type=_rank_or_fraction, default=d.sketch_rank,
                   help="rank r of P: a fraction of each layer's in_features such as 0.125, or an integer "
                        "(default: %(default)s)")
    g.add_argument("--lean-activations", action="store_true",
                   help="RMSNorm and SwiGLU save only their inputs (and one float per token) for backward and "
                        "recompute the rest: 2d + f fewer floats per token and block, the same forward pass")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="activation checkpointing per decoder block: each block saves only its input for backward "
                        "and runs its forward again when backward reaches it (about one more forward pass of "
                        "compute); bit-identical losses and gradients, so a run may resume with it on or off")
    g = ap.add_argument_group("run")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    g.add_argument("--tokens", type=int, default=None, help="train on this many tokens instead of --steps")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and backward")
    g.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the parameters (optimizer state stays float32)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--eval-tokens", type=int, default=None,
                   help="evaluate on the first N tokens of the validation split (default: all of it, exactly)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="metrics line every N steps (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="model init and data order (default: %(default)s)")
    g.add_argument("--device", default=None, help="device (default: the accelerator if any, else cpu)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    return TrainConfig(
        model=args.model, corpus=args.corpus, vocab_size=args.vocab_size, seq_len=args.seq_len,
        batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, tokens=args.tokens,
        preset=getattr(args, "preset", TrainConfig.preset), lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup=args.warmup, weight_decay=args.weight_decay, plain_lr=args.plain_lr,
        plain_weight_decay=args.plain_weight_decay, rank=args.rank, update_interval=args.update_interval,
        targets=list(args.targets), options=dict(args.opt), clip=args.clip, clip_mode=args.clip_mode,
        layerwise=args.layerwise, sketch=args.sketch, sketch_rank=args.sketch_rank, bf16=args.bf16,
        lean_activations=args.lean_activations, checkpoint_activations=args.checkpoint_activations,
        param_dtype=args.param_dtype, state_dtype=args.state_dtype, stochastic_rounding=args.stochastic_rounding,
        eval_every=args.eval_every, eval_batch_size=args.eval_batch_size, eval_tokens=args.eval_tokens,
        log_every=args.log_every, seed=args.seed,
        device=args.device, threads=args.threads, progress=not args.no_progress, cache_dir=args.cache_dir,
        **overrides)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="grassopt train",
        description="Train a LLaMA-style model on real text (the SOTU corpus by default) with a grassopt "
                    "preset or torch.optim.AdamW. Writes metrics.jsonl, loss.png, summary.json and an atomic "
                    "checkpoint.pt to --out. Ctrl-C stops after the current step and writes a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(ap)
    g = add_output_arguments(ap, "runs/train", "loss.png")
    g.add_argument("--profile-memory", action="store_true",
                   help="count the tensor bytes the second training step allocates at its worst moment, beyond "
                        "the weights and optimizer state (grassopt.profiling.TensorPeak; slows that one step)")
    g.add_argument("--subspace-quality", action="store_true",
                   help="record, for every projected matrix, the share of the next gradients' energy its basis "
                        "captures, averaged over each interval between basis updates, and the angles each update "
                        "turns (analysis.jsonl, capture_next.png; one extra Q^T X product per matrix and step)")
    return ap


def _init_distributed() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    device = default_device()
    backend = "gloo" if device == "cpu" else "nccl" if device.startswith("cuda") else None
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args, **output_settings(args), profile_memory=args.profile_memory,
                           subspace_quality=args.subspace_quality)
    distributed = _init_distributed()
    try:
        summary = train(cfg)
    except (CheckpointError, ValueError, FloatingPointError, FileNotFoundError, MissingPackageError) as e:
        print(f"grassopt train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a folder gone while writing metrics: one line naming the file
        print(f"grassopt train: error: {os_error(e)}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            import torch.distributed as dist
            dist.destroy_process_group()
    if not (distributed and int(os.environ.get("RANK", "0")) != 0):
        keys = ("preset", "steps", "tokens", "final_eval_loss", "final_eval_ppl", "tokens_per_s", "optimizer_state_bytes",
                "saved_activation_bytes", "step_peak_tensor_bytes", "train_peak_rss_bytes")
        print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
