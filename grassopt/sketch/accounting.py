"""Measure the bytes a forward pass saves for its backward pass, per module and in total.

``saved_activation_bytes(model, forward_fn)`` runs ``forward_fn()`` under
``torch.autograd.graph.saved_tensors_hooks`` and records every tensor autograd saves:

- a saved tensor is counted by its *storage* (a view keeps its whole storage alive), and a storage
  saved several times (``x`` saved by q, k and v; one ``x P`` shared by a projection group) is
  counted once, for the first module that saved it;
- it is attributed to the innermost module whose ``forward`` was running when it was saved
  (forward pre/post hooks keep a stack); code outside any module of ``model`` is ``"(outside)"``
  and the model's own ``forward`` (e.g. the loss) is ``"(root)"``;
- only what the graph still holds when ``forward_fn`` returns counts (a part of the graph that
  ``forward_fn`` builds and drops is freed with it);
- storages of the model's parameters and buffers and the current sketch matrices ``P`` are
  resident model state, not activations: they are reported apart (``resident``), never in ``total``.

The measured bytes are what the autograd graph holds when the forward pass ends, which is the
activation memory of a training step (before the backward pass starts freeing it).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ActivationReport", "saved_activation_bytes"]

_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


@dataclass
class ActivationReport:
    """Result of :func:`saved_activation_bytes`.

    ``total``: bytes of the distinct activation storages saved for backward; ``by_module``: the same
    bytes by module name (``"(root)"``, ``"(outside)"`` included; modules that saved nothing new are
    absent); ``resident``: bytes of saved parameters, buffers and sketch matrices (not in ``total``);
    ``tensors``: number of distinct activation storages; ``output``: what ``forward_fn`` returned.
    """

    total: int
    by_module: dict[str, int]
    resident: int
    tensors: int
    output: Any = field(default=None, repr=False)

    def by_block(self) -> dict[str, int]:
        """Bytes by block: modules grouped by their first ``name.<int>`` prefix (``layers.0``,
        ``model.layers.3``); other modules keep their name's first component."""
        out: dict[str, int] = {}
        for name, b in self.by_module.items():
            m = _BLOCK.match(name)
            key = m.group(1) if m else name.split(".")[0]
            out[key] = out.get(key, 0) + b
        return out

    def prefixed(self, prefix: str) -> int:
        """Bytes of the modules whose name is ``prefix`` or starts with ``prefix + "."``."""
        return sum(b for n, b in self.by_module.items() if n == prefix or n.startswith(prefix + "."))

    def table(self, top: int | None = None) -> str:
        """A plain-text table of the modules, largest first."""
        rows = sorted(self.by_module.items(), key=lambda kv: -kv[1])[:top]
        width = max([len(n) for n, _ in rows] + [6])
        lines = [f"{'module':<{width}}  {'bytes':>14}  share"]
        for n, b in rows:
            lines.append(f"{n:<{width}}  {b:>14,}  {b / max(self.total, 1):6.1%}")
        lines.append(f"{'total':<{width}}  {self.total:>14,}")
        return "\n".join(lines)


class _Saved:
    """What the graph holds instead of a saved tensor while it is measured: a weak reference to
    this holder tells whether the graph still holds the tensor (the tensor itself may live on
    elsewhere, e.g. a leaf input the caller keeps)."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: Tensor):
        self.t = t


def _unpack(h: _Saved) -> Tensor:
    return h.t


def _storage_key(t: Tensor) -> tuple[Any, int]:
    """An identity for ``t``'s storage and its size in bytes."""
    try:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        return ((t.device, ptr) if ptr else ("storage", st._cdata)), st.nbytes()
    except (RuntimeError, NotImplementedError, AttributeError):  # tensors without a storage
        return ("tensor", id(t)), t.numel() * t.element_size()


def _resident_keys(model: nn.Module) -> set:
    keys = {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}
    from .layer import SketchedLinear  # local: accounting works on any model

    for m in model.modules():
        if isinstance(m, SketchedLinear) and m.group is not None:
            keys.update(_storage_key(p)[0] for p in m.group.cached_matrices())
    return keys


def saved_activation_bytes(model: nn.Module, forward_fn: Callable[[], Any]) -> ActivationReport:
    """Run ``forward_fn()`` (a forward pass through ``model``) and measure what it saves for backward.

    Example::

        rep = saved_activation_bytes(model, lambda: model(x, y)[1])
        rep.output.backward()            # the loss, as forward_fn returned it
        print(rep.total, rep.by_block())
    """
    names = {id(m): (name or "(root)") for name, m in model.named_modules()}
    stack: list[str] = []
    handles = []

    def pre(mod, args):
        stack.append(names[id(mod)])

    def post(mod, args, out):
        if stack:
            stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    records: dict[Any, tuple[int, str, list]] = {}
    hold: list[_Saved] = []  # keeps every saved storage alive during the pass: no address is reused

    def pack(t: Tensor) -> _Saved:
        key, nbytes = _storage_key(t)
        rec = records.get(key)
        if rec is None:
            rec = records[key] = (nbytes, stack[-1] if stack else "(outside)", [])
        h = _Saved(t)
        rec[2].append(weakref.ref(h))
        hold.append(h)
        return h

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            output = forward_fn()
    finally:
        for h in handles:
            h.remove()
    hold.clear()  # what a discarded part of the graph saved is freed now, and not counted
    resident_keys = _resident_keys(model)
    total = resident = count = 0
    by_module: dict[str, int] = {}
    for key, (nbytes, owner, refs) in records.items():
        if not any(r() is not None for r in refs):
            continue
        if key in resident_keys:
            resident += nbytes
            continue
        total += nbytes
        count += 1
        by_module[owner] = by_module.get(owner, 0) + nbytes
    return ActivationReport(total=total, by_module=by_module, resident=resident, tensors=count, output=output)
