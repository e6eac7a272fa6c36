"""4-bit moments (``state_dtype="int4"``): two codes a byte, one float32 scale per block of ``BLOCK = 64``
flat elements: ``ceil(n / 2) + 4 ceil(n / 64)`` bytes a moment for ``n`` elements, 0.5625 bytes an element
against int8's 1.0156. The maps follow int8's (``int8.py``), with 15 and 16 levels:

- ``M`` (signed): ``u = M / max|M|`` per block, code ``c = round(7 sign(u) sqrt|u|)`` in ``-7..7``
  (stored as ``c + 8``), decoded ``M = max|M| c |c| / 49``;
- ``V`` (non-negative): ``u = V / max V`` per block, code ``c = clamp(round(16 u^(1/4)) - 1, 0, 15)``,
  decoded ``V = max V ((c + 1) / 16)^4``. No code decodes to zero: with 16 levels, a zero would take every
  ``V`` under ``(0.5 / 16)^4 ~ 1e-6`` of its block's maximum and turn its step ``M / (sqrt(V) + eps)``
  into ``M / eps`` (the zero-point problem of 4-bit second moments, Li et al., "Memory Efficient
  Optimizers with 4-bit States", 2023). The smallest level, ``(1/16)^4 max V``, over-estimates such
  a ``V``, which only shortens its step. A block whose maximum is 0 decodes to 0.

Blocks of 64 (int8's are 256) keep a block's maximum close to its elements, which 16 levels need more
than 256. Rounding is to nearest. The moments' shape is kept as a field (``int4_shape``), since two
codes share a byte. ``benchmarks/low_bit.md`` measures what the format costs against int8 and float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import Codec, Layout

__all__ = ["BLOCK", "Int4", "encode_signed", "decode_signed", "encode_unsigned", "decode_unsigned"]

#: Elements per quantization block (one float32 scale each); even, and dividing grassopt.codecs.CHUNK.
BLOCK = 64
_TINY = torch.finfo(torch.float32).tiny


def _blocked(x: Tensor) -> tuple[Tensor, int]:
    """The flat tensor ``x`` zero-padded to whole blocks, as ``(blocks, BLOCK)``, and its length."""
    n = x.numel()
    pad = -n % BLOCK
    return (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(-1, BLOCK), n


def encode_signed(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes + 8 as uint8 of x's length, block scales)`` of the flat float32 ``x`` (the map of ``M``)."""
    b, n = _blocked(x)
    scale = b.abs().amax(dim=1)
    u = b.abs() / scale.clamp_min(_TINY).unsqueeze(1)
    c = u.sqrt_().mul_(7.0).round_().copysign_(b).add_(8.0)
    return c.view(-1)[:n].to(torch.uint8), scale


def decode_signed(codes: Tensor, scale: Tensor) -> Tensor:
    """The flat float32 ``M`` of codes (``c + 8``) and block scales."""
    c = codes.to(torch.float32).sub_(8.0)
    b, n = _blocked(c)
    return (b * b.abs()).mul_((scale / 49.0).unsqueeze(1)).view(-1)[:n]


def encode_unsigned(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes as uint8 of x's length, block scales)`` of the flat non-negative float32 ``x`` (``V``)."""
    b, n = _blocked(x)
    scale = b.amax(dim=1)
    u = b / scale.clamp_min(_TINY).unsqueeze(1)
    c = u.sqrt_().sqrt_().mul_(16.0).round_().sub_(1.0).clamp_(0.0, 15.0)
    return c.view(-1)[:n].to(torch.uint8), scale


def decode_unsigned(codes: Tensor, scale: Tensor) -> Tensor:
    """The flat float32 ``V`` of codes and block scales (level ``c``: ``max V ((c + 1) / 16)^4``)."""
    c = codes.to(torch.float32).add_(1.0).mul_(1.0 / 16.0)
    b, n = _blocked(c.square_().square_())
    return b.mul_(scale.unsqueeze(1)).view(-1)[:n]


def _pack(c: Tensor) -> Tensor:
    """Codes (uint8, each < 16) two a byte: element ``2i`` in the low nibble, ``2i + 1`` in the high one."""
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    pairs = c.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack(packed: Tensor, n: int) -> Tensor:
    """The ``n`` codes of ``packed``."""
    return torch.stack([packed & 15, packed >> 4], dim=1).view(-1)[:n]


class Int4(Codec):
    """4-bit moments: ``exp_avg`` and ``exp_avg_sq`` packed uint8 codes (``ceil(n/2)`` bytes each), each with
    a float32 ``*_scale`` per block of :data:`BLOCK` flat elements, and the moments' shape (``int4_shape``)."""

    NAME = "int4"
    FIELDS = {"int4_shape": ""}
    NON_NEGATIVE = frozenset({"exp_avg_scale", "exp_avg_sq_scale"})

    def layout(self, shape: tuple[int, ...]) -> Layout:
        n = math.prod(shape)
        packed, blocks = (math.ceil(n / 2),), (math.ceil(n / BLOCK),)
        return {"exp_avg": (torch.uint8, packed), "exp_avg_scale": (torch.float32, blocks),
                "exp_avg_sq": (torch.uint8, packed), "exp_avg_sq_scale": (torch.float32, blocks)}

    def init(self, state: dict, shape: tuple[int, ...], device: torch.device | str,
             like: Tensor | None = None) -> None:
        super().init(state, shape, device, like)
        state["int4_shape"] = ",".join(str(s) for s in shape)

    def matches(self, state: dict) -> bool:
        return "int4_shape" in state and super().matches(state)

    def shape(self, state: dict) -> torch.Size:
        text = state["int4_shape"]
        return torch.Size(int(s) for s in text.split(",")) if text else torch.Size(())

    def field_error(self, key: str, value: Any) -> str | None:
        ok = isinstance(value, str) and all(s.isdigit() for s in value.split(",")) if value else value == ""
        return None if ok else f"{key}={value!r} is not a shape (comma-separated sizes)"

    def load(self, state: dict, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor]:
        """Dequantized float32 ``(M, V)`` of flat elements ``[lo, hi)`` (``lo`` block-aligned)."""
        hi = self.numel(state) if hi is None else hi
        b0, b1, n = lo // BLOCK, math.ceil(hi / BLOCK), hi - lo
        m = decode_signed(_unpack(state["exp_avg"][lo // 2:math.ceil(hi / 2)], n), state["exp_avg_scale"][b0:b1])
        v = decode_unsigned(_unpack(state["exp_avg_sq"][lo // 2:math.ceil(hi / 2)], n),
                            state["exp_avg_sq_scale"][b0:b1])
        return m, v

    def store(self, state: dict, m: Tensor, v: Tensor, lo: int = 0, generator: torch.Generator | None = None) -> None:
        hi = lo + m.numel()
        b0, b1 = lo // BLOCK, math.ceil(hi / BLOCK)
        for key, (codes, scale) in (("exp_avg", encode_signed(m)), ("exp_avg_sq", encode_unsigned(v))):
            state[key][lo // 2:math.ceil(hi / 2)] = _pack(codes)
            state[f"{key}_scale"][b0:b1] = scale
