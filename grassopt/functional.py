"""The one Adam of grassopt, in the GaLore family's convention, and the low-precision state it may keep.

Every place that runs Adam (the plain and projected groups of :class:`~grassopt.SubspaceAdamW`,
RSO's inner Adam, the Ackley demo) calls this module, so the convention exists once
(``docs/algorithms.md``, "Adam's convention"):

    M = b1 M + (1 - b1) G;   V = b2 V + (1 - b2) G*G;   N = M / (sqrt(V) + eps)
    W = W - lr_t N,  lr_t = lr sqrt(1 - b2^t) / (1 - b1^t);   then  W = W - lr wd W   (decay after)

**Dispatch.** Where torch has a fused Adam kernel for the device (``torch._fused_adamw_``: CPU,
CUDA, MPS, XPU, ...), it does the work in one pass over each tensor; elsewhere the ``foreach``
ops do. The kernel's own convention maps onto ours exactly:

- ``denom = sqrt(V) + eps`` with the step ``lr sqrt(bc2) / bc1`` equals the kernel's
  ``sqrt(V) / sqrt(bc2) + eps'`` with ``eps' = eps / sqrt(bc2)`` (``bc_i = 1 - b_i^t``), so the
  tensors of one call must share their step count ``t`` (callers group by it);
- the kernel decays *before* the update, ``W (1 - lr' wd') - ...``; calling it with
  ``lr' = lr (1 - lr wd)`` and ``wd' = wd / (1 - lr wd)`` gives ``(W - lr_t N)(1 - lr wd)``, which is
  the decay *after* the update of ``galore-torch``;
- for a projected matrix only ``N`` is wanted, not a weight update: the kernel writes
  ``scale * N`` into a zeroed buffer when called with ``lr' = -scale bc1 / sqrt(bc2)``.

**Moment formats** (a param group's ``state_dtype``). The moments may be stored in another format
than float32 (``int8``: block-wise quantized, see :mod:`grassopt.codecs.int8`). Each format is a codec
of :data:`grassopt.codecs.CODECS`; :func:`adam_tensor_` and :func:`direction_tensor_` run this Adam on
any of them, decoding a chunk of float32 moments at a time and encoding it back. A codec that keeps
a statistic of the whole tensor (``factored``: row and column sums of ``V``) updates its ``V`` first,
from the whole gradient (``Codec.UPDATES_V``); the chunks then read ``V`` as given.

**Stochastic rounding** (:func:`stochastic_round_`). A bf16 weight cannot take an update smaller
than half its ulp: rounded to nearest it is lost, and training stalls. Rounding up with
probability equal to the remainder's share of the ulp keeps the update in expectation. The random
bits come from a generator the caller owns (the optimizer's per-parameter generators, seeded and
checkpointed), so runs are reproducible, resumable and identical on every data-parallel rank.
Only bf16 is rounded stochastically: an fp16 weight is rounded to nearest (with a one-time warning).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .codecs import CODECS, Codec
from .qlinear import int8_module

__all__ = [
    "STATE_DTYPES",
    "fused_available",
    "adam_",
    "adam_direction_",
    "adam_tensor_",
    "direction_tensor_",
    "stochastic_round_",
]

#: The state dtypes a param group may ask for: the names of :data:`grassopt.codecs.CODECS`.
STATE_DTYPES = tuple(CODECS)


def _fused_devices() -> tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return ("cuda",)


_FUSED_DEVICES = _fused_devices()


def fused_available(tensors: Sequence[Tensor]) -> bool:
    """Whether torch's fused Adam kernel can step these tensors together: one device type that has
    the kernel, one floating dtype, dense, and not a tensor subclass (e.g. FSDP's DTensor)."""
    if not tensors or not hasattr(torch, "_fused_adamw_"):
        return False
    t0 = tensors[0]
    if t0.device.type not in _FUSED_DEVICES or not t0.dtype.is_floating_point:
        return False
    return all(type(t) is Tensor or type(t) is torch.nn.Parameter for t in tensors) and all(
        t.device == t0.device and t.dtype == t0.dtype and not t.is_sparse for t in tensors)


def _step_tensor(t: int, like: Tensor) -> Tensor:
    return torch.full((), float(t), dtype=torch.float32, device=like.device)


def _foreach_moments(ms: list[Tensor], vs: list[Tensor], gs: list[Tensor], b1: float, b2: float,
                     eps: float) -> list[Tensor]:
    """Update the moments in place with foreach ops and return ``sqrt(V) + eps``."""
    torch._foreach_lerp_(ms, gs, 1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_add_(denom, eps)
    return denom  # type: ignore[return-value]  # (a list at run time: the stubs say tuple)


def adam_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          step: int, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0,
          fused: bool | None = None) -> None:
    """One AdamW step in place on tensors that share the (already incremented) step count ``step``.

    ``fused=None`` picks torch's fused kernel when :func:`fused_available`; ``False`` forces the
    foreach path; ``True`` asks for the kernel on tensors the caller knows it supports.
    """
    if not params:
        return
    b1, b2 = betas
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    if fused is None:
        fused = fused_available([*params, *grads, *exp_avgs, *exp_avg_sqs])
    if fused and lr * weight_decay < 1:  # (lr wd >= 1 cannot be mapped: the weights would not survive anyway)
        decay = 1 - lr * weight_decay
        steps = [_step_tensor(step, params[0])] * len(params)
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr * decay, beta1=b1,
                            beta2=b2, weight_decay=weight_decay / decay, eps=eps / math.sqrt(bc2),
                            amsgrad=False, maximize=False)
        return
    denom = _foreach_moments(exp_avgs, exp_avg_sqs, grads, b1, b2, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr * math.sqrt(bc2) / bc1)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)


def adam_direction_(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], step: int, *,
                   betas: tuple[float, float], eps: float, scale: float = 1.0,
                   fused: bool | None = None, out: list[Tensor] | None = None) -> list[Tensor]:
    """Update the moments in place and return ``scale * M / (sqrt(V) + eps)`` (new tensors, or
    written into ``out``, which must hold zeros for the fused path).

    This is the projected groups' Adam: the direction is back-projected by the caller, not added
    to a weight. ``step`` is the shared (already incremented) step count; the bias correction is
    not in the result (the caller folds it into its step size).
    """
    if not grads:
        return []
    b1, b2 = betas
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    if fused is None:
        fused = fused_available([*grads, *exp_avgs, *exp_avg_sqs])
    if fused:
        if out is None:
            out = [torch.zeros_like(g) for g in grads]
        steps = [_step_tensor(step, grads[0])] * len(grads)
        torch._fused_adamw_(out, grads, exp_avgs, exp_avg_sqs, [], steps, lr=-scale * bc1 / math.sqrt(bc2),
                            beta1=b1, beta2=b2, weight_decay=0.0, eps=eps / math.sqrt(bc2), amsgrad=False,
                            maximize=False)
        return out
    n = torch._foreach_div(exp_avgs, _foreach_moments(exp_avgs, exp_avg_sqs, grads, b1, b2, eps))
    if scale != 1.0:
        torch._foreach_mul_(n, scale)
    if out is None:
        return n  # type: ignore[return-value]  # (as above)
    torch._foreach_copy_(out, n)
    return out


# ------------------------------------------------------------------- one tensor, any state dtype
def _flat(t: Tensor) -> Tensor:
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


def adam_tensor_(param: Tensor, grad: Tensor, state: dict, step: int, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float = 0.0, generator: torch.Generator | None = None,
                 state_generator: torch.Generator | None = None, fused: bool | None = None,
                 codec: Codec | None = None) -> None:
    """One AdamW step on one tensor whose moments live in ``state`` in the format of ``codec`` (a
    :class:`grassopt.codecs.Codec`; default float32), whatever the parameter's dtype.

    The work runs in float32, ``grassopt.codecs.CHUNK`` elements at a time: a low-precision
    parameter is upcast one chunk at a time and written back by rounding to nearest, or
    stochastically (:func:`stochastic_round_`) when a ``generator`` is given (an int8 weight of
    :mod:`grassopt.qlinear` is dequantized and requantized onto its grid the same way); the moments are
    decoded and encoded back one chunk at a time (``state_generator``: for a codec that rounds
    stochastically). Transient memory is a few float32 chunks.
    """
    codec = CODECS["float32"] if codec is None else codec
    n = param.numel()
    q8 = int8_module(param)  # an int8 weight: read and requantized a chunk at a time (grassopt.qlinear)
    pf, gf = (param if q8 is not None else _flat(param)), _flat(grad)
    in_place = (q8 is None and param.dtype == torch.float32 and pf.data_ptr() == param.data_ptr()
                and param.is_contiguous())
    if codec.UPDATES_V:
        codec.update_v_(state, grad, betas[1])
    for lo, hi in codec.chunks(n):
        w = q8.read(lo, hi) if q8 is not None else pf[lo:hi] if in_place else pf[lo:hi].float()
        g = gf[lo:hi] if gf.dtype == torch.float32 else gf[lo:hi].float()
        m, v = codec.load(state, lo, hi)
        if codec.UPDATES_V:
            _adam_given_v_(w, g, m, v, step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            codec.store_m(state, m, lo)
        else:
            adam_([w], [g], [m], [v], step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
            codec.store(state, m, v, lo, state_generator)
        if q8 is not None:
            q8.write_(w, lo, generator)
        elif not in_place:
            if generator is not None:
                stochastic_round_(pf[lo:hi], w, generator)
            else:
                pf[lo:hi].copy_(w)
    if q8 is None and not in_place and not param.is_contiguous():
        param.copy_(pf.view_as(param))


def direction_tensor_(grad: Tensor, state: dict, step: int, *, betas: tuple[float, float], eps: float,
                      scale: float = 1.0, generator: torch.Generator | None = None,
                      fused: bool | None = None, codec: Codec | None = None) -> Tensor:
    """:func:`adam_direction_` for one tensor whose moments are in ``state`` in the format of
    ``codec`` (default float32), a chunk at a time (``generator``: for a codec that rounds
    stochastically). Returns a new float32 tensor of ``grad``'s shape."""
    codec = CODECS["float32"] if codec is None else codec
    if codec.DENSE:
        m, v = codec.tensors(state)
        return adam_direction_([grad], [m], [v], step, betas=betas, eps=eps, scale=scale, fused=fused)[0]
    out = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    of, gf = out.view(-1), _flat(grad)
    if codec.UPDATES_V:
        codec.update_v_(state, grad, betas[1])
    for lo, hi in codec.chunks(grad.numel()):
        m, v = codec.load(state, lo, hi)
        if codec.UPDATES_V:
            g = gf[lo:hi] if gf.dtype == torch.float32 else gf[lo:hi].float()
            m.lerp_(g, 1 - betas[0])
            torch.div(m, v.sqrt().add_(eps), out=of[lo:hi])
            if scale != 1.0:
                of[lo:hi].mul_(scale)
            codec.store_m(state, m, lo)
        else:
            of[lo:hi] = adam_direction_([gf[lo:hi]], [m], [v], step, betas=betas, eps=eps, scale=scale,
                                        fused=fused)[0]
            codec.store(state, m, v, lo, generator)
    return out


def _adam_given_v_(w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, *, lr: float,
                   betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """:func:`adam_` on one chunk whose ``V`` the codec has already updated (``Codec.UPDATES_V``):
    ``M = b1 M + (1 - b1) G``, ``W = W - lr_t M / (sqrt(V) + eps)``, then the decay."""
    b1, b2 = betas
    m.lerp_(g, 1 - b1)
    w.addcdiv_(m, v.sqrt().add_(eps), value=-lr * math.sqrt(1 - b2**step) / (1 - b1**step))
    if weight_decay:
        w.mul_(1 - lr * weight_decay)


# ---------------------------------------------------------------------------- stochastic rounding
_SR_BITS = {torch.bfloat16: 16}


_FP16_WARNED = False


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None) -> None:
    """Write the float32 ``src`` into the bf16 tensor ``dst``, rounding stochastically (unbiased).

    Adds uniform random integers below ``2^16`` to the float32 bit pattern and truncates the low 16
    bits: a value is rounded away from zero with probability equal to the truncated remainder's
    share of the ulp, so ``E[dst] = src``. Infinities and NaNs pass through. Other destination
    dtypes (float32, float64) get a plain copy. **fp16 is rounded to nearest, not stochastically**
    (its exponent range differs from float32's, so the bit trick does not apply): a one-time
    ``UserWarning`` says so.
    """
    global _FP16_WARNED
    bits = _SR_BITS.get(dst.dtype)
    if bits is None:
        if dst.dtype == torch.float16 and not _FP16_WARNED:
            _FP16_WARNED = True
            warnings.warn("stochastic rounding is implemented for bf16 only: fp16 parameters are rounded to "
                          "nearest (small updates may be lost); use bf16 or float32 parameters", stacklevel=2)
        dst.copy_(src)
        return
    s = src.to(torch.float32).contiguous()
    noise = torch.randint(0, 1 << bits, s.shape, dtype=torch.int32, device=s.device, generator=generator)
    finite = s.isfinite()
    noise.mul_(finite)  # NaN and inf are copied exactly
    rounded = noise.add_(s.view(torch.int32)).bitwise_and_(-(1 << bits)).view(torch.float32)
    dst.copy_(rounded)
