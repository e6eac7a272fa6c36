"""A run's setup and wrap-up, the same for every application: :func:`run_session`.

Setup: validate the config (:meth:`grassopt.engine.config.RunConfig.validate`), set torch's CPU threads,
choose the device, find this process's rank, open (lock) the run folder and, with ``resume``, load
and check its checkpoint. The application's ``body(session)`` then builds its data, model and
optimizer and runs a :class:`~grassopt.engine.loop.Loop` made by :meth:`Session.loop` (which fills
in everything the config says: run control, schedule, the checkpoint to continue from).
Wrap-up (:meth:`Session.finish`): the summary written, the plot drawn, a line on an interruption,
and a non-finite loss raised as :class:`~grassopt.engine.step.NonFiniteLossError` once the last good
checkpoint and the summary are on disk. The folder is released however the run ends.

Restarts: a process that ``torchrun --max-restarts`` started again (``TORCHELASTIC_RESTART_COUNT`` > 0) in a
folder holding a checkpoint continues from it, as with ``resume`` (the same command line restarts the
job, and the config check still applies), so a rank killed mid-run costs only the steps since the last
checkpoint: the run ends as an uninterrupted one with the same checkpoint steps would.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import torch

from .loop import Loop, LoopResult, default_device, dist_info, lr_factor
from .run import RunFolder
from .step import NonFiniteLossError

__all__ = ["Session", "run_session", "torchrun_restart"]

T = TypeVar("T")


@dataclass
class Session:
    """One run being set up or running: its config, folder, the checkpoint to continue from (None for a
    fresh run), device, rank and world size, and when it started (after validation)."""

    cfg: Any
    folder: RunFolder
    checkpoint: dict[str, Any] | None
    device: torch.device
    rank: int = 0
    world: int = 1
    started: float = field(default_factory=time.perf_counter)

    def scheduler(self, optimizer: torch.optim.Optimizer, total: int, warmup: int) -> Any:
        """Linear warmup for ``warmup`` steps, then cosine decay to ``cfg.min_lr_ratio`` at ``total``."""
        ratio = self.cfg.min_lr_ratio
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, ratio))

    def loop(self, *, grad_accum: int, eval_every: int, files: dict[str, str] | None = None, **kw: Any) -> Loop:
        """The :class:`Loop` of this run (``kw``: the application's part, see :class:`Loop`; the run control,
        config and world size come from the session), continued from the checkpoint if there is one; the
        folder is started (``config.json``, the metric lines kept, ``files``)."""
        cfg = self.cfg
        loop = Loop(folder=self.folder, grad_accum=grad_accum, eval_every=eval_every, stop_after=cfg.stop_after,
                    log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, config=cfg.to_dict(),
                    world=self.world, progress=cfg.progress, **kw)
        if self.checkpoint is not None:
            loop.restore(self.checkpoint)
        self.folder.start(cfg.to_dict(), loop.history, files=files)
        return loop

    def finish(self, res: LoopResult, summary: dict[str, Any],
               plot: Callable[[list[dict[str, Any]], Path], None] | None = None, plot_file: str = "",
               notices: TextIO | None = None) -> dict[str, Any]:
        """Wrap up: write ``summary``, draw ``plot(history, folder/plot_file)`` (unless ``cfg.plot`` is off; the
        main process only), say where an interrupted run stopped (on ``notices``, stderr by default), and raise
        :class:`NonFiniteLossError` if a non-finite loss stopped it. Returns ``summary``."""
        folder = self.folder
        folder.write_summary(summary)
        if folder.main_process:
            if plot is not None and self.cfg.plot:
                plot(res.history, folder.path / plot_file)
            if res.interrupted:
                print(f"stopped at step {res.step}/{res.total}; checkpoint written to {folder.checkpointer.path} "
                      "(continue with --resume)", file=notices or sys.stderr)
        if res.error is not None:
            raise NonFiniteLossError(f"{res.error.rstrip('.')}; the last good checkpoint (step {res.step}) and the "
                                     f"summary are in {folder.path}")
        return summary


def torchrun_restart() -> int:
    """How often ``torchrun`` (``--max-restarts``) has restarted this job's processes (0: the first start, or
    no ``torchrun``)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def run_session(cfg: Any, body: Callable[[Session], T], *, kind: str | None = None,
                prepare: Callable[[], object] | None = None, sharded: bool = False,
                saved_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> T:
    """Set up the run of ``cfg`` (see the module doc), call ``body(session)`` and return what it returns;
    the run folder stays locked until then, however it ends. ``kind`` names the run's checkpoints;
    ``prepare()`` runs before the folder is opened (to fail early, or to make a checkpoint loadable);
    ``sharded``: the run's checkpoints are sharded (FSDP2: :class:`grassopt.engine.sharded.ShardedCheckpointer`);
    ``saved_config``: :meth:`grassopt.engine.run.RunFolder.open`'s."""
    cfg.validate()
    started = time.perf_counter()
    rank, world = dist_info()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or default_device())
    folder = RunFolder(cfg.out, main_process=rank == 0, kind=kind, device=device, ignore=cfg.RUN_CONTROL,
                       defaults=cfg.defaults(), sharded=sharded)
    restart = torchrun_restart()
    if restart and not cfg.resume and folder.held_checkpoint() is not None:  # this job's own checkpoint
        cfg = dataclasses.replace(cfg, resume=True, overwrite=False)
        if rank == 0:
            print(f"{cfg.out}: restart {restart} of this torchrun job: continuing from the folder's last checkpoint",
                  file=sys.stderr)
    if prepare is not None:
        prepare()
    ckpt = folder.open(cfg.resume, cfg.to_dict(), overwrite=cfg.overwrite, saved_config=saved_config)
    with folder:  # the folder stays locked until the run ends, however it ends
        return body(Session(cfg, folder, ckpt, device, rank, world, started))
