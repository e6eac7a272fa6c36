"""Layer-wise updates: each parameter is stepped inside backward, as soon as its gradient is complete.

Usual training holds every gradient at once: backward writes all of them, then ``optimizer.step()``
reads them. In layer-wise mode a hook on each parameter (``Tensor.register_post_accumulate_grad_hook``)
runs the optimizer step for that parameter alone the moment its gradient has been accumulated, then
frees the gradient. At no point is the full set of gradients resident; with one micro-batch per step
this saves the memory of the gradients (as large as the weights).

Usage, with gradient accumulation and an LR scheduler::

    opt = grassopt.SubspaceAdamW(grassopt.param_groups(model, "subtrack++", rank=128), lr=1e-3)
    lw = grassopt.layerwise.LayerwiseUpdater(opt, clip_norm=1.0)      # per-parameter clipping (optional)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)         # before or after the updater
    for step in range(steps):
        for micro in range(grad_accum):
            last = micro == grad_accum - 1
            with lw.accumulate(enabled=not last):    # earlier micro-batches: accumulate, no step
                loss = model(x, y)[1] / grad_accum
                loss.backward()                      # the last backward steps every parameter
        sched.step()                                 # once per optimizer step, as usual
        # no optimizer.step(), no zero_grad(): the gradients are already stepped and freed

What stays the same
    * The optimizer is the ordinary one (one object, its ``param_groups``, its ``state``). LR
      schedulers act on it as usual; the hooks never call a scheduler, so one ``sched.step()`` per
      optimizer step gives the same learning rates as without layer-wise updates.
    * Step hooks (``optimizer.register_step_pre_hook`` / ``register_step_post_hook`` and the global
      ones) run once per optimizer step, as with ``optimizer.step()``: the pre-hooks before the first
      parameter's step, the post-hooks when the backward pass that stepped has finished (their
      ``args`` and ``kwargs`` are empty; a pre-hook's return value is ignored). So
      :func:`grassopt.sketch.attach` draws the next sketch matrices once per step, after backward,
      and a block recomputed by activation checkpointing during backward still finds the ``P`` of
      its forward pass.
    * Checkpoints are ``optimizer.state_dict()``, the same format as without layer-wise updates, so a
      checkpoint moves freely between the two modes. Resuming is: build the model, the optimizer and
      the updater, then ``optimizer.load_state_dict(...)``.
    * Results: a layer-wise step is the same computation as ``optimizer.step()`` for each parameter
      (for :class:`~grassopt.SubspaceAdamW` through :meth:`~grassopt.SubspaceAdamW.step_parameters`,
      whose random rules draw from per-parameter generators, so the order of the steps is irrelevant).

Which optimizers
    * Anything with ``step_parameters(params)`` (``SubspaceAdamW``) is called through it.
    * Any other ``torch.optim.Optimizer`` is stepped one parameter at a time: its ``step()`` is
      called with ``param_groups`` temporarily narrowed to that parameter's group holding only that
      parameter (the group's current hyper-parameters, the optimizer's own per-parameter state).
      This is exact for every optimizer whose update of a parameter depends only on that
      parameter's gradient and state, which is all of ``torch.optim`` except ``LBFGS`` (refused).
      An optimizer that rewrites param-group entries inside ``step()`` (a group-level step
      counter, say) would see them rewritten once per parameter: that is detected and refused.
    * RSO (:class:`grassopt.sketch.RSO`) is refused at construction: its inner-step counter and its
      merge of every layer after the K-th step belong to the whole optimizer step, not to a parameter.

Clipping
    ``clip_norm`` clips each parameter's gradient to that norm inside the hook, exactly like
    ``torch.nn.utils.clip_grad_norm_([p], clip_norm)`` applied to each parameter ``p`` separately
    (see :func:`clip_grad_norm_per_parameter_`, which does the same outside layer-wise mode).
    **Global-norm clipping is impossible in layer-wise mode**: it scales every gradient by the norm
    of all of them, which is only known once all gradients exist, and layer-wise mode never holds
    them all (a parameter has been stepped and its gradient freed before the next one is computed).
    :meth:`LayerwiseUpdater.clip_grad_norm_` raises to say so. Do not call
    ``torch.nn.utils.clip_grad_norm_`` yourself after a layer-wise backward: there are no gradients
    left, so it silently clips nothing and returns 0. The norm of the whole gradient can still be
    *logged*: :attr:`LayerwiseUpdater.last_grad_norm` is the global norm of the last step's gradients
    (before clipping), assembled from per-parameter norms.

Gradient accumulation
    Backward passes inside ``with lw.accumulate():`` only accumulate gradients; the first backward
    outside it steps. Between micro-batches the accumulated gradients are resident, as in any
    accumulation, so the memory saving is that of the last backward pass: it is complete only with
    one micro-batch per step.

Data parallel (DDP)
    Parameter hooks fire on the *local* gradient, before DistributedDataParallel has averaged it
    over ranks, so they must not step. Pass the DDP-wrapped model instead
    (``LayerwiseUpdater(opt, ddp_model=ddp)``): the updater registers a DDP communication hook that
    all-reduces each gradient bucket (as DDP's default hook does) and, once that bucket's all-reduce
    has completed, steps the bucket's parameters on the averaged gradients. ``lw.accumulate()`` then
    also enters ``ddp.no_sync()``. Build DDP with ``gradient_as_bucket_view=True``: the gradients are
    then views of DDP's buckets (DDP keeps one full-size bucket buffer whatever you do, so under DDP
    layer-wise mode overlaps the optimizer with backward but cannot drop gradient memory below those
    buffers). A multi-process run without ``ddp_model`` is refused, and so are FSDP2 (DTensor)
    parameters: never is a step taken on unsynchronised gradients.

Failure
    A non-finite gradient raises ``FloatingPointError`` from inside backward, before its parameter is
    stepped (found by ``SubspaceAdamW(check_finite=True)``, or for other optimizers by the updater's
    own ``check_finite=True``); parameters whose gradients came earlier in that backward pass have
    already been updated (a layer-wise step cannot be all-or-nothing). Calling ``optimizer.step()``
    while the updater is attached raises; :meth:`LayerwiseUpdater.remove` detaches it and restores
    normal stepping.
"""

from __future__ import annotations

import contextlib
import math
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._dtensor import is_dtensor

try:  # the global step hooks (torch.optim.optimizer.register_optimizer_step_{pre,post}_hook)
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
except ImportError:  # pragma: no cover - older or newer torch without them
    _global_optimizer_pre_hooks, _global_optimizer_post_hooks = {}, {}

__all__ = ["LayerwiseUpdater", "LayerwiseError", "clip_grad_norm_per_parameter_"]

_ATTACHED = "_grassopt_layerwise"  # marker attribute on an optimizer that has an updater


class LayerwiseError(RuntimeError):
    """Layer-wise updates used in a way that would give wrong results."""


_GLOBAL_CLIP_MSG = (
    "global-norm gradient clipping needs the norm of all gradients together, and layer-wise updates "
    "never hold all gradients: each parameter is stepped (and its gradient freed) during backward, "
    "before the later gradients exist. Use per-parameter clipping (LayerwiseUpdater(..., clip_norm=c), "
    "which clips each parameter's gradient to norm c) or turn layer-wise updates off.")


def _refuse_step(self, *args: Any, **kwargs: Any) -> None:
    raise LayerwiseError(
        f"{type(self).__name__}.step() was called while layer-wise updates are on: every parameter is "
        "already stepped inside backward (the backward pass outside `updater.accumulate()` is the step). "
        "Remove the call to optimizer.step() (and zero_grad(); the gradients are freed for you), or call "
        "updater.remove() to go back to ordinary stepping.")


# LR schedulers wrap ``optimizer.step`` to check that it ran before ``scheduler.step()``. This marker
# tells them the step is tracked already (the updater sets ``optimizer._opt_called`` after each
# layer-wise step, which is what their wrapper would do), so no spurious warning is printed.
_refuse_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


def _clip_coef(norm: Tensor, max_norm: float) -> Tensor:
    # The same formula as torch.nn.utils.clip_grad_norm_ (1e-6 guards a zero norm).
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def _grad_norm(g: Tensor, norm_type: float) -> Tensor:
    return torch.linalg.vector_norm(g, norm_type, dtype=torch.float32)


@torch.no_grad()
def clip_grad_norm_per_parameter_(params: Iterable[Tensor], max_norm: float,
                                  norm_type: float = 2.0) -> list[Tensor]:
    """Clip each parameter's gradient to norm ``max_norm`` separately; return the norms before clipping.

    The same as ``torch.nn.utils.clip_grad_norm_([p], max_norm, norm_type)`` for every ``p`` and what
    :class:`LayerwiseUpdater` does with ``clip_norm`` inside its hooks, so a run that clips this way
    gives the same result with and without layer-wise updates.
    """
    norms = []
    for p in params:
        if p.grad is None:
            continue
        n = _grad_norm(p.grad, norm_type)
        p.grad.mul_(_clip_coef(n, max_norm).to(p.grad.dtype))
        norms.append(n)
    return norms


def _queue_end_of_backward(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the current backward pass finishes (after every gradient hook)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class LayerwiseUpdater:
    """Step ``optimizer`` one parameter at a time inside backward, and free each gradient after its step.

    Args:
        optimizer: a :class:`~grassopt.SubspaceAdamW` (stepped via ``step_parameters``) or any other
            ``torch.optim.Optimizer`` (stepped per parameter by narrowing its ``param_groups``; see
            the module docstring). Only its parameters get hooks. One updater per optimizer.
        ddp_model: the ``DistributedDataParallel`` module when training with DDP. Steps then run in a
            DDP communication hook after each bucket's all-reduce, on the averaged gradients. Required
            when ``torch.distributed`` runs more than one process.
        clip_norm: if set, each parameter's gradient is clipped to this norm (per parameter; global
            clipping is impossible in layer-wise mode, see :meth:`clip_grad_norm_`).
        norm_type: the norm used for ``clip_norm`` and :attr:`last_grad_norm`.
        track_grad_norm: compute :attr:`last_grad_norm` (one norm per parameter, no host sync).
        comm_hook: under DDP, the communication hook to run before stepping (default: DDP's
            ``allreduce_hook``, which averages). A compressing hook such as ``fp16_compress_hook``
            works too: the step reads the gradients from the tensor its future returns.
        comm_state: the ``state`` passed to ``comm_hook`` (default: the DDP model's process group).
        check_finite: for an optimizer without ``step_parameters`` (``torch.optim``), raise
            ``FloatingPointError`` before stepping a parameter whose gradient is not finite (one host
            sync per parameter; free of a pass when its norm is computed anyway). ``SubspaceAdamW``
            checks its gradients itself (its own ``check_finite``).

    The updater is attached from construction until :meth:`remove` (or the end of a ``with`` block).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, ddp_model: nn.Module | None = None,
                 clip_norm: float | None = None, norm_type: float = 2.0, track_grad_norm: bool = True,
                 comm_hook: Callable[..., Any] | None = None, comm_state: Any = None, check_finite: bool = True):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"LayerwiseUpdater needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise LayerwiseError("LBFGS cannot be stepped layer-wise: its step re-evaluates a closure and "
                                 "treats all parameters as one vector")
        why = getattr(optimizer, "layerwise_refusal", None)  # set by optimizers whose step is not per parameter
        if why:
            raise ValueError(f"{type(optimizer).__name__} cannot be stepped layer-wise: {why}; "
                             "train it without layer-wise updates")
        if getattr(optimizer, _ATTACHED, None) is not None:
            raise LayerwiseError("this optimizer already has a LayerwiseUpdater attached; call remove() on "
                                 "it before attaching another (two would step every parameter twice)")
        if clip_norm is not None and not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"clip_norm={clip_norm} must be a positive number (or None for no clipping)")
        self.optimizer = optimizer
        self.clip_norm = clip_norm
        self.norm_type = float(norm_type)
        self.track_grad_norm = track_grad_norm
        self.check_finite = check_finite
        #: number of optimizer steps taken layer-wise (backward passes that stepped parameters)
        self.step_count = 0
        #: the global ``norm_type``-norm of the last step's gradients (before clipping), a 0-dim tensor
        self.last_grad_norm: Tensor | None = None
        self._native = callable(getattr(optimizer, "step_parameters", None))
        self._accumulating = False
        self._lock = threading.RLock()  # DDP future callbacks can run on several threads at once
        self._stepped: list[Tensor] = []
        self._norms: list[Tensor] = []
        self._end_queued = False
        self._handles: list[Any] = []
        self._attached = True
        self.ddp_model = ddp_model
        self._comm_hook = comm_hook
        self._comm_state = comm_state

        self._group_of: dict[int, int] = {}
        params: list[Tensor] = []
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) in self._group_of:
                    raise LayerwiseError("a parameter appears twice in the optimizer's param groups")
                self._group_of[id(p)] = gi
                params.append(p)
        dtensors = [i for i, p in enumerate(params) if is_dtensor(p)]
        if dtensors:
            raise LayerwiseError(
                "layer-wise updates do not support FSDP2 (DTensor) parameters: FSDP2 reduce-scatters "
                "gradients after its own hooks, so a parameter hook would see an unsynchronised gradient. "
                "Use layer-wise updates with DDP or in a single process.")
        self._params = params
        self._managed = {id(p) for p in params}
        self._index = {id(p): i for i, p in enumerate(params)}

        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        if ddp_model is None:
            if world > 1:
                raise LayerwiseError(
                    f"torch.distributed runs {world} processes but no ddp_model was given: parameter hooks "
                    "fire on each rank's local gradient, before DDP averages it, so stepping there would use "
                    "unsynchronised gradients. Pass the DistributedDataParallel module: "
                    "LayerwiseUpdater(optimizer, ddp_model=ddp_model).")
            if comm_hook is not None:
                raise ValueError("comm_hook is only used with ddp_model")
            for p in params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._param_hook))
        else:
            self._attach_ddp(ddp_model)

        self._saved_step = optimizer.__dict__.get("step", None)  # e.g. an LR scheduler's wrapper
        optimizer.step = types.MethodType(_refuse_step, optimizer)  # type: ignore[method-assign]
        setattr(optimizer, _ATTACHED, self)

    # ------------------------------------------------------------------ public API
    @contextlib.contextmanager
    def accumulate(self, enabled: bool = True) -> Iterator[None]:
        """Backward passes inside this block only accumulate gradients (no step).

        Use it for every micro-batch but the last of an optimizer step. Under DDP it also enters
        ``ddp_model.no_sync()``, so gradients are neither all-reduced nor stepped. With
        ``enabled=False`` it does nothing (handy as ``accumulate(enabled=not last)``).
        """
        if not enabled:
            yield
            return
        if self._accumulating:
            raise LayerwiseError("updater.accumulate() is already active (nested accumulate blocks)")
        self._check_attached()
        sync = self.ddp_model.no_sync() if self.ddp_model is not None else contextlib.nullcontext()  # type: ignore[operator]
        self._accumulating = True
        try:
            with sync:
                yield
        finally:
            self._accumulating = False

    def clip_grad_norm_(self, *args: Any, **kwargs: Any) -> None:
        """Always raises: global-norm clipping is impossible in layer-wise mode (use ``clip_norm``)."""
        raise LayerwiseError(_GLOBAL_CLIP_MSG)

    def remove(self) -> None:
        """Detach: remove the hooks and give the optimizer its ``step()`` back.

        Under DDP the communication hook cannot be unregistered; it stays and behaves exactly like
        DDP's default all-reduce (no stepping), so ordinary ``optimizer.step()`` training continues.
        """
        if not self._attached:
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        opt = self.optimizer
        if self._saved_step is None:
            opt.__dict__.pop("step", None)
        else:
            opt.step = self._saved_step  # type: ignore[method-assign]
        opt.__dict__.pop(_ATTACHED, None)
        self._attached = False

    def __enter__(self) -> LayerwiseUpdater:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ------------------------------------------------------------------ stepping
    def _check_attached(self) -> None:
        if not self._attached:
            raise LayerwiseError("this LayerwiseUpdater has been removed")

    def _param_hook(self, p: Tensor) -> None:
        if self._accumulating or not self._attached:
            return
        self._step_param(p, p.grad)
        self._note_backward()

    def _note_backward(self) -> None:
        """Arrange for the end-of-step bookkeeping to run once this backward pass has finished.

        Under DDP it must run after DDP's own end-of-backward callback (which waits for every
        bucket's future, i.e. every step, and then writes the averaged gradients back into
        ``.grad``). DDP queues that callback when its last bucket is ready, after this is first
        called; a callback queued from inside a running callback runs after all queued before it,
        so the bookkeeping queues itself once more.
        """
        with self._lock:
            if self._end_queued:
                return
            self._end_queued = True
        if self.ddp_model is None:
            _queue_end_of_backward(self._end_of_step)
        else:
            _queue_end_of_backward(lambda: _queue_end_of_backward(self._end_of_step))

    def _end_of_step(self) -> None:
        with self._lock:
            self._end_queued = False
            stepped, self._stepped = self._stepped, []
            norms, self._norms = self._norms, []
        for p in stepped:  # DDP writes the averaged gradients back at the end of backward: drop them
            p.grad = None
        if stepped:
            self.step_count += 1
            self.optimizer._opt_called = True  # type: ignore[attr-defined]  # for LR schedulers' check
            if norms:
                self.last_grad_norm = torch.linalg.vector_norm(
                    torch.stack([n.to(norms[0].device) for n in norms]), self.norm_type)
            self._run_step_hooks(post=True)

    def _run_step_hooks(self, post: bool) -> None:
        """The optimizer's step hooks, once per layer-wise step (``optimizer.step()`` would run them)."""
        opt = self.optimizer
        hooks = (list(opt._optimizer_step_post_hooks.values()) + list(_global_optimizer_post_hooks.values())
                 if post else
                 list(_global_optimizer_pre_hooks.values()) + list(opt._optimizer_step_pre_hooks.values()))
        for hook in hooks:
            hook(opt, (), {})

    @torch.no_grad()
    def _step_param(self, p: Tensor, grad: Tensor | None) -> None:
        if grad is None:
            return
        with self._lock:
            if not self._stepped:  # the first parameter of this step
                self._run_step_hooks(post=False)
            p.grad = grad
            try:
                n = None
                if self.clip_norm is not None or self.track_grad_norm:
                    n = _grad_norm(grad, self.norm_type)
                if self.check_finite and not self._native:  # SubspaceAdamW checks its gradients itself
                    self._check_finite(p, grad, n)
                if n is not None:
                    self._norms.append(n)
                    if self.clip_norm is not None:
                        grad.mul_(_clip_coef(n, self.clip_norm).to(grad.dtype))
                if self._native:
                    self.optimizer.step_parameters([p])  # type: ignore[attr-defined]  # (_native: it has one)
                else:
                    self._generic_step(p)
            except FloatingPointError as e:
                self._end_queued = False
                raise FloatingPointError(
                    f"{e} (layer-wise mode: parameters whose gradients came earlier in this backward pass "
                    "were already updated)") from e
            finally:
                p.grad = None  # free the gradient at once
            self._stepped.append(p)

    def _check_finite(self, p: Tensor, grad: Tensor, norm: Tensor | None) -> None:
        """Raise ``FloatingPointError`` before stepping ``p`` if its gradient holds a NaN or an inf (a
        ``torch.optim`` optimizer would write it into the weight). A finite norm (of order > 0) proves
        every element finite; a non-finite one is confirmed element by element (a norm can overflow)."""
        if norm is not None and self.norm_type > 0 and bool(norm.isfinite()):
            return
        if bool(torch.isfinite(grad).all()):
            return
        raise FloatingPointError(
            f"non-finite gradient (NaN or inf) in parameter {self._index[id(p)]} {tuple(p.shape)}; it was not "
            "stepped. Lower the learning rate, clip gradients, or use a GradScaler with fp16; pass "
            "check_finite=False to skip this check")

    def _generic_step(self, p: Tensor) -> None:
        opt = self.optimizer
        groups = opt.param_groups
        group = groups[self._group_of[id(p)]]
        view = dict(group)
        view["params"] = [p]
        opt.param_groups = [view]
        step = type(opt).step
        if getattr(step, "hooked", False) and hasattr(step, "__wrapped__"):
            step = step.__wrapped__  # type: ignore[attr-defined]  # without torch's step hooks: they run once per step (_run_step_hooks)
        try:
            step(opt)
        finally:
            opt.param_groups = groups
        changed = [k for k in group if k != "params" and view.get(k) is not group[k]]
        if changed:
            raise LayerwiseError(
                f"{type(opt).__name__}.step() rewrote the param-group entries {changed}: it keeps group-level "
                "state, which a per-parameter step would update once per parameter. This optimizer cannot be "
                "used layer-wise.")

    # ------------------------------------------------------------------ DDP
    def _attach_ddp(self, ddp: nn.Module) -> None:
        if not isinstance(ddp, nn.parallel.DistributedDataParallel):
            raise TypeError(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, "
                            f"got {type(ddp).__name__}")
        if getattr(ddp, "find_unused_parameters", False):
            raise LayerwiseError(
                "layer-wise updates need DistributedDataParallel(find_unused_parameters=False): with unused "
                "parameters DDP all-reduces zero gradients for them, which would be stepped, whereas "
                "optimizer.step() skips a parameter without a gradient")
        ddp_params = {id(p) for p in ddp.module.parameters()}
        missing = [i for i, p in enumerate(self._params) if p.requires_grad and id(p) not in ddp_params]
        if missing:
            raise LayerwiseError(
                f"{len(missing)} optimizer parameters are not parameters of ddp_model.module; build the "
                "optimizer from the wrapped model's parameters")
        state = self._comm_state
        if self._comm_hook is None:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
            self._comm_hook = allreduce_hook
        if state is None:
            state = getattr(ddp, "process_group", None)
        try:
            ddp.register_comm_hook(state, self._ddp_hook)
        except RuntimeError as e:
            raise LayerwiseError(
                f"could not register the layer-wise DDP communication hook ({e}); DDP allows one hook per "
                "model: pass your own hook as LayerwiseUpdater(..., comm_hook=hook) instead") from e

    def _ddp_hook(self, state, bucket):  # no annotations: DDP checks them against its own types
        """All-reduce the bucket, then (once that has completed) step the bucket's parameters."""
        fut = self._comm_hook(state, bucket)
        if not self._attached:
            return fut
        buffer = bucket.buffer()
        params = list(bucket.parameters())
        layouts = [(g.size(), g.stride(), g.storage_offset() - buffer.storage_offset())
                   for g in bucket.gradients()]
        self._note_backward()

        def step_bucket(f: torch.futures.Future) -> Tensor:
            out = f.value()
            reduced = out[0] if isinstance(out, (list, tuple)) else out
            for p, (size, stride, offset) in zip(params, layouts):
                if id(p) in self._managed:
                    self._step_param(p, reduced.as_strided(size, stride, reduced.storage_offset() + offset))
            return reduced

        return fut.then(step_bucket)
