"""``grassopt train``: train a LLaMA-style model on real text with any preset (see ``--help``).

Every flag is a field of :class:`~grassopt.train.loop.TrainConfig` (its help, choices and default are
declared there, once): a new setting is a new field, and it is a flag here and in ``grassopt bench``.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import distributed
from ..engine import cli as engine_cli
from ..engine import dist_info
from .loop import TrainConfig, train

#: The help sections of ``grassopt train`` (a field's ``group`` -> title), in order.
GROUPS = {"data": "model and data", "optimizer": "optimizer", "memory": "activation memory", "run": "run",
          "output": "checkpoints and output"}
#: The sections ``grassopt bench`` (and ``grassopt analyze``) share: all but the run folder's, which they manage.
RUN_GROUPS = {k: v for k, v in GROUPS.items() if k != "output"}
SUMMARY_KEYS = ("preset", "steps", "tokens", "final_eval_loss", "final_eval_ppl", "tokens_per_s",
                "optimizer_state_bytes", "saved_activation_bytes", "step_peak_tensor_bytes", "train_peak_rss_bytes")


def add_run_arguments(ap: argparse.ArgumentParser, *, with_preset: bool = True) -> None:
    """The options shared by ``grassopt train``, ``grassopt bench`` and ``grassopt analyze``: a flag per field
    of :class:`TrainConfig` outside the run folder's section (``--preset`` only ``with_preset``)."""
    engine_cli.add_config_arguments(ap, TrainConfig, RUN_GROUPS, skip=() if with_preset else ("preset",))


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    return engine_cli.config_from_args(TrainConfig, args, **overrides)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="grassopt train",
        description="Train a LLaMA-style model on real text (the SOTU corpus by default) with a grassopt "
                    "preset or torch.optim.AdamW. Writes metrics.jsonl, loss.png, summary.json and an atomic "
                    "checkpoint.pt to --out. Ctrl-C stops after the current step and writes a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    engine_cli.add_config_arguments(ap, TrainConfig, GROUPS)
    return ap


def _run(cfg: TrainConfig) -> int:
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized()
    started = distributed.init_from_env().distributed and not joined  # torchrun (WORLD_SIZE > 1): join its group
    try:
        rank = dist_info()[0]
        summary = train(cfg)
    finally:
        if started:
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({k: summary.get(k) for k in SUMMARY_KEYS}, indent=2))
    return 130 if summary.get("interrupted") else 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return engine_cli.run_command("grassopt train", lambda: _run(config_from_args(args)))


if __name__ == "__main__":
    sys.exit(main())
