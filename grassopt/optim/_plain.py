"""AdamW of a plain param group, as a function of explicit lists (the maths of ``SubspaceAdamW``'s plain groups)."""

from __future__ import annotations

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
    for j, (p, g, st) in enumerate(zip(params, grads, states)):
        st["step"] += 1
        if codec.DENSE and p.dtype == torch.float32 and g.dtype == torch.float32 and int8_module(p) is None:
            batches.setdefault(st["step"], []).append(j)
        elif kernels is None or not _compiled.adam_tensor_(
                kernels, p, g, st, st["step"], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, codec=codec,
                generator=generators[j]):
            F.adam_tensor_(p, g, st, st["step"], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           generator=generators[j], state_generator=state_generators[j], fused=fused, codec=codec)
    for t, idx in batches.items():
        ms, vs = zip(*(codec.tensors(states[j]) for j in idx))
        F.adam_([params[j] for j in idx], [grads[j] for j in idx], list(ms), list(vs), t, lr=lr, betas=betas,
                eps=eps, weight_decay=weight_decay, fused=fused)
