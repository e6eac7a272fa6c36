"""int8 moments (``state_dtype="int8"``). Each moment tensor is stored as one byte per element plus
one float32 scale per block of ``BLOCK = 256`` consecutive elements of the flattened tensor:
``n + 4 ceil(n / 256)`` bytes for ``n`` elements (:meth:`Int8.layout`). The codes are non-linear,
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
alternatives stay selectable (:data:`V_CODE`, :data:`V_ROUNDING`: the code new state is written with)
so that the measurement can be rerun; every state records the code that wrote it (``int8_code``, e.g.
``"pow4/nearest"``, saved in checkpoints), and is read and written with that code whatever the
defaults are now. A checkpoint written before the field existed was written with ``pow4/nearest``.

An element of ``M`` is rounded to zero when ``|M| < (0.5/127)^2 max|M|``, and one of ``V`` when
``sqrt(V) < (0.5/255)^2 sqrt(max V)``, four times lower; with comparable block maxima a ``V`` that
rounds to zero meets an ``M`` that did too (a heuristic, not a guarantee: eps bounds the step
otherwise). The step dequantizes a chunk at a time (``grassopt.codecs.CHUNK`` elements: bounded transient
memory), runs the float32 Adam on it and requantizes.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from torch import Tensor

from . import _base
from ._base import Codec, Layout

__all__ = ["BLOCK", "V_CODE", "V_ROUNDING", "CODES", "Int8", "quantize_signed_", "dequantize_signed",
           "quantize_unsigned_", "dequantize_unsigned"]

#: Elements per quantization block (one float32 scale each).
BLOCK = 256

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
    chunk = _base.CHUNK
    if n > chunk:
        return None
    cache = getattr(_SCRATCH, "bufs", None)
    if cache is None:
        cache = _SCRATCH.bufs = {}
    bufs = cache.get(device)
    if bufs is None or len(bufs) < k or bufs[0].numel() < n:  # < n: CHUNK grew since (tests patch it)
        bufs = cache[device] = [torch.empty(chunk, dtype=torch.float32, device=device) for _ in range(k)]
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


#: The code map of ``V`` new state is written with ("log": codes uniform in ``log2 V``, ``V_OCTAVES`` octaves below the block
#: maximum; "pow4": ``c = 255 u^(1/4)``) and its rounding ("nearest" or "stochastic"). Module-level
#: so that ``benchmarks/low_bit.py`` can measure the alternatives; the defaults are the measured choice.
V_CODE = "pow4"
V_ROUNDING = "nearest"
V_OCTAVES = 32.0


def _v_encode(u: Tensor, code: str) -> Tensor:
    """Fractional codes in ``[0, 255]`` of ``u = V / max V`` in ``[0, 1]`` (in place on ``u``)."""
    if code == "pow4":
        return u.sqrt_().sqrt_().mul_(255.0)
    return u.clamp_min_(torch.finfo(torch.float32).tiny).log2_().mul_(255.0 / V_OCTAVES).add_(255.0).clamp_min_(0.0)


def _v_decode(c: Tensor, code: str) -> Tensor:
    """``u`` of float codes ``c`` (in place on ``c``); code 0 is exactly 0."""
    if code == "pow4":
        return c.mul_(1.0 / 255.0).square_().square_()
    zero = c == 0
    return c.sub_(255.0).mul_(V_OCTAVES / 255.0).exp2_().masked_fill_(zero, 0.0)


def quantize_unsigned_(codes: Tensor, scales: Tensor, x: Tensor, generator: torch.Generator | None = None,
                       work: Tensor | None = None, *, code: str | None = None, rounding: str | None = None) -> None:
    """Write the uint8 codes and block scales of the flat non-negative tensor ``x`` (the map of ``V``
    ``code``, default :data:`V_CODE`; ``work``: an optional float32 buffer of ``x``'s size).

    With ``rounding == "stochastic"`` (default :data:`V_ROUNDING`) and a ``generator``, a value between
    two code levels is rounded up with probability proportional to its distance from the lower one
    (unbiased).
    """
    code = V_CODE if code is None else code
    rounding = V_ROUNDING if rounding is None else rounding
    scales.copy_(_block_max(x, signed=False))
    u = x.clone() if work is None else work.copy_(x)
    tiny = torch.finfo(torch.float32).tiny
    _apply_blocks(u, scales, lambda blk, s: blk.div_(s.clamp_min(tiny)))  # in [0, 1]: 0 <= x <= max x
    if rounding == "stochastic" and generator is not None:
        f = _v_encode(u.clone(), code)
        lo = f.floor_().clamp_max_(254.0)
        d_lo = _v_decode(lo.clone(), code)
        d_hi = _v_decode(lo + 1.0, code)
        p = (u - d_lo).div_((d_hi - d_lo).clamp_min_(torch.finfo(torch.float32).tiny)).clamp_(0.0, 1.0)
        up = torch.rand(p.shape, generator=generator, device=p.device) < p
        codes.copy_(lo.add_(up))
    else:
        codes.copy_(_v_encode(u, code).round_())


def dequantize_unsigned(codes: Tensor, scales: Tensor, out: Tensor | None = None, *,
                        code: str | None = None) -> Tensor:
    """The flat float32 tensor of the uint8 codes of ``V`` (``max V`` times the decoded ``code``,
    default :data:`V_CODE`; written into ``out`` when given)."""
    code = V_CODE if code is None else code
    out = _v_decode(codes.to(torch.float32) if out is None else out.copy_(codes), code)
    _apply_blocks(out, scales, lambda blk, s: blk.mul_(s))
    return out


#: The code maps of ``V`` and roundings a state may record.
CODES = ("pow4", "log")
ROUNDINGS = ("nearest", "stochastic")
#: What a checkpoint without an ``int8_code`` field was written with (the only code before the field).
LEGACY_CODE = "pow4/nearest"


def _code_of(state: dict) -> tuple[str, str]:
    code, _, rounding = state.get("int8_code", LEGACY_CODE).partition("/")
    return code, rounding


class Int8(Codec):
    """int8 moments: ``exp_avg`` int8 codes and ``exp_avg_sq`` uint8 codes of the moments' shape, each
    with a float32 ``*_scale`` per block of :data:`BLOCK` flat elements, and the code map that wrote
    them (``int8_code``)."""

    NAME = "int8"
    FIELDS = {"int8_code": LEGACY_CODE}
    NON_NEGATIVE = frozenset({"exp_avg_scale", "exp_avg_sq_scale"})

    def layout(self, shape: tuple[int, ...]) -> Layout:
        blocks = (math.ceil(math.prod(shape) / BLOCK),)
        return {"exp_avg": (torch.int8, shape), "exp_avg_scale": (torch.float32, blocks),
                "exp_avg_sq": (torch.uint8, shape), "exp_avg_sq_scale": (torch.float32, blocks)}

    def fields(self) -> dict[str, Any]:
        return {"int8_code": f"{V_CODE}/{V_ROUNDING}"}

    def field_error(self, key: str, value: Any) -> str | None:
        code, _, rounding = value.partition("/") if isinstance(value, str) else ("", "", "")
        if code not in CODES or rounding not in ROUNDINGS:
            return (f"{key}={value!r} is not an int8 code map this version knows (one of "
                    f"{[f'{c}/{r}' for c in CODES for r in ROUNDINGS]})")
        return None

    def needs_generator(self, state: dict) -> bool:
        return _code_of(state)[1] == "stochastic"

    def load(self, state: dict, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor]:
        """Dequantized float32 ``(M, V)`` of flat elements ``[lo, hi)`` (block-aligned). A chunk lands
        in this thread's work buffers: valid until the next ``load`` on the device."""
        hi = state["exp_avg"].numel() if hi is None else hi
        b0, b1 = lo // BLOCK, math.ceil(hi / BLOCK)
        bufs = _scratch(hi - lo, state["exp_avg"].device, 3)
        m = dequantize_signed(state["exp_avg"].view(-1)[lo:hi], state["exp_avg_scale"][b0:b1],
                              out=bufs[0] if bufs else None, work=bufs[2] if bufs else None)
        v = dequantize_unsigned(state["exp_avg_sq"].view(-1)[lo:hi], state["exp_avg_sq_scale"][b0:b1],
                                out=bufs[1] if bufs else None, code=_code_of(state)[0])
        return m, v

    def store(self, state: dict, m: Tensor, v: Tensor, lo: int = 0, generator: torch.Generator | None = None) -> None:
        hi = lo + m.numel()
        b0, b1 = lo // BLOCK, math.ceil(hi / BLOCK)
        bufs = _scratch(hi - lo, m.device, 3)
        work = bufs[2] if bufs else None
        code, rounding = _code_of(state)
        quantize_signed_(state["exp_avg"].view(-1)[lo:hi], state["exp_avg_scale"][b0:b1], m, work=work)
        quantize_unsigned_(state["exp_avg_sq"].view(-1)[lo:hi], state["exp_avg_sq_scale"][b0:b1], v, generator,
                           work=work, code=code, rounding=rounding)
