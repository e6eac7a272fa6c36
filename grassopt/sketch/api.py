"""``sketch`` / ``unsketch`` a model in place, and the step counter of the estimator."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..targets import matching_modules, resolve_sketch_rank, select_targets
from .laws import check_law
from .layer import SHARES, SketchedLinear, SketchState, check_mode

__all__ = ["sketch", "unsketch", "next_step", "attach", "sketched_layers", "sketch_states", "current_step"]

Rank = int | float | Callable[[str, nn.Linear], int]


def sketched_layers(model: nn.Module) -> list[tuple[str, SketchedLinear]]:
    """The sketched layers of ``model`` (each once), in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SketchedLinear)]


def sketch_states(model: nn.Module) -> list[SketchState]:
    """The distinct :class:`SketchState` objects of the sketched layers of ``model``."""
    out: list[SketchState] = []
    for _, m in sketched_layers(model):
        if not any(s is m._state for s in out):
            out.append(m._state)
    return out


def current_step(model: nn.Module) -> int:
    """The step that indexes ``model``'s sketch matrices (the estimator's optimizer step, or RSO's
    outer iteration)."""
    states = sketch_states(model)
    if not states:
        raise ValueError("the model has no sketched layers; call grassopt.sketch.sketch(model, ...) first")
    return states[0].step


def _select(model: nn.Module, targets: str | Iterable[str]) -> list[tuple[str, nn.Linear]]:
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError("targets is empty; pass 'all-linear' or module-name patterns such as ['attn', 'mlp']")
    for pat in patterns:
        if not isinstance(pat, str):
            raise ValueError(f"targets must be strings (names, substrings or regexes), got {pat!r}")
        if pat == "all-linear" or select_targets(model, [pat]):
            continue
        hits = matching_modules(model, pat)
        if not hits:
            raise ValueError(f"target {pat!r} matches no module of the model; use module names as printed by "
                             "model.named_modules(), regexes, or 'all-linear'")
        what = ", ".join(f"{n} ({type(m).__name__})" for n, m in hits[:4]) + (" ..." if len(hits) > 4 else "")
        if any(isinstance(m, nn.Linear) for _, m in hits):
            raise ValueError(f"target {pat!r} matches {what}, whose weight is tied to an embedding; a tied "
                             "layer cannot be sketched: leave it out of targets")
        raise ValueError(f"target {pat!r} matches {what}, which is not an nn.Linear: only nn.Linear layers "
                         "can be sketched; name the linear layers inside it (e.g. 'q_proj') or use "
                         "targets='all-linear'")
    chosen = []
    for name, mod in select_targets(model, patterns):
        if type(mod) is not nn.Linear:
            msg = (f"{name} is a {type(mod).__name__}, a subclass of nn.Linear with its own behaviour; only plain "
                   "nn.Linear layers can be sketched")
            if "all-linear" in patterns:
                warnings.warn(msg + "; it is left as it is", stacklevel=3)
                continue
            raise ValueError(msg + "; leave it out of targets")
        chosen.append((name, mod))
    if not chosen:
        raise ValueError(f"targets={targets!r} selects no nn.Linear layer of the model")
    return chosen


def sketch(model: nn.Module, rank: Rank, *, law: str = "haar", targets: str | Iterable[str] = "all-linear",
           mode: str = "estimator", seed: int = 0, share: str | None = "input") -> nn.Module:
    """Swap the ``nn.Linear`` layers selected by ``targets`` for :class:`SketchedLinear`, in place.

    Args:
        model: the model (not yet wrapped in DDP/FSDP: wrap it after sketching).
        rank: sketch rank ``r`` per layer: an int, a float in (0, 1) (that fraction of each layer's
            ``in_features``, rounded), or ``callable(name, linear) -> int``. Must satisfy
            ``1 <= r < in_features``.
        law: ``"haar"`` (default, minimum variance), ``"gaussian"`` or ``"coordinate"``.
        targets: ``"all-linear"`` (every linear layer but the output layer), names, substrings or
            regexes, as :func:`grassopt.select_targets`.
        mode: ``"estimator"`` (``W.grad = G P P^T``; call :func:`next_step` after every optimizer
            step) or ``"rso"`` (``W`` frozen, trainable ``B``; use :func:`grassopt.sketch.rso`).
        seed: global seed of the sketch matrices (with the step and the layer group).
        share: ``"input"``: layers that read the same input tensor share ``P`` and ``x P``;
            ``None``: one ``P`` per layer.

    Returns ``model``. The weight and bias Parameter objects stay the same, so an optimizer built
    before or after works, and ``state_dict`` keeps their keys (plus each layer's ``_extra_state``
    and, for RSO, ``B``). Forward hooks registered on the replaced layers are not carried over.
    """
    check_mode(mode)
    check_law(law)
    if share not in SHARES:
        raise ValueError(f"share={share!r} must be 'input' or None")
    if sketched_layers(model):
        raise ValueError("the model is already sketched; call grassopt.sketch.unsketch(model) first")
    chosen = _select(model, targets)
    ranks = [resolve_sketch_rank(rank, name, mod) for name, mod in chosen]
    state = SketchState(mode, law, seed, share)
    replacement = {id(mod): SketchedLinear(mod, r, state, i, name)
                   for i, ((name, mod), r) in enumerate(zip(chosen, ranks))}
    _swap(model, replacement)
    return model


def _swap(model: nn.Module, replacement: Mapping[int, nn.Module]) -> None:
    """Replace child modules by id, at every place they occur (shared modules included)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = replacement.get(id(child))
            if new is not None:
                setattr(parent, child_name, new)


@torch.no_grad()
def unsketch(model: nn.Module) -> nn.Module:
    """Restore plain ``nn.Linear`` layers in place (same weight and bias Parameter objects).

    RSO layers first merge their pending low-rank part, ``W <- W + B P^T`` in at least float32, so
    the model computes exactly what it computed before (the weight decay an unfinished RSO outer
    iteration has accumulated is applied only by :meth:`RSO.merge`). The weight's
    ``requires_grad`` flag is restored. Returns ``model``.
    """
    replacement: dict[int, nn.Module] = {}
    for name, layer in sketched_layers(model):
        w = layer.weight
        if layer.B is not None and bool(layer.B.ne(0).any()):
            p = layer.projection_matrix()
            if p is None:  # pragma: no cover - B only moves after a forward pass, which sets the group
                raise RuntimeError(f"{name}: B is not zero but the layer has no sketch matrix")
            wm = w if w.dtype == p.dtype else w.to(p.dtype)
            wm.addmm_(layer.B.to(p.dtype), p.mT)
            if wm is not w:
                w.copy_(wm)
        w.requires_grad_(layer._weight_requires_grad)
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        lin.weight = w
        if layer.bias is not None:
            lin.bias = layer.bias
        lin.train(layer.training)
        replacement[id(layer)] = lin
    _swap(model, replacement)
    return model


def next_step(model: nn.Module, steps: int = 1) -> int:
    """Advance the estimator's step: the next forward pass draws fresh sketch matrices.

    Call it once after every optimizer step (not after every micro-batch: the micro-batches of one
    step share their ``P``), or let :func:`attach` do it. Returns the new step. RSO models advance
    through their optimizer and refuse this call.
    """
    states = sketch_states(model)
    if not states:
        raise ValueError("the model has no sketched layers; call grassopt.sketch.sketch(model, ...) first")
    for st in states:
        if st.mode == "rso":
            raise ValueError("RSO advances its outer iterations itself (grassopt.sketch.RSO.step); "
                             "do not call next_step on an RSO model")
    for st in states:
        st.step += int(steps)
    return states[0].step


def attach(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Call :func:`next_step` after every ``optimizer.step()`` (a step post-hook).

    Returns the hook handle (``handle.remove()`` detaches it). Useful when the training loop is not
    yours (Hugging Face ``Trainer``): a step skipped by a ``GradScaler`` keeps its ``P``. With
    layer-wise updates (:class:`grassopt.layerwise.LayerwiseUpdater`) the hook runs once per step, after
    the backward pass, so blocks recomputed by activation checkpointing in that backward pass use the
    ``P`` of their forward pass. (``P`` must never change between a forward pass and its backward.)
    """
    if not sketch_states(model):
        raise ValueError("the model has no sketched layers; call grassopt.sketch.sketch(model, ...) first")
    return optimizer.register_step_post_hook(lambda *_: next_step(model))  # type: ignore[arg-type]  # (return unused)
