"""One training step, whatever its mode: backward, layer-wise, or forward-only.

:class:`TrainStep` runs the ``grad_accum`` micro-batches of one optimizer step and steps the
optimizer:

- backward (the default): each micro-batch's loss, divided by ``grad_accum``, is backpropagated
  (under DDP, the gradient all-reduce runs only on the last one); then the ``after_backward`` hooks
  see the complete gradients, the gradients are clipped (``"global"``: torch's
  ``clip_grad_norm_`` over all trainable parameters; ``"per-parameter"``:
  :func:`grassopt.layerwise.clip_grad_norm_per_parameter_`) and ``optimizer.step()`` runs;
- layer-wise (``updater``, a :class:`grassopt.layerwise.LayerwiseUpdater`): the last micro-batch's
  backward pass steps each parameter as soon as its gradient is complete (and clipped per
  parameter) and frees that gradient;
- forward-only (an optimizer with ``zeroth_order = True``, :class:`grassopt.zo.ZO`): no backward;
  the optimizer calls a closure that returns the mean loss over the micro-batches.

Then a sketched model (:mod:`grassopt.sketch`'s estimator) moves to its next sketch matrices and
the gradients are released. The loss of every micro-batch is computed by ``loss_fn(module,
batch)``, so the step does not know the model's signature.

A step that meets a non-finite number changes nothing: each micro-batch's loss is checked before
its backward pass, and the gradients before the optimizer step (their norm, when clipping computes
it; else each gradient, unless the optimizer checks them itself: a finite loss can have a NaN
gradient, which torch's AdamW would write into the weights); a non-finite one raises
:class:`NonFiniteLossError` with the gradients released and no parameter touched (grassopt's
optimizers raise ``FloatingPointError`` themselves, before changing anything, on a non-finite
gradient or forward-only loss). The loop then keeps the state before the step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._dtensor import is_dtensor
from ..distributed import fsdp_gradient_sync
from ..layerwise import clip_grad_norm_per_parameter_

__all__ = ["TrainStep", "StepResult", "NonFiniteLossError", "call_hooks"]


def _local(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 (DTensor) gradient, or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


class NonFiniteLossError(FloatingPointError):
    """A training step met a non-finite loss or gradient norm; nothing was updated."""


def call_hooks(hooks: Sequence[Any], name: str, *args: Any) -> None:
    """Call method ``name`` of every hook that has one."""
    for h in hooks:
        fn = getattr(h, name, None)
        if fn is not None:
            fn(*args)


@dataclass
class StepResult:
    """What one step measured: the mean loss over its micro-batches (a 0-d tensor, not synchronised),
    the gradient norm before clipping (None when it is not known), the learning rate it used, and
    the seconds spent in the optimizer (0 with layer-wise updates, whose steps run inside backward)."""

    loss: Tensor
    grad_norm: Tensor | None
    lr: float
    optimizer_time: float


class TrainStep:
    """Callable ``step(batches, index) -> StepResult`` for ``model`` and ``optimizer`` (see the module doc).

    Args:
        model: the model (its forward computes the loss through ``loss_fn``).
        optimizer: any ``torch.optim.Optimizer`` (forward-only when it has ``zeroth_order = True``).
        loss_fn: ``loss_fn(module, batch) -> loss`` (a scalar tensor) for one micro-batch.
        ddp_model: the DDP wrapper of ``model`` when there is one (backward steps run through it).
        updater: a ``LayerwiseUpdater`` for layer-wise steps, else None.
        clip: the gradient-norm bound (0: no clipping); ``clip_mode``: ``"global"`` or ``"per-parameter"``.
        autocast: keyword arguments of ``torch.autocast`` for the forward passes.
        sketched: the model carries sketched layers of the estimator (advance them after each step).
        hooks: objects whose ``after_backward(index, model, optimizer)`` runs before clipping.
        fsdp: ``model`` is sharded with FSDP2 (``fully_shard``): the micro-batches of a step but the last skip
            the gradients' reduce-scatter, and the gradients are checked on every rank before the step (all
            ranks then stop at the same step).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[nn.Module, Any], Tensor],
                 *, ddp_model: nn.Module | None = None, updater: Any = None, clip: float = 0.0,
                 clip_mode: str = "global", autocast: dict[str, Any] | None = None, sketched: bool = False,
                 hooks: Sequence[Any] = (), fsdp: bool = False):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.fsdp = fsdp
        self.distributed = ddp_model is not None or fsdp  # a check's verdict is agreed by every rank
        self.ddp_model = ddp_model
        self.updater = updater
        self.clip, self.clip_mode = clip, clip_mode
        self.autocast = autocast or {"device_type": "cpu", "enabled": False}
        self.sketched = sketched
        self.hooks = list(hooks)
        self.forward_only = bool(getattr(optimizer, "zeroth_order", False))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def __call__(self, batches: Sequence[Any], index: int) -> StepResult:
        lr = float(self.optimizer.param_groups[0]["lr"])  # (a tensor in torchao's optimizers)
        if self.forward_only:
            loss, grad_norm, opt_time = self._forward_only(batches)
        else:
            loss, grad_norm, opt_time = self._backward(batches, index)
        if self.sketched:
            from .. import sketch as gs
            gs.next_step(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, lr, opt_time)

    def _forward_only(self, batches: Sequence[Any]) -> tuple[Tensor, None, float]:
        def closure() -> Tensor:  # two forward passes inside the optimizer, no backward
            total = torch.zeros((), device=self.device)
            for batch in batches:
                with torch.autocast(**self.autocast):
                    total = total + self.loss_fn(self.model, batch).float()
            return total / len(batches)

        t1 = time.perf_counter()
        # (a forward-only optimizer: its closure and its step return the loss tensor)
        loss: Tensor = self.optimizer.step(closure)  # type: ignore[arg-type, assignment]
        return loss, None, time.perf_counter() - t1

    def _backward(self, batches: Sequence[Any], index: int) -> tuple[Tensor, Tensor | None, float]:
        module = self.ddp_model if self.ddp_model is not None else self.model
        step_loss = torch.zeros((), device=self.device)
        n = len(batches)
        for micro, batch in enumerate(batches):
            last = micro == n - 1
            if self.updater is not None:  # the last backward steps every parameter (and frees its grad)
                sync = self.updater.accumulate(enabled=not last)
            elif self.ddp_model is not None and not last:
                sync = self.ddp_model.no_sync()  # type: ignore[operator]  # (the DDP wrapper's)
            elif self.fsdp and not last:
                sync = fsdp_gradient_sync(self.model, False)
            else:
                sync = contextlib.nullcontext()
            with sync:
                with torch.autocast(**self.autocast):
                    loss = self.loss_fn(module, batch)
                self._check_finite(loss, "loss", index)
                (loss / n).backward()
            step_loss += loss.detach() / n
        if self.updater is not None:  # the optimizer ran inside backward: its time is in the step time
            return step_loss, self.updater.last_grad_norm, 0.0
        call_hooks(self.hooks, "after_backward", index, self.model, self.optimizer)
        grad_norm = None
        if self.clip > 0 and self.clip_mode == "global":
            grad_norm = nn.utils.clip_grad_norm_(self.params, self.clip)
        elif self.clip > 0:
            norms = clip_grad_norm_per_parameter_(self.params, self.clip)
            grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
        if grad_norm is not None and is_dtensor(grad_norm):  # FSDP2: the norm of sharded gradients, on every rank
            grad_norm = grad_norm.full_tensor()
        if grad_norm is not None:
            self._check_finite(grad_norm, "gradient norm", index)
        elif not self._optimizer_checks_gradients():
            self._check_gradients(index)
        t1 = time.perf_counter()
        self.optimizer.step()
        return step_loss, grad_norm, time.perf_counter() - t1

    def _optimizer_checks_gradients(self) -> bool:
        """Whether the optimizer refuses a non-finite gradient itself, before changing anything (grassopt's
        :class:`~grassopt.SubspaceAdamW` with ``check_finite`` on in every group)."""
        from ..optimizer import SubspaceAdamW
        if self.fsdp:  # each rank sees its shards: the check here makes every rank agree
            return False
        return isinstance(self.optimizer, SubspaceAdamW) and all(
            g.get("check_finite") is True for g in self.optimizer.param_groups)

    def _check_gradients(self, index: int) -> None:
        """Raise :class:`NonFiniteLossError` (gradients released) if any gradient is not finite on any rank."""
        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None]
        if not named:
            return
        finite = torch.stack([torch.isfinite(_local(g.detach())).all() for _, g in named])
        ok = finite.all()
        if self.distributed:  # every rank stops at the same step
            flag = ok.to(torch.int32).reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = flag[0] > 0
        if not bool(ok):
            bad = [n for (n, _), f in zip(named, finite.tolist()) if not f]
            self.optimizer.zero_grad(set_to_none=True)
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteLossError(f"non-finite gradient (NaN or inf) in {shown or 'another rank'} at step "
                                     f"{index + 1}; nothing was updated")

    def _check_finite(self, value: Tensor, what: str, index: int) -> None:
        """Raise :class:`NonFiniteLossError` (gradients released) if ``value`` is not finite on any rank."""
        ok = torch.isfinite(value.detach()).all()
        if self.distributed:  # every rank stops at the same step
            flag = ok.to(torch.int32).reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = flag[0] > 0
        if not bool(ok):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite {what} ({float(value.detach().float().sum())}) at step {index + 1}; "
                                     "nothing was updated")
