"""The loop every training application shares: steps, logging, evaluation, checkpoints, stopping.

An application (``grassopt train``, ``grassopt finetune``) builds its model, optimizer, scheduler,
sampler and :class:`~grassopt.engine.step.TrainStep`, then hands them to a :class:`Loop` with
what is its own: how to draw a micro-batch, how to evaluate, which counters to keep and how a
metric line names them. :meth:`Loop.run` then runs (or continues) the run:

per step, ``grad_accum`` micro-batches -> the step -> scheduler -> counters; every ``log_every``
steps (and at the last) a metric line with the mean loss since the last line; every
``eval_every`` steps (0: never) and at the last an evaluation; every ``checkpoint_every`` steps a
checkpoint; a first Ctrl-C stops after the current step; at the end a checkpoint. Under DDP the
logged loss is the mean over the ranks, and only the main process writes.

A step that raises ``FloatingPointError`` (a non-finite loss or gradient:
:class:`~grassopt.engine.step.NonFiniteLossError`, or grassopt's optimizers' own check) has changed
no parameter, so the loop stops there and writes the last good checkpoint: the state before that
step, with the sampler's position and the random states as they were before it (a resumed run
repeats the step exactly). :attr:`LoopResult.error` says what happened.

Also here: the learning-rate schedule (:func:`lr_factor`), the device default
(:func:`default_device`), the process group (:func:`dist_info`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import profiling
from ..distributed import rank_and_world
from .checkpoint import CheckpointError, rng_state
from .progress import StopFlag, progress_bar
from .run import RunFolder
from .step import TrainStep, call_hooks

__all__ = ["Loop", "LoopResult", "lr_factor", "default_device", "dist_info"]


def default_device() -> str:
    """The current accelerator (CUDA, MPS, XPU, ...) if there is one, else the CPU."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return str(acc.current_accelerator())
    return "cpu"


#: ``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one: the one lookup
#: (:func:`grassopt.distributed.rank_and_world`).
dist_info = rank_and_world


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class LoopResult:
    """Where a run stands after :meth:`Loop.run`, and what it measured."""

    step: int
    start_step: int
    total: int
    interrupted: bool
    train_time: float
    optimizer_time: float
    counters: dict[str, int]
    history: list[dict[str, Any]]
    step_peak_tensor_bytes: int | None = None
    rss_before_training_bytes: int | None = None
    train_peak_rss_bytes: int | None = None
    peak_rss_bytes: int | None = None
    error: str | None = None  # why the run stopped early (a non-finite loss), or None

    @property
    def finished(self) -> bool:
        return self.step >= self.total

    def summary(self) -> dict[str, Any]:
        """The fields every run's summary shares."""
        return {"steps": self.step, "total_steps": self.total, "finished": self.finished,
                "interrupted": self.interrupted, "error": self.error, "train_time_s": self.train_time,
                "mean_step_s": self.train_time / self.step if self.step else None}


class Loop:
    """A run of ``total`` optimizer steps (see the module doc).

    Args:
        folder: the run folder (metric lines, the checkpoint).
        model, optimizer, scheduler, sampler: what the checkpoint saves (``state_dict`` of each).
        step: the :class:`TrainStep`.
        next_batch: returns one micro-batch (on the device), as ``step``'s ``loss_fn`` takes it.
        grad_accum: micro-batches per step.
        total: the run's length in steps; ``stop_after``: stop (with a checkpoint) after this many
            steps of this invocation.
        per_step: counters (saved in the checkpoint under these names) and how much each grows per step.
        position: ``position(counters) -> dict``, the fields that place a metric line (tokens, examples...).
        rate: ``(field, counter)``: the metric line's throughput field, counter per second of training.
        evaluate: ``evaluate() -> dict`` of evaluation fields.
        log_every, eval_every (0: only at the end), checkpoint_every (0: only at the end).
        config: the run's config (a dict saved in every checkpoint).
        hooks: objects with ``after_step(step, model, optimizer, record)`` (and ``after_backward``,
            run by the step).
        profile_step: measure the tensor peak (:class:`grassopt.profiling.TensorPeak`) of this step.
        world: processes of a DDP run (the logged loss is averaged over them).
        progress, desc: the progress bar.
        data: the fingerprint of the run's data (plain values: a corpus digest, sizes), saved in every
            checkpoint; :meth:`restore` refuses a checkpoint whose fingerprint differs.
    """

    def __init__(self, *, folder: RunFolder, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, sampler: Any, step: TrainStep, next_batch: Callable[[], Any], grad_accum: int,
                 total: int, stop_after: int | None, per_step: dict[str, int],
                 position: Callable[[dict[str, int]], dict[str, Any]], rate: tuple[str, str],
                 evaluate: Callable[[], dict[str, Any]], log_every: int, eval_every: int, checkpoint_every: int,
                 config: dict[str, Any], hooks: Sequence[Any] = (), profile_step: int | None = None,
                 world: int = 1, progress: bool = True, desc: str = "", data: dict[str, Any] | None = None):
        self.folder, self.model, self.optimizer = folder, model, optimizer
        self.scheduler, self.sampler, self.step_fn = scheduler, sampler, step
        self.next_batch, self.grad_accum = next_batch, grad_accum
        self.total, self.stop_after = total, stop_after
        self.per_step, self.position, self.rate = dict(per_step), position, rate
        self.evaluate = evaluate
        self.log_every, self.eval_every, self.checkpoint_every = log_every, eval_every, checkpoint_every
        self.config, self.hooks = config, list(hooks)
        self.profile_step, self.world = profile_step, world
        self.progress, self.desc = progress, desc
        self.data = data
        self.step = 0
        self.train_time = 0.0
        self.counters = dict.fromkeys(per_step, 0)
        self.history: list[dict[str, Any]] = []

    # -------------------------------------------------------------- checkpoints
    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from ``ckpt``: every state, the counters, the random states, the metric lines so far.
        A checkpoint of other data (its fingerprint, ``data``, differs) is refused before anything is loaded."""
        saved = ckpt.get("data")
        if saved is not None and self.data is not None and saved != self.data:
            def show(v: Any) -> str:
                return repr(v[:12] + "...") if isinstance(v, str) and len(v) > 16 else repr(v)

            diffs = [f"{k}: checkpoint {show(saved.get(k))} vs now {show(v)}" for k, v in self.data.items()
                     if saved.get(k) != v]
            raise CheckpointError(f"the data changed since {self.folder.checkpointer.path} was written "
                                  f"({'; '.join(diffs)}); resume with the data it was trained on, or start a new run "
                                  "(--overwrite, or another --out)")
        self.folder.checkpointer.load_model(self.model, ckpt)
        self.folder.checkpointer.load_optimizer(self.optimizer, ckpt)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.folder.checkpointer.restore_rng(ckpt)
        self.step, self.train_time = int(ckpt["step"]), float(ckpt["train_time"])
        self.counters = {k: int(ckpt.get(k, 0)) for k in self.per_step}
        self.history = self.folder.history(upto=self.step)

    def checkpoint(self, before: dict[str, Any] | None = None) -> None:
        """Save the run as it stands; ``before``: the sampler and random states of the start of a step
        that changed nothing (see the module doc)."""
        ck = self.folder.checkpointer
        ck.save({
            "config": self.config, "step": self.step, "model": ck.model_state(self.model),
            "optimizer": ck.optimizer_state(self.optimizer), "scheduler": self.scheduler.state_dict(),
            "sampler": before["sampler"] if before else self.sampler.state_dict(), "train_time": self.train_time,
            **({"data": self.data} if self.data is not None else {}), **self.counters},
            rng=before["rng"] if before else None)

    # -------------------------------------------------------------- the loop
    def _record(self, step_time: float, mean_loss: float, result: Any) -> dict[str, Any]:
        name, counter = self.rate
        return {"step": self.step, **self.position(self.counters), "loss": mean_loss, "lr": result.lr,
                "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
                name: self.counters[counter] / self.train_time, "step_time": step_time, "train_time": self.train_time}

    def run(self) -> LoopResult:
        start_step = self.step
        peak_before = profiling.peak_rss_bytes()
        rss_before = profiling.current_rss_bytes()
        can_reset_peak = profiling.reset_peak_rss()  # the training phase's own peak resident memory
        bar = progress_bar(self.progress and self.folder.main_process, self.total, self.step, self.desc)
        log_loss, log_n, opt_time, interrupted, step_peak = 0.0, 0, 0.0, False, None
        error, before = None, None
        stop_at = self.total if self.stop_after is None else min(self.total, self.step + self.stop_after)
        with StopFlag() as stop:
            while self.step < stop_at:
                t0 = time.perf_counter()
                before = {"sampler": self.sampler.state_dict(), "rng": rng_state(self.folder.checkpointer.device)}
                profiling_now = self.profile_step is not None and self.step == self.profile_step
                try:
                    with profiling.TensorPeak() if profiling_now else contextlib.nullcontext() as peak:
                        batches = [self.next_batch() for _ in range(self.grad_accum)]
                        result = self.step_fn(batches, self.step)
                except FloatingPointError as e:  # nothing was updated: keep the state before this step
                    self.optimizer.zero_grad(set_to_none=True)
                    error = f"{type(e).__name__}: {e}"
                    break
                if profiling_now:
                    step_peak = peak.peak  # type: ignore[union-attr]  # (profiling_now: a TensorPeak)
                self.scheduler.step()
                self.step += 1
                dt = time.perf_counter() - t0
                self.train_time += dt
                opt_time += result.optimizer_time
                for k, n in self.per_step.items():
                    self.counters[k] += n
                step_loss = result.loss
                if self.world > 1:  # the logged loss is the mean over every rank's micro-batches
                    step_loss = step_loss.detach().clone()
                    torch.distributed.all_reduce(step_loss)
                    step_loss /= self.world
                log_loss += step_loss.item()
                log_n += 1
                record: dict[str, Any] | None = None
                if self.step % self.log_every == 0 or self.step == self.total:
                    record = self._record(dt, log_loss / log_n, result)
                    log_loss, log_n = 0.0, 0
                if (self.eval_every and self.step % self.eval_every == 0) or self.step == self.total:
                    base = record or {"step": self.step, **self.position(self.counters), "train_time": self.train_time}
                    record = {**base, **self.evaluate()}
                if record is not None:
                    self.history.append(record)
                    self.folder.log(record)
                call_hooks(self.hooks, "after_step", self.step, self.model, self.optimizer, record)
                if bar is not None:
                    bar.update(1)
                    losses = [h["loss"] for h in self.history[-3:] if "loss" in h]
                    name, counter = self.rate
                    bar.set_postfix(loss=f"{losses[-1] if losses else step_loss.item():.3f}",
                                    **{name.replace("_per_", "/"): f"{self.counters[counter] / self.train_time:.1f}"},
                                    refresh=False)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < stop_at:
                    self.checkpoint()
                if stop.requested:
                    interrupted = True
                    break
        if bar is not None:
            bar.close()
        train_peak = profiling.peak_rss_since_reset() if can_reset_peak else None
        peak = max(peak_before or 0, profiling.peak_rss_bytes() or 0) or None
        if self.step_fn.updater is not None:
            self.step_fn.updater.remove()
        self.checkpoint(before if error is not None else None)
        return LoopResult(step=self.step, start_step=start_step, total=self.total, interrupted=interrupted,
                          train_time=self.train_time, optimizer_time=opt_time, counters=dict(self.counters),
                          history=self.history, step_peak_tensor_bytes=step_peak,
                          rss_before_training_bytes=rss_before, train_peak_rss_bytes=train_peak,
                          peak_rss_bytes=peak, error=error)
