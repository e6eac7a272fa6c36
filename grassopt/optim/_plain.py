"""AdamW of a plain param group, as a function of explicit lists (the maths of ``SubspaceAdamW``'s plain groups)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from .. import functional as F
from ..codecs import Codec
from ..qlinear import int8_module
from . import _compiled

__all__ = ["plain_adamw_"]


def plain_adamw_(params: list[Tensor], grads: list[Tensor], states: list[dict], *, codec: Codec, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, fused: bool | None,
                 generators: list[torch.Generator | None], state_generators: list[torch.Generator | None],
                 kernels: _compiled.Kernels | None = None) -> None:
    """One AdamW step of each parameter, its state already initialised (``step`` is incremented here).

    float32 parameters and gradients with dense (float32) moments are stepped in one fused call per
    step count; the others one tensor at a time, a chunk at a time (``generators``: stochastic
    rounding of a low-precision parameter (bf16, or an int8 weight of ``grassopt.qlinear``), or None; ``state_generators``: for a codec that rounds
    stochastically, or None). ``kernels`` (``compile=True``): the others run compiled where they can
    (:func:`grassopt.optim._compiled.adam_tensor_`).
    """
    batches: dict[int, list[int]] = {}
    compiled: dict[int, list[int]] = {}
    for j, (p, g, st) in enumerate(zip(params, grads, states)):
        st["step"] += 1
        if codec.DENSE and p.dtype == torch.float32 and g.dtype == torch.float32 and int8_module(p) is None:
            batches.setdefault(st["step"], []).append(j)
        elif kernels is not None and int8_module(p) is None and _compiled.ready(kernels, p, g, st, codec, generators[j]):
            compiled.setdefault(st["step"], []).append(j)
        else:
            _eager_tensor_(j, params, grads, states, codec=codec, lr=lr, betas=betas, eps=eps,
                           weight_decay=weight_decay, fused=fused, generators=generators,
                           state_generators=state_generators)
    for t, idx in compiled.items():
        if not _compiled.adam_tensors_(cast(_compiled.Kernels, kernels), [params[j] for j in idx],
                                       [grads[j] for j in idx], [states[j] for j in idx], t, lr=lr, betas=betas,
                                       eps=eps, weight_decay=weight_decay, codec=codec,
                                       generators=[generators[j] for j in idx]):
            for j in idx:
                _eager_tensor_(j, params, grads, states, codec=codec, lr=lr, betas=betas, eps=eps,
                               weight_decay=weight_decay, fused=fused, generators=generators,
                               state_generators=state_generators)
    for t, idx in batches.items():
        ms, vs = zip(*(codec.tensors(states[j]) for j in idx))
        F.adam_([params[j] for j in idx], [grads[j] for j in idx], list(ms), list(vs), t, lr=lr, betas=betas,
                eps=eps, weight_decay=weight_decay, fused=fused)


def _eager_tensor_(j: int, params: list[Tensor], grads: list[Tensor], states: list[dict], *, codec: Codec, lr: float,
                   betas: tuple[float, float], eps: float, weight_decay: float, fused: bool | None,
                   generators: list[torch.Generator | None], state_generators: list[torch.Generator | None]) -> None:
    """The eager step of tensor ``j`` (one at a time, a chunk at a time)."""
    st = states[j]
    F.adam_tensor_(params[j], grads[j], st, st["step"], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                   generator=generators[j], state_generator=state_generators[j], fused=fused, codec=codec)
