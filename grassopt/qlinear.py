"""int8 weights that learn: :class:`Int8Linear` and :func:`quantize_linears` (docs/algorithms.md#int8-weights).

A linear layer's weight ``W`` (``m x n``) is stored as int8 codes ``C`` (``m x n``, one byte each) and
one float32 scale ``s_b`` per block ``b`` of :data:`BLOCK` consecutive elements of the flattened
weight: ``W = s_b C`` on a uniform symmetric grid, ``s_b = max_b |W| / 127``, so the largest entry of a
block is exact and a block costs ``BLOCK + 4`` bytes. The block and the code were chosen by measurement
(``benchmarks/low_bit.md``, "int8 weights").

**Forward and backward.** A custom autograd function dequantizes ``W`` for the forward product
(``y = x W^T + b``) and again for the backward product (``dx = dy W``); it saves ``x`` (as
``nn.Linear`` does) and the codes and scales themselves, never a dequantized ``W``: between steps
the only copy of the weight is its int8 codes. The full-precision ``W`` exists transiently, one
layer at a time, inside the products (and inside the optimizer's update of that layer).

**What the optimizer sees.** The module's ``weight`` is a real ``nn.Parameter`` of the weight's
shape and of the compute dtype, but it holds no data: it is one NaN expanded to ``m x n`` (stride
0, 1 element of storage; NaN so that code which reads it instead of the codes fails loudly). The
autograd function returns ``dL/dW`` as that parameter's gradient, so every optimizer and hook keys
its state and reads a float gradient of the weight's shape as for any parameter (clipping,
layer-wise hooks, DDP's buckets, the finite checks). The optimizer recognises such a parameter by
:func:`int8_module` and writes its update through :meth:`Int8Linear.read` / :meth:`Int8Linear.write_`:
the new float32 weight of a block range is requantized with a fresh scale (its new ``max |W|``), and
rounded onto the grid **stochastically** (``floor(u + U)``, ``U`` uniform: unbiased, ``E[W'] = W``)
from the optimizer's seeded rounding generator (``SubspaceAdamW(stochastic_rounding=True)``), or to
nearest otherwise (kept to measure what stochastic rounding buys: an update below half a grid step
is lost, as with bf16). The random bits come from the per-parameter generators the optimizer
checkpoints, so resumed runs and data-parallel ranks stay bit-identical. A fresh scale per write makes
weight decay free of rounding noise: decaying a whole block only shrinks its scale.

**What it costs.** ``m n + 4 ceil(m n / BLOCK)`` bytes per weight (and the parameter's one element),
:func:`weight_bytes`; ``grassopt memory --param-dtype int8`` prices it exactly.

Use::

    model = grassopt.qlinear.quantize_linears(model)           # the hidden nn.Linear layers, in place
    opt = grassopt.make_optimizer(model, "subtrack++", rank=128, lr=1e-3, stochastic_rounding=True)

Limits: only an optimizer that knows :func:`int8_module` can train these weights (``SubspaceAdamW``,
every preset); one of ``torch.optim`` would write into the storage-free parameter, which torch refuses
("more than one element of the written-to tensor refers to a single memory location"). A layer's
``weight`` holds no values, so code that reads ``layer.weight`` directly (weight
tying, ``grassopt.sketch``'s layers, exporting) must read :meth:`Int8Linear.dequantized` instead;
``copy.deepcopy`` of a quantized model is not supported (save and load its ``state_dict``). Under DDP,
build ``DistributedDataParallel(model, init_sync=False, broadcast_buffers=False)`` as ``grassopt train``
does: every rank builds the same codes from the same seed and writes the same updates, and DDP's initial
broadcast cannot write into the storage-free parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["BLOCK", "QMAX", "Int8Linear", "quantize_linears", "int8_module", "weight_bytes", "quantize_",
           "dequantize", "round_to_grid"]

#: Elements per block (one float32 scale each), chosen by measurement (benchmarks/low_bit.md).
BLOCK = 256
#: The largest code: a symmetric grid ``-127 ... 127`` (``-128`` unused, so the grid is symmetric).
QMAX = 127
_ATTR = "_grassopt_int8"  # the attribute of a weight parameter naming its Int8Linear
_CHUNK = 1 << 20  # elements requantized at a time (a multiple of every allowed block)


def weight_bytes(shape: tuple[int, ...] | torch.Size, block: int = BLOCK) -> int:
    """Bytes of an int8 weight of ``shape``: its codes and float32 block scales (its parameter's one element,
    of the compute dtype, comes on top)."""
    n = math.prod(shape)
    return n + 4 * math.ceil(n / block)


def _pairs(flat: Tensor, scales: Tensor, block: int) -> list[tuple[Tensor, Tensor]]:
    """``(blocks, scale column)`` views of a flat tensor: its full blocks and its partial tail."""
    n = flat.numel()
    full = n - n % block
    out = []
    if full:
        out.append((flat[:full].view(-1, block), scales[:full // block].unsqueeze(1)))
    if full < n:
        out.append((flat[full:].unsqueeze(0), scales[full // block:].unsqueeze(1)))
    return out


def dequantize(codes: Tensor, scales: Tensor, block: int = BLOCK, out: Tensor | None = None) -> Tensor:
    """The flat float32 values ``s_b C`` of flat int8 ``codes`` (block-aligned) and their ``scales``."""
    out = codes.to(torch.float32) if out is None else out.copy_(codes)
    for blk, s in _pairs(out, scales, block):
        blk.mul_(s)
    return out


def round_to_grid(u: Tensor, generator: torch.Generator | None) -> Tensor:
    """``u`` (in ``[-QMAX, QMAX]``, float32, modified in place) rounded to integers: stochastically when
    a ``generator`` is given (up with probability ``u - floor(u)``, so ``E = u``), else to nearest."""
    if generator is None:
        return u.round_()
    lo = torch.floor(u)
    frac = u.sub_(lo)  # in [0, 1)
    up = torch.rand(frac.shape, generator=generator, device=frac.device, dtype=torch.float32) < frac
    return lo.add_(up)


def quantize_(codes: Tensor, scales: Tensor, w: Tensor, block: int = BLOCK,
              generator: torch.Generator | None = None) -> None:
    """Write the flat float32 ``w`` (block-aligned) as int8 ``codes`` on a fresh grid: ``scales`` =
    ``max |w| / QMAX`` per block, codes rounded by :func:`round_to_grid` (``w`` is not changed)."""
    u = w.to(torch.float32, copy=True)
    tiny = torch.finfo(torch.float32).tiny
    for blk, s in _pairs(u, scales, block):  # s: a view of the scales
        s.copy_(blk.abs().amax(dim=1, keepdim=True).div_(QMAX))
        blk.div_(s.clamp_min(tiny))
    codes.copy_(round_to_grid(u.clamp_(-QMAX, QMAX), generator))


class _Int8Matmul(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized from codes in the forward and again in the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None,
                block: int) -> Tensor:
        dtype = weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        xc = x.to(dtype)
        w = dequantize(codes.view(-1), scales, block).view(codes.shape).to(dtype)
        ctx.save_for_backward(xc, codes, scales)
        ctx.block, ctx.dtype, ctx.has_bias = block, dtype, bias is not None
        return torch.nn.functional.linear(xc, w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        (gy,) = grads
        xc, codes, scales = ctx.saved_tensors
        gy = gy.to(ctx.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            w = dequantize(codes.view(-1), scales, ctx.block).view(codes.shape).to(ctx.dtype)
            gx = gy @ w
        if ctx.needs_input_grad[1]:
            gw = gy.reshape(-1, gy.shape[-1]).mT @ xc.reshape(-1, xc.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[4]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gw, None, None, gb, None


def _placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """One NaN expanded to ``shape``: a tensor of the weight's shape and dtype with one element of storage."""
    return torch.full((), math.nan, dtype=dtype, device=device).expand(shape)


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored as block-wise int8 codes (see the module docstring).

    ``weight``: a storage-free parameter (the optimizer's handle and the gradient's holder); ``codes``
    (int8, ``out x in``) and ``scales`` (float32, one per block) are buffers, so they are in the
    module's ``state_dict`` (the weight is not) and move with ``.to(device)``; ``.to(dtype)`` changes
    the compute dtype (of ``weight``, ``bias`` and the products), never the codes' or the scales'.
    """

    codes: Tensor
    scales: Tensor
    bias: Any  # a Parameter or None, as nn.Linear's

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block: int = BLOCK,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 1 << 16 or block & (block - 1):
            raise ValueError(f"block={block!r} must be a power of two from 1 to 65536 (elements per int8 scale; the "
                             f"optimizer's chunks are aligned to it), e.g. {BLOCK}")
        self.in_features, self.out_features, self.block = in_features, out_features, block
        dtype = torch.get_default_dtype() if dtype is None else dtype
        device = torch.get_default_device() if device is None else torch.device(device)  # as nn.Linear
        shape = (out_features, in_features)
        n = out_features * in_features
        self.register_buffer("codes", torch.zeros(shape, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(math.ceil(n / block), dtype=torch.float32, device=device))
        self.weight = nn.Parameter(_placeholder(shape, dtype, device))
        setattr(self.weight, _ATTR, self)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = BLOCK) -> Int8Linear:
        """An :class:`Int8Linear` holding ``linear``'s weight rounded to nearest (its bias kept as it is)."""
        w = linear.weight
        if w.dim() != 2 or not w.dtype.is_floating_point:
            raise ValueError(f"from_linear needs a 2-D floating-point weight, got {w.dtype} {tuple(w.shape)}")
        q = cls(linear.in_features, linear.out_features, bias=False, block=block, device=w.device, dtype=w.dtype)
        q.bias = linear.bias
        with torch.no_grad():
            q.write_(w.detach().reshape(-1).float())
        return q

    # --------------------------------------------------------------- the weight's values
    def read(self, lo: int = 0, hi: int | None = None, out: Tensor | None = None) -> Tensor:
        """Flat float32 weight values ``[lo, hi)`` (block-aligned ``lo``)."""
        hi = self.codes.numel() if hi is None else hi
        return dequantize(self.codes.view(-1)[lo:hi], self.scales[lo // self.block:math.ceil(hi / self.block)],
                          self.block, out)

    @torch.no_grad()
    def write_(self, w: Tensor, lo: int = 0, generator: torch.Generator | None = None) -> None:
        """Requantize flat float32 values ``w`` into elements ``[lo, lo + w.numel())`` (block-aligned
        ``lo``; ``w`` ends at a block boundary or at the end): stochastic rounding from ``generator``,
        to nearest without one. Works ``_CHUNK`` elements at a time: the temporaries are a few chunks."""
        hi = lo + w.numel()
        if lo % self.block or (hi % self.block and hi != self.codes.numel()):
            raise ValueError(f"write_ covers [{lo}, {hi}): it must start at a multiple of block={self.block} and "
                             "end at one or at the end of the weight")
        flat, codes = w.reshape(-1), self.codes.view(-1)
        for a in range(lo, hi, _CHUNK):  # (a multiple of every block: chunks stay block-aligned)
            b = min(a + _CHUNK, hi)
            quantize_(codes[a:b], self.scales[a // self.block:math.ceil(b / self.block)], flat[a - lo:b - lo],
                      self.block, generator)

    def dequantized(self) -> Tensor:
        """The weight's values (``out x in``, in the compute dtype): a new tensor, not a parameter."""
        return self.read().view(self.codes.shape).to(self.weight.dtype)

    # --------------------------------------------------------------- module plumbing
    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, _Int8Matmul.apply(x, self.weight, self.codes, self.scales, self.bias, self.block))

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        codes, scales = cast(Tensor, self._buffers.pop("codes")), cast(Tensor, self._buffers.pop("scales"))
        try:
            super()._apply(fn, recurse)
        finally:
            dev = self.weight.device
            self._buffers["codes"], self._buffers["scales"] = codes.to(dev), scales.to(dev)
        if self.weight.stride() != (0, 0):  # a conversion materialised it: one element again
            self.weight.data = _placeholder(tuple(self.weight.shape), self.weight.dtype, dev)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)  # no values: the codes and scales are the weight

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        weight = self._parameters.pop("weight")
        try:
            if prefix + "weight" in state_dict:
                error_msgs.append(f"{prefix}weight: a full-precision weight cannot load into an int8 layer; load "
                                  "the model before quantize_linears, or a state_dict saved from an int8 model")
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            self._parameters["weight"] = weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 codes, block={self.block}")


def int8_module(p: Tensor) -> Int8Linear | None:
    """The :class:`Int8Linear` whose weight parameter ``p`` is, or None for any other tensor."""
    return getattr(p, _ATTR, None)


def quantize_linears(model: nn.Module, targets: str | Iterable[str] = "all-linear", *,
                     block: int = BLOCK) -> nn.Module:
    """Replace the ``nn.Linear`` layers ``targets`` selects (:func:`grassopt.targets.select_targets`:
    ``"all-linear"``, every linear layer but the output head and tied ones, by default) by
    :class:`Int8Linear`, in place, each rounded to nearest from its current weight; returns ``model``.

    Build the optimizer after this (its parameters are the new layers' weights)."""
    from .targets import select_targets

    chosen = [(name, mod) for name, mod in select_targets(model, targets) if not isinstance(mod, Int8Linear)]
    for name, mod in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(mod, block))
    return model
