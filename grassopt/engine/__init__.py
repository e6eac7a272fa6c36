"""What every training loop shares, between the library and the applications.

``grassopt train`` and ``grassopt finetune`` are each their setup (model, data, optimizer) plus a
:class:`Loop` over a :class:`TrainStep`; everything else a run does is here, once:

- :mod:`~grassopt.engine.run`: the run folder (``config.json``, ``metrics.jsonl``,
  ``summary.json``) and the resume check against the saved config;
- :mod:`~grassopt.engine.checkpoint`: atomic checkpoints, loaded with ``weights_only=True``, with
  every random state (CPU, the accelerator, numpy, Python);
- :mod:`~grassopt.engine.step`: one training step, backward, layer-wise or forward-only;
- :mod:`~grassopt.engine.loop`: the loop (logging, evaluation, checkpoints, Ctrl-C), the
  learning-rate schedule;
- :mod:`~grassopt.engine.progress`: the stop flag and the progress bar.

The engine knows no model, data set or config class: it imports only the library below it.
"""

from .checkpoint import (CheckpointError, Checkpointer, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .loop import Loop, LoopResult, default_device, dist_info, lr_factor
from .progress import StopFlag, progress_bar
from .run import RunFolder, config_differences
from .step import StepResult, TrainStep, call_hooks

__all__ = ["CheckpointError", "Checkpointer", "load_checkpoint", "save_checkpoint", "rng_state", "set_rng_state",
           "Loop", "LoopResult", "default_device", "dist_info", "lr_factor", "StopFlag", "progress_bar",
           "RunFolder", "config_differences", "StepResult", "TrainStep", "call_hooks"]
