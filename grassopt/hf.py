"""Hugging Face ``transformers.Trainer`` with a grassopt optimizer.

Two recipes; both build :class:`~grassopt.SubspaceAdamW` from the model with
:func:`grassopt.param_groups`, take ``learning_rate``, ``adam_beta1/2``, ``adam_epsilon`` and
``weight_decay`` from the ``TrainingArguments``, and pick the projected layers from
``args.optim_target_modules`` with Hugging Face's matching rule (:func:`grassopt.targets.hf_target_names`).
The Trainer keeps doing everything else: its LR scheduler (``lr_scheduler_type``, warmup), global
gradient clipping (``max_grad_norm``), gradient accumulation, checkpoints (``optimizer.pt`` is the
optimizer's ``state_dict``, bases and random-generator states included; it loads with
``weights_only=True``) and ``resume_from_checkpoint``.

1. Build the optimizer yourself and hand it over (any transformers version)::

       args = TrainingArguments(output_dir="out", learning_rate=1e-3, optim_target_modules=["attn", "mlp"], ...)
       opt = grassopt.hf.make_optimizer(model, args, preset="subtrack++", rank=128, update_interval=200)
       trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

   ``None`` lets the Trainer create its scheduler on ``opt``. On resume, build ``opt`` the same
   way (the Trainer loads its state from the checkpoint).

2. Let the Trainer build it (``optimizer_cls_and_kwargs``, transformers >= 4.57 with optimizer
   factories, including 5.x)::

       trainer = Trainer(model=model, args=args, train_dataset=ds,
                         optimizer_cls_and_kwargs=grassopt.hf.optimizer_cls_and_kwargs(
                             args, preset="subtrack++", rank=128, update_interval=200))

   The Trainer calls the factory with the model, so the groups are built from exactly the model it
   trains. Explicit keyword arguments (``lr=...``, ``targets=...``) override ``args``.

Targets: a string in ``optim_target_modules`` is a regular expression that must match the whole
module name; a list matches a module whose name equals an entry, contains it, or fully matches it
as a regex (Hugging Face's ``check_target_module_exists``). ``"all-linear"`` projects every linear
layer *except the output layer* (``lm_head``), as grassopt and PEFT do (Hugging Face's own GaLore
integration also projects ``lm_head``). Without ``optim_target_modules`` the default is
``"all-linear"``. Only ``nn.Linear`` weights are projected; matrices whose short side is not larger
than the rank are trained with plain AdamW (with a warning).

Note the Adam convention: ``adam_epsilon`` is added to ``sqrt(V)`` before bias correction (GaLore's
convention, docs/algorithms.md#projected-step). The Trainer's default ``adam_epsilon=1e-8`` is used as given;
grassopt's own default is ``1e-6``.

Layer-wise updates (:mod:`grassopt.layerwise`) do not combine with the Trainer, which calls
``optimizer.step()`` and clips the global gradient norm itself; use them in your own loop or in
``grassopt train --layerwise``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, cast

from torch import nn

from .optimizer import SubspaceAdamW
from . import registry
from .targets import hf_target_names

__all__ = ["make_optimizer", "optimizer_cls_and_kwargs", "SubspaceAdamWFactory", "args_hyperparameters"]


def args_hyperparameters(args: Any | None) -> dict[str, Any]:
    """``lr``, ``betas``, ``eps``, ``weight_decay`` from ``TrainingArguments`` (empty for ``None``)."""
    if args is None:
        return {}
    return {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
            "weight_decay": args.weight_decay}


def make_optimizer(model: nn.Module, args: Any | None = None, preset: str = "subtrack++",
                   rank: int | str | None = None,
                   update_interval: int | None = None, targets: str | Iterable[str] | None = None, *,
                   seed: int | None = None, **overrides: Any) -> SubspaceAdamW:
    """A :class:`~grassopt.SubspaceAdamW` for ``model`` configured from Trainer ``args``.

    ``rank`` defaults to the preset's own (:func:`grassopt.presets.default_rank`: 1 for ``apollo-mini``,
    ``"d/4"`` for ``apollo``, else 128). ``targets`` defaults to ``args.optim_target_modules`` (then
    ``"all-linear"``); ``seed`` to ``args.seed`` (the random rules' generators). ``lr``, ``betas``,
    ``eps``, ``weight_decay`` come
    from ``args`` unless given in ``overrides``; ``plain_lr`` and ``plain_weight_decay`` (default: the
    same as ``lr`` / ``weight_decay``) are those of the parameters that are not projected (embedding,
    head, norms, biases; the Trainer's scheduler scales every group's rate by the same factor); other
    ``overrides`` are subspace options (``alpha``, ``step_size``, ``transport``, ...).
    """
    hyper = args_hyperparameters(args)
    for key in ("lr", "betas", "eps", "weight_decay", "plain_lr", "plain_weight_decay"):
        if key in overrides:
            hyper[key] = overrides.pop(key)
    if targets is None and args is not None:
        targets = getattr(args, "optim_target_modules", None)
    if seed is None:
        seed = getattr(args, "seed", 0) if args is not None else 0
    names = hf_target_names(model, targets)
    patterns = names if isinstance(names, str) else [f"^{re.escape(n)}$" for n in names]
    if preset not in registry.PRESETS:
        raise ValueError(f"unknown preset {preset!r} for grassopt.hf; choose one of {sorted(registry.PRESETS)}")
    opt = registry.build(preset, model, rank=rank, update_interval=update_interval, targets=patterns, seed=seed,
                         options=overrides, **hyper)
    return cast(SubspaceAdamW, opt)  # (every preset of grassopt.PRESETS builds one)


class SubspaceAdamWFactory:
    """An optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(SubspaceAdamWFactory, kwargs))``.

    The Trainer instantiates it without arguments and calls it as ``factory(model, **kwargs)``;
    ``kwargs`` are those of :func:`make_optimizer` (with ``args``).
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> SubspaceAdamW:
        return make_optimizer(model, **kwargs)


def optimizer_cls_and_kwargs(args: Any | None = None, preset: str = "subtrack++", rank: int | str | None = None,
                             update_interval: int | None = None, targets: str | Iterable[str] | None = None,
                             **overrides: Any) -> tuple[type, dict[str, Any]]:
    """The ``optimizer_cls_and_kwargs`` tuple for ``transformers.Trainer`` (see the module docstring).

    Needs a transformers version whose Trainer accepts optimizer factories (it calls a
    non-``Optimizer`` class as ``cls()(model, **kwargs)``); with an older one, use
    :func:`make_optimizer` and ``Trainer(optimizers=(opt, None))``.
    """
    try:
        from transformers import trainer as _trainer
    except ImportError as e:  # pragma: no cover - only without transformers
        raise ImportError("grassopt.hf needs transformers (pip install transformers)") from e
    if not hasattr(_trainer, "is_optimizer_factory"):
        raise RuntimeError(
            "this transformers version has no optimizer factories in Trainer.create_optimizer; use "
            "opt = grassopt.hf.make_optimizer(model, args, ...) and Trainer(..., optimizers=(opt, None))")
    kwargs = dict(args=args, preset=preset, rank=rank, update_interval=update_interval, targets=targets,
                  **overrides)
    return SubspaceAdamWFactory, kwargs
