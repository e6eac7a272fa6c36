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

**int8 state** (``state_dtype="int8"``). Each moment tensor is stored as one byte per element plus
one float32 scale per block of ``BLOCK = 256`` consecutive elements of the flattened tensor:
``n + 4 ceil(n / 256)`` bytes for ``n`` elements (:func:`int8_bytes`). The codes are non-linear,
because Adam's second moment spans many orders of magnitude inside a block:

- ``M`` (signed): ``u = M / max|M|`` per block, code ``c = round(127 sign(u) sqrt|u|)`` (``int8``),
  decoded ``M = max|M| c |c| / 127^2``; absolute error ``<= max|M| (sqrt|u| / 127 + 1 / (4 127^2))``,
  about ``1/|c|`` relative to the value;
- ``V`` (non-negative): ``u = V / max V`` per block, code ``c = round(255 u^(1/4))`` (``uint8``),
  decoded ``V = max V (c / 255)^4``; absolute error ``<= 2 max V (u^(1/4) + 0.5/255)^3 / 255``, so
  ``sqrt(V)`` is off by about ``1/c`` relative: 0.4% at the block maximum, where the largest steps are
  decided, coarser far below it; values down to ``(0.5/255)^4 max V ~ 1.5e-11 max V`` are not
  rounded to zero.

This map was chosen by measurement (``benchmarks/low_bit.md``) over a code uniform in ``log2 V``
(2.2% on ``sqrt(V)`` everywhere) and over stochastic rounding of either: on ``tiny`` it came closest
to float32 (+0.08% eval loss against +0.20% to +0.36%, one seed). The block maximum is exact (its
code is the top one), so a block whose entries all decay by ``b2`` keeps its codes and decays
exactly through its scale. But an element whose ratio to its block maximum changes by less than half
a code step per step (``1 - beta2 = 0.1%`` is less than every step of an 8-bit code) keeps its code
under round-to-nearest: ``V`` stalls, as bf16 storage does (the measurement shows both).
Stochastic rounding removes the stall but adds noise, and did not train better here. The
alternatives stay selectable (:data:`V_CODE`, :data:`V_ROUNDING`) so that the measurement can be rerun.

An element of ``M`` is rounded to zero when ``|M| < (0.5/127)^2 max|M|``, and one of ``V`` when
``sqrt(V) < (0.5/255)^2 sqrt(max V)``, four times lower; with comparable block maxima a ``V`` that
rounds to zero meets an ``M`` that did too (a heuristic, not a guarantee: eps bounds the step
otherwise). The step dequantizes a chunk at a time (:data:`CHUNK` elements: bounded transient
memory), runs the float32 Adam on it and requantizes.

**Stochastic rounding** (:func:`stochastic_round_`). A bf16 weight cannot take an update smaller
than half its ulp: rounded to nearest it is lost, and training stalls. Rounding up with
probability equal to the remainder's share of the ulp keeps the update in expectation. The random
bits come from a generator the caller owns (the optimizer's per-parameter generators, seeded and
checkpointed), so runs are reproducible, resumable and identical on every data-parallel rank.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "CHUNK",
    "STATE_DTYPES",
    "fused_available",
    "adam_",
    "adam_direction",
    "adam_tensor_",
    "direction_tensor",
    "int8_bytes",
    "Int8Moments",
    "quantize_signed_",
    "dequantize_signed",
    "quantize_unsigned_",
    "dequantize_unsigned",
    "stochastic_round_",
]

#: Elements per quantization block (one float32 scale each).
BLOCK = 256
#: Elements dequantized at a time by the int8 step (a multiple of BLOCK): bounds transient memory.
CHUNK = 1 << 20
#: The state dtypes a param group may ask for.
STATE_DTYPES = ("float32", "int8")


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
    return denom


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


def adam_direction(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], step: int, *,
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
        return n
    torch._foreach_copy_(out, n)
    return out


# ---------------------------------------------------------------------------------------- int8 state
def int8_bytes(numel: int) -> int:
    """Bytes of one int8-quantized moment of ``numel`` elements: codes plus a float32 scale per block."""
    return numel + 4 * math.ceil(numel / BLOCK)


def _blocks(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """The flat tensor ``x`` as full blocks ``(n // BLOCK, BLOCK)`` and its partial tail (or None)."""
    n = x.numel()
    full = n - n % BLOCK
    head = x[:full].view(-1, BLOCK)
    return head, (x[full:].unsqueeze(0) if full < n else None)


def _block_max(x: Tensor, signed: bool = True) -> Tensor:
    """Per-block ``max |x|`` of a flat float32 tensor, one value per block (the last may be partial);
    ``signed=False`` for a non-negative ``x``. Reductions straight over ``x``: no full-size temporary."""
    def bmax(b: Tensor) -> Tensor:
        hi = torch.amax(b, dim=1)
        return torch.maximum(hi, torch.amin(b, dim=1).neg_()) if signed else hi

    head, tail = _blocks(x)
    parts = [bmax(head)] if head.numel() else []
    if tail is not None:
        parts.append(bmax(tail))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _pairs(x: Tensor, scales: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(block view, scale column)`` for the full blocks and the tail of the flat tensor ``x``."""
    n = x.numel()
    head, tail = _blocks(x)
    full = n // BLOCK
    out = [(head, scales[:full].unsqueeze(1))] if head.numel() else []
    if tail is not None:
        out.append((tail, scales[full:].unsqueeze(1)))
    return out


def _apply_blocks(x: Tensor, scales: Tensor, fn) -> None:
    """``fn(block_view, scale_column)`` on the full blocks and on the tail of the flat tensor ``x``."""
    for blk, s in _pairs(x, scales):
        fn(blk, s)


# Full-size temporaries are the int8 step's main cost on a CPU: a fresh multi-megabyte tensor is
# new memory from the OS, and faulting its pages in costs more than the arithmetic. The chunked step
# therefore works in float32 buffers of CHUNK elements kept per thread and device.
_SCRATCH = threading.local()


def _scratch(n: int, device: torch.device, k: int) -> list[Tensor] | None:
    """``k`` float32 work buffers of ``n`` elements (views of cached ``CHUNK``-sized ones), or None
    when ``n > CHUNK`` (a whole-tensor load: the caller allocates)."""
    if n > CHUNK:
        return None
    cache = getattr(_SCRATCH, "bufs", None)
    if cache is None:
        cache = _SCRATCH.bufs = {}
    bufs = cache.get(device)
    if bufs is None or len(bufs) < k or bufs[0].numel() < n:  # < n: CHUNK grew since (tests patch it)
        bufs = cache[device] = [torch.empty(CHUNK, dtype=torch.float32, device=device) for _ in range(k)]
    return [b[:n] for b in bufs[:k]]


def quantize_signed_(codes: Tensor, scales: Tensor, x: Tensor, work: Tensor | None = None) -> None:
    """Write the int8 codes and block scales of the flat float32 tensor ``x`` (the signed map of
    ``M``: ``round(127 sqrt(|x| / max|x|))`` with the sign of ``x``); ``work``: an optional float32
    buffer of ``x``'s size (else one is allocated)."""
    scales.copy_(_block_max(x))
    u = torch.abs(x, out=work) if work is not None else x.abs()
    tiny = torch.finfo(torch.float32).tiny
    _apply_blocks(u, scales, lambda blk, s: blk.div_(s.clamp_min(tiny)))  # in [0, 1]: |x| <= max|x|
    codes.copy_(u.sqrt_().mul_(127.0).round_().copysign_(x))


def dequantize_signed(codes: Tensor, scales: Tensor, out: Tensor | None = None,
                      work: Tensor | None = None) -> Tensor:
    """The flat float32 tensor of the int8 codes of ``M``: ``max|M| c |c| / 127^2`` per block
    (written into ``out`` when given, with ``work`` as a float32 buffer of the same size)."""
    c = codes.to(torch.float32) if work is None else work.copy_(codes)
    out = torch.square(c, out=out) if out is not None else c.square()
    out.copysign_(c)  # c |c|, exact in float32
    _apply_blocks(out, scales, lambda blk, s: blk.mul_(s * (1.0 / 127.0**2)))
    return out


#: The code map of ``V`` ("log": codes uniform in ``log2 V``, ``V_OCTAVES`` octaves below the block
#: maximum; "pow4": ``c = 255 u^(1/4)``) and its rounding ("nearest" or "stochastic"). Module-level
#: so that ``benchmarks/low_bit.py`` can measure the alternatives; the defaults are the measured choice.
V_CODE = "pow4"
V_ROUNDING = "nearest"
V_OCTAVES = 32.0


def _v_encode(u: Tensor) -> Tensor:
    """Fractional codes in ``[0, 255]`` of ``u = V / max V`` in ``[0, 1]`` (in place on ``u``)."""
    if V_CODE == "pow4":
        return u.sqrt_().sqrt_().mul_(255.0)
    return u.clamp_min_(torch.finfo(torch.float32).tiny).log2_().mul_(255.0 / V_OCTAVES).add_(255.0).clamp_min_(0.0)


def _v_decode(c: Tensor) -> Tensor:
    """``u`` of float codes ``c`` (in place on ``c``); code 0 is exactly 0."""
    if V_CODE == "pow4":
        return c.mul_(1.0 / 255.0).square_().square_()
    zero = c == 0
    return c.sub_(255.0).mul_(V_OCTAVES / 255.0).exp2_().masked_fill_(zero, 0.0)


def quantize_unsigned_(codes: Tensor, scales: Tensor, x: Tensor, generator: torch.Generator | None = None,
                       work: Tensor | None = None) -> None:
    """Write the uint8 codes and block scales of the flat non-negative tensor ``x`` (the map of ``V``;
    ``work``: an optional float32 buffer of ``x``'s size).

    With ``V_ROUNDING == "stochastic"`` (and a ``generator``) a value between two code levels is
    rounded up with probability proportional to its distance from the lower one (unbiased).
    """
    scales.copy_(_block_max(x, signed=False))
    u = x.clone() if work is None else work.copy_(x)
    tiny = torch.finfo(torch.float32).tiny
    _apply_blocks(u, scales, lambda blk, s: blk.div_(s.clamp_min(tiny)))  # in [0, 1]: 0 <= x <= max x
    if V_ROUNDING == "stochastic" and generator is not None:
        f = _v_encode(u.clone())
        lo = f.floor_().clamp_max_(254.0)
        d_lo = _v_decode(lo.clone())
        d_hi = _v_decode(lo + 1.0)
        p = (u - d_lo).div_((d_hi - d_lo).clamp_min_(torch.finfo(torch.float32).tiny)).clamp_(0.0, 1.0)
        up = torch.rand(p.shape, generator=generator, device=p.device) < p
        codes.copy_(lo.add_(up))
    else:
        codes.copy_(_v_encode(u).round_())


def dequantize_unsigned(codes: Tensor, scales: Tensor, out: Tensor | None = None) -> Tensor:
    """The flat float32 tensor of the uint8 codes of ``V`` (``max V`` times the decoded code; written
    into ``out`` when given)."""
    out = _v_decode(codes.to(torch.float32) if out is None else out.copy_(codes))
    _apply_blocks(out, scales, lambda blk, s: blk.mul_(s))
    return out


class Int8Moments:
    """Views of one tensor's int8 Adam moments in an optimizer state dict (``exp_avg`` int8 codes,
    ``exp_avg_sq`` uint8 codes, and their ``*_scale`` float32 block scales)."""

    KEYS = ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")

    @staticmethod
    def init(state: dict, shape: torch.Size | tuple[int, ...], device) -> None:
        n = math.prod(shape)
        nb = math.ceil(n / BLOCK)
        state["exp_avg"] = torch.zeros(shape, dtype=torch.int8, device=device)
        state["exp_avg_scale"] = torch.zeros(nb, dtype=torch.float32, device=device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.uint8, device=device)
        state["exp_avg_sq_scale"] = torch.zeros(nb, dtype=torch.float32, device=device)

    @staticmethod
    def is_int8(state: dict) -> bool:
        return "exp_avg_scale" in state

    @staticmethod
    def load(state: dict, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor]:
        """Dequantized float32 ``(M, V)`` of flat elements ``[lo, hi)`` (``lo``, ``hi`` block-aligned).
        A chunk (at most ``CHUNK`` elements) lands in this thread's work buffers: valid until the
        next ``load`` on the device, so :meth:`store` it first."""
        hi = state["exp_avg"].numel() if hi is None else hi
        b0, b1 = lo // BLOCK, math.ceil(hi / BLOCK)
        bufs = _scratch(hi - lo, state["exp_avg"].device, 3)
        m = dequantize_signed(state["exp_avg"].view(-1)[lo:hi], state["exp_avg_scale"][b0:b1],
                              out=bufs[0] if bufs else None, work=bufs[2] if bufs else None)
        v = dequantize_unsigned(state["exp_avg_sq"].view(-1)[lo:hi], state["exp_avg_sq_scale"][b0:b1],
                                out=bufs[1] if bufs else None)
        return m, v

    @staticmethod
    def store(state: dict, m: Tensor, v: Tensor, lo: int = 0, generator: torch.Generator | None = None) -> None:
        """Quantize float32 flat ``m`` and ``v`` back into elements ``[lo, lo + m.numel())``."""
        hi = lo + m.numel()
        b0, b1 = lo // BLOCK, math.ceil(hi / BLOCK)
        bufs = _scratch(hi - lo, m.device, 3)
        work = bufs[2] if bufs else None
        quantize_signed_(state["exp_avg"].view(-1)[lo:hi], state["exp_avg_scale"][b0:b1], m, work=work)
        quantize_unsigned_(state["exp_avg_sq"].view(-1)[lo:hi], state["exp_avg_sq_scale"][b0:b1], v, generator,
                           work=work)

    @staticmethod
    def chunks(n: int):
        """Block-aligned ``(lo, hi)`` ranges covering ``n`` elements, ``CHUNK`` at a time."""
        return ((lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK))


# ------------------------------------------------------------------- one tensor, any state dtype
def _flat(t: Tensor) -> Tensor:
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


def adam_tensor_(param: Tensor, grad: Tensor, state: dict, step: int, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float = 0.0, generator: torch.Generator | None = None,
                 state_generator: torch.Generator | None = None, fused: bool | None = None) -> None:
    """One AdamW step on one tensor whose moments live in ``state`` as float32 or int8
    (:class:`Int8Moments`), whatever the parameter's dtype.

    The work runs in float32, :data:`CHUNK` elements at a time: a low-precision parameter is
    upcast one chunk at a time and written back by rounding to nearest, or stochastically
    (:func:`stochastic_round_`) when a ``generator`` is given; int8 moments are dequantized and
    requantized one chunk at a time. Transient memory is a few float32 chunks.
    """
    int8 = Int8Moments.is_int8(state)
    n = param.numel()
    pf, gf = _flat(param), _flat(grad)
    in_place = param.dtype == torch.float32 and pf.data_ptr() == param.data_ptr() and param.is_contiguous()
    for lo, hi in Int8Moments.chunks(n):
        w = pf[lo:hi] if in_place else pf[lo:hi].float()
        g = gf[lo:hi] if gf.dtype == torch.float32 else gf[lo:hi].float()
        if int8:
            m, v = Int8Moments.load(state, lo, hi)
        else:
            m, v = state["exp_avg"].view(-1)[lo:hi], state["exp_avg_sq"].view(-1)[lo:hi]
        adam_([w], [g], [m], [v], step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
        if int8:
            Int8Moments.store(state, m, v, lo, state_generator)
        if not in_place:
            if generator is not None:
                stochastic_round_(pf[lo:hi], w, generator)
            else:
                pf[lo:hi].copy_(w)
    if not in_place and not param.is_contiguous():
        param.copy_(pf.view_as(param))


def direction_tensor(grad: Tensor, state: dict, step: int, *, betas: tuple[float, float], eps: float,
                     scale: float = 1.0, generator: torch.Generator | None = None,
                     fused: bool | None = None) -> Tensor:
    """:func:`adam_direction` for one tensor whose moments are float32 or int8 in ``state``
    (``generator``: for stochastic rounding of int8 ``V``, see :data:`V_ROUNDING`)."""
    if not Int8Moments.is_int8(state):
        return adam_direction([grad], [state["exp_avg"]], [state["exp_avg_sq"]], step, betas=betas, eps=eps,
                              scale=scale, fused=fused)[0]
    out = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    of, gf = out.view(-1), _flat(grad)
    for lo, hi in Int8Moments.chunks(grad.numel()):
        m, v = Int8Moments.load(state, lo, hi)
        of[lo:hi] = adam_direction([gf[lo:hi]], [m], [v], step, betas=betas, eps=eps, scale=scale, fused=fused)[0]
        Int8Moments.store(state, m, v, lo, generator)
    return out


# ---------------------------------------------------------------------------- stochastic rounding
_SR_BITS = {torch.bfloat16: 16}


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None) -> None:
    """Write the float32 ``src`` into the bf16 tensor ``dst``, rounding stochastically (unbiased).

    Adds uniform random integers below ``2^16`` to the float32 bit pattern and truncates the low 16
    bits: a value is rounded away from zero with probability equal to the truncated remainder's
    share of the ulp, so ``E[dst] = src``. Infinities and NaNs pass through. Other destination
    dtypes (float32, float64) get a plain copy.
    """
    bits = _SR_BITS.get(dst.dtype)
    if bits is None:
        dst.copy_(src)
        return
    s = src.to(torch.float32).contiguous()
    noise = torch.randint(0, 1 << bits, s.shape, dtype=torch.int32, device=s.device, generator=generator)
    finite = s.isfinite()
    noise.mul_(finite)  # NaN and inf are copied exactly
    rounded = noise.add_(s.view(torch.int32)).bitwise_and_(-(1 << bits)).view(torch.float32)
    dst.copy_(rounded)
