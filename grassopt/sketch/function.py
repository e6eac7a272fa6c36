"""The autograd function of a sketched linear layer (docs/algorithms.md#sketches).

Forward ``y = x W^T (+ b) (+ (x P) B^T)``; the only activation saved for the backward pass is
``xp = x P`` (``tokens x r``), computed by the caller without a graph so that layers reading the
same input can share one ``xp``. Backward, with ``dy`` the output gradient:

- ``dx = dy W (+ (dy B) P^T)``                                (exact);
- ``dW = (dy^T xp) P^T = G P P^T``                             (the lifted estimate of ``G = dy^T x``);
- ``dB = dy^T xp = G_eff P``                                   (exact gradient of the low-rank variable);
- ``db = sum of dy over tokens``                               (exact).

``W``, ``P`` and ``B`` are saved too, but they are resident model state (a parameter, the step's
sketch matrix, a parameter), not activations: saving them costs no memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SketchedLinearFunction", "sketched_linear"]


class SketchedLinearFunction(torch.autograd.Function):
    """``(x, xp, weight, bias, p, b) -> x W^T + bias + xp B^T``; see the module docstring.

    ``xp`` must equal ``x @ p`` and must not require grad. ``bias`` and ``b`` may be ``None``.
    All tensors share one dtype and device.
    """

    @staticmethod
    def forward(ctx, x: Tensor, xp: Tensor, weight: Tensor, bias: Tensor | None, p: Tensor,
                b: Tensor | None) -> Tensor:
        y = torch.nn.functional.linear(x, weight, bias)
        if b is not None:
            y.add_(torch.matmul(xp, b.mT))
        ctx.save_for_backward(xp, weight, p, b)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        xp, weight, p, b = ctx.saved_tensors
        need_x, _, need_w, need_bias, _, need_b = ctx.needs_input_grad
        dx = dw = dbias = db = None
        if need_x:
            dx = torch.matmul(dy, weight)
            if b is not None:
                dx = dx + torch.matmul(torch.matmul(dy, b), p.mT)
        if need_w or need_b or need_bias:
            dy2 = dy.reshape(-1, dy.shape[-1])
            if need_w or need_b:
                low = dy2.mT @ xp.reshape(-1, xp.shape[-1])  # m x r: G P (of the effective weight)
                if need_b:
                    db = low
                if need_w:
                    dw = low @ p.mT  # G P P^T
            if need_bias and ctx.has_bias:
                dbias = dy2.sum(0)
        return dx, None, dw, dbias, None, db


def sketched_linear(x: Tensor, xp: Tensor, weight: Tensor, bias: Tensor | None, p: Tensor,
                    b: Tensor | None = None) -> Tensor:
    """Functional form of :class:`SketchedLinearFunction`."""
    return SketchedLinearFunction.apply(x, xp, weight, bias, p, b)
