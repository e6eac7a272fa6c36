"""What every training loop shares, between the library and the applications.

``grassopt train`` and ``grassopt finetune`` are each their setup (model, data, optimizer) plus a
:class:`Loop` over a :class:`TrainStep`; everything else a run does is here, once:

- :mod:`~grassopt.engine.run`: the run folder (``config.json``, ``metrics.jsonl``,
  ``summary.json``), locked while a run uses it, never silently overwritten, and the resume check
  against the saved config;
- :mod:`~grassopt.engine.checkpoint`: atomic checkpoints with a verified digest, loaded with
  ``weights_only=True``, with every random state (CPU, the accelerator, numpy, Python);
- :mod:`~grassopt.engine.step`: one training step, backward, layer-wise or forward-only, that
  changes nothing when it meets a non-finite loss;
- :mod:`~grassopt.engine.loop`: the loop (logging, evaluation, checkpoints, Ctrl-C, the last good
  checkpoint on a non-finite loss), the learning-rate schedule;
- :mod:`~grassopt.engine.progress`: the stop flag and the progress bar;
- :mod:`~grassopt.engine.session`: a run's setup and wrap-up (validation, threads, device, the folder, the
  summary, the plot, an interruption, a non-finite loss): :func:`run_session`;
- :mod:`~grassopt.engine.config`: the config fields every run has, each declared with its flag
  (:func:`~grassopt.engine.config.setting`); :mod:`~grassopt.engine.cli`: the flags built from them, and the
  one error handler of the commands.

The engine knows no model, data set or config class: it imports only the library below it.
"""

from .checkpoint import (CheckpointError, Checkpointer, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .loop import Loop, LoopResult, default_device, dist_info, lr_factor
from .progress import StopFlag, progress_bar
from .run import RunFolder, RunFolderError, config_differences
from .session import Session, run_session
from .step import NonFiniteLossError, StepResult, TrainStep, call_hooks

__all__ = ["CheckpointError", "Checkpointer", "load_checkpoint", "save_checkpoint", "rng_state", "set_rng_state",
           "Loop", "LoopResult", "default_device", "dist_info", "lr_factor", "StopFlag", "progress_bar",
           "RunFolder", "RunFolderError", "config_differences", "NonFiniteLossError", "StepResult", "TrainStep",
           "call_hooks", "Session", "run_session"]
