"""The compiled step of ``SubspaceAdamW(compile=True)``: a step's elementwise work as fused kernels.

``torch.compile`` (inductor) turns each kernel function below into fused loops: C++/OpenMP on a
CPU, Triton on a GPU, from the same code (the GPU path is built by it but untested here). What is
compiled, one call per tensor:

- :func:`plain_int8_`: a plain parameter with int8 moments: decode, Adam, the update with the
  decoupled decay, the write into the weight (rounded to nearest, or stochastically from noise the
  caller draws from its generator), and the encode, in one pass instead of a dozen;
- :func:`plain_dense_`: a low-precision (bf16) parameter with float32 moments (stochastic rounding);
- :func:`direction_int8`: a projected matrix's subspace Adam on int8 moments (decode, Adam, encode);
- :func:`recovery_scales`: the recovery (or APOLLO channel) scales of a projected group and the
  norm-growth limiter, over the group's concatenated slice vectors.

What stays eager: the matrix products, the basis updates, float32 moments of float32 tensors (torch's
fused AdamW kernel is already one pass), int8 weights (``grassopt.qlinear``), int8 moments whose
element count is not a whole number of blocks or whose code map is not the default ``pow4/nearest``.

No recompilation after warm-up: every rate and step-dependent factor is passed in one float32 tensor
``hp`` (never a Python float, which would be specialised), so a schedule moving the rate, a new step
count, a basis update or a resume (new tensors, same shapes) reuse the kernels; each tensor shape is
compiled once (``dynamic=None``: a second shape makes the kernel shape-generic).

Fallback: where compile cannot run (no C++ compiler for a CPU, no Triton for a GPU, another device
type) or inductor raises, :class:`Kernels` warns once, in one line, and the eager step runs.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from ..codecs.int8 import BLOCK

__all__ = ["Kernels", "unavailable", "plain_int8_", "plain_dense_", "direction_int8", "recovery_scales", "adam_tensor_",
           "direction_"]

_TINY = torch.finfo(torch.float32).tiny

#: torch.compile's backend (the tests' cheap cases trace with ``"aot_eager"``: no C++ compile)
BACKEND = "inductor"


def unavailable(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None when it can."""
    if device.type == "cpu":
        cxx = os.environ.get("CXX") or "g++"
        if not (shutil.which(cxx) or shutil.which("c++") or shutil.which("clang++")):
            return "no C++ compiler found (inductor's CPU backend needs one; set CXX)"
        return None
    if device.type in ("cuda", "xpu"):
        return None if importlib.util.find_spec("triton") else f"Triton is not installed (needed on {device.type})"
    return f"inductor has no backend for device type {device.type!r}"


# ------------------------------------------------------------------------------------- the kernels
def _moments(g: Tensor, m: Tensor, v: Tensor, hp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's moments and ``N = M / (sqrt(V) + eps)``; ``hp[:3] = (1 - b1, b2, eps)``, ``hp[-1] = 1 - b2`` (as the
    eager step rounds them: ``M`` is bit for bit torch's fused kernel's, ``V`` within an ulp: the kernel fuses
    a multiply-add)."""
    m = torch.lerp(m, g, hp[0])
    v = v * hp[1] + hp[-1] * g * g
    return m, v, m / (v.sqrt() + hp[2])


def _decode_int8(mc: Tensor, ms: Tensor, vc: Tensor, vs: Tensor) -> tuple[Tensor, Tensor]:
    """float32 ``(M, V)`` of int8 blocks ``(n / BLOCK, BLOCK)`` (the ``pow4`` map of ``grassopt.codecs.int8``)."""
    c = mc.float()
    m = (c * c).copysign(c) * (ms * (1.0 / 127.0**2)).unsqueeze(1)
    u = vc.float() * (1.0 / 255.0)
    u = u * u
    return m, (u * u) * vs.unsqueeze(1)


def _encode_int8_(mc: Tensor, ms: Tensor, vc: Tensor, vs: Tensor, m: Tensor, v: Tensor) -> None:
    """Block scales and codes of float32 ``(M, V)`` blocks, written into the state (rounded to nearest)."""
    a = m.abs()
    mmax = a.amax(1)
    ms.copy_(mmax)
    mc.copy_((a / mmax.clamp_min(_TINY).unsqueeze(1)).sqrt().mul(127.0).round().copysign(m))
    vmax = v.amax(1)
    vs.copy_(vmax)
    vc.copy_((v / vmax.clamp_min(_TINY).unsqueeze(1)).sqrt().sqrt().mul(255.0).round())


def _write_(p: Tensor, w: Tensor, noise: Tensor | None) -> None:
    """``p = w``: rounded to nearest, or stochastically with ``noise`` (int32 below ``2^16``, as
    ``grassopt.functional.stochastic_round_`` draws it) into a bf16 ``p``."""
    if noise is not None:
        bits = (noise * w.isfinite()) + w.view(torch.int32)
        w = (bits & -(1 << 16)).view(torch.float32)
    p.copy_(w)


def plain_int8_(p: Tensor, g: Tensor, mc: Tensor, ms: Tensor, vc: Tensor, vs: Tensor, hp: Tensor,
                noise: Tensor | None) -> None:
    """One AdamW step of a parameter with int8 moments, all ``(n / BLOCK, BLOCK)`` views;
    ``hp = (1 - b1, b2, eps, lr sqrt(1 - b2^t) / (1 - b1^t), 1 - lr wd, 1 - b2)``."""
    m, v = _decode_int8(mc, ms, vc, vs)
    m, v, n = _moments(g.float(), m, v, hp)
    _write_(p, (p.float() - hp[3] * n) * hp[4], noise)
    _encode_int8_(mc, ms, vc, vs, m, v)


def plain_dense_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, hp: Tensor, noise: Tensor | None) -> None:
    """:func:`plain_int8_` for float32 moments (a low-precision parameter)."""
    m2, v2, n = _moments(g.float(), m, v, hp)
    m.copy_(m2)
    v.copy_(v2)
    _write_(p, (p.float() - hp[3] * n) * hp[4], noise)


def direction_int8(rt: Tensor, mc: Tensor, ms: Tensor, vc: Tensor, vs: Tensor, hp: Tensor) -> Tensor:
    """``scale * N`` of a projected matrix with int8 moments (moments updated); ``hp = (1 - b1, b2, eps, scale, 1 - b2)``."""
    m, v = _decode_int8(mc, ms, vc, vs)
    m, v, n = _moments(rt, m, v, hp)
    _encode_int8_(mc, ms, vc, vs, m, v)
    return n * hp[3]


def recovery_scales(r_norm: Tensor, n_norm: Tensor, x_col2: Tensor, seg: Tensor, prev: Tensor, hp: Tensor,
                    n: int, channel: bool) -> tuple[Tensor, ...]:
    """The limited scales ``c Phi`` of a group's slices, the limiter ``c``, the new kept norms and the
    residual norms and ratios (recovery); ``hp = (scale, zeta, PHI_EPS)``. The maths of
    ``grassopt.optim._projected.scales``, on its concatenated vectors."""
    phi = n_norm / (r_norm + hp[2]) / hp[0]

    def seg_sum(t: Tensor) -> Tensor:
        return torch.zeros(n, dtype=t.dtype, device=t.device).index_add(0, seg, t)

    if channel:
        s_norm = seg_sum(phi * phi * x_col2).sqrt()
        e = ratio = s_norm
    else:
        e_col2 = (x_col2 - r_norm * r_norm).clamp_min(0.0)
        s_norm = seg_sum(phi * phi * e_col2).sqrt()
        e = seg_sum(e_col2).sqrt()
        ratio = e / seg_sum(x_col2).sqrt().clamp_min(1e-30)
    cap = hp[1] * prev
    hit = (prev > 0) & (s_norm > cap)
    c = torch.where(hit, cap / s_norm.clamp_min(_TINY), torch.ones_like(s_norm))
    return phi * c[seg], c, s_norm * c, e, ratio


# ------------------------------------------------------------------------------------- the holder
class Kernels:
    """The compiled kernels of one optimizer, compiled on first use, with the fallback: when compile
    is unavailable for a device, or inductor raises, one warning and the eager step from then on."""

    def __init__(self) -> None:
        self._fns: dict[str, Callable[..., Any]] = {}
        self._off: str | None = None  # why compile is off (after the warning)
        self._checked: set[str] = set()

    @property
    def off(self) -> str | None:
        return self._off

    def usable(self, device: torch.device) -> bool:
        """Whether the compiled kernels run for tensors on ``device`` (warns once when they cannot)."""
        if self._off is not None:
            return False
        if device.type not in self._checked:
            why = unavailable(device)
            if why is not None:
                self._disable(f"{why}")
                return False
            self._checked.add(device.type)
        return True

    def _disable(self, why: str) -> None:
        self._off = why
        warnings.warn(f"compile=True: {why}; running the eager step", RuntimeWarning, stacklevel=4)

    def run(self, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """``(True, compiled fn(*args))``, or ``(False, None)`` when compile is off or inductor raised
        (nothing was written then: inductor compiles before it runs)."""
        if self._off is not None:
            return False, None
        compiled = self._fns.get(fn.__name__)
        if compiled is None:
            compiled = self._fns[fn.__name__] = torch.compile(fn, backend=BACKEND, fullgraph=True)
        try:
            return True, compiled(*args)
        except Exception as e:  # noqa: BLE001 - any failure of the compiler: run eager, say so once
            self._disable(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
            return False, None


# ------------------------------------------------------------------------------------- dispatch
def _int8_ready(codec: Any, st: dict, n: int) -> bool:
    """Whether the int8 kernels can run these moments: the default code map and whole blocks."""
    return codec.NAME == "int8" and st.get("int8_code") == "pow4/nearest" and n % BLOCK == 0


def _plain(*ts: Tensor) -> bool:
    """Contiguous tensors that are not a subclass (an FSDP DTensor steps eagerly)."""
    return all((type(t) is Tensor or type(t) is torch.nn.Parameter) and t.is_contiguous() for t in ts)


def adam_tensor_(kernels: Kernels, p: Tensor, g: Tensor, st: dict, step: int, *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, codec: Any,
                 generator: torch.Generator | None) -> bool:
    """:func:`grassopt.functional.adam_tensor_` compiled, when it can be (True); False: nothing done,
    the caller runs the eager step. ``generator``: stochastic rounding of a bf16 ``p``."""
    n = p.numel()
    dense = codec.DENSE and p.dtype != torch.float32
    if not (dense or _int8_ready(codec, st, n)) or not _plain(p, g):
        return False
    if (generator is not None and p.dtype != torch.bfloat16) or not kernels.usable(p.device):
        return False
    blocks = (-1,) if dense else (-1, BLOCK)
    moments = ([t.view(-1) for t in codec.tensors(st)] if dense else
               [st["exp_avg"].view(blocks), st["exp_avg_scale"], st["exp_avg_sq"].view(blocks), st["exp_avg_sq_scale"]])
    if not _plain(*moments):
        return False
    b1, b2 = betas
    hp = torch.tensor([1 - b1, b2, eps, lr * math.sqrt(1 - b2**step) / (1 - b1**step), 1 - lr * weight_decay, 1 - b2],
                      dtype=torch.float32, device=p.device)
    saved = None if generator is None else generator.get_state()
    noise = None if generator is None else torch.randint(0, 1 << 16, (n,), dtype=torch.int32, device=p.device,
                                                         generator=generator).view(blocks)
    ok = kernels.run(plain_dense_ if dense else plain_int8_, p.view(blocks), g.view(blocks), *moments, hp, noise)[0]
    if not ok and saved is not None:  # the eager step draws the same bits again
        cast(torch.Generator, generator).set_state(saved)
    return ok


def direction_(kernels: Kernels, rt: Tensor, st: dict, *, betas: tuple[float, float], eps: float, scale: float,
               codec: Any) -> Tensor | None:
    """``scale * N`` of a projected matrix with int8 moments, compiled; None when it cannot be."""
    if not (_int8_ready(codec, st, rt.numel()) and _plain(rt) and kernels.usable(rt.device)):
        return None
    hp = torch.tensor([1 - betas[0], betas[1], eps, scale, 1 - betas[1]], dtype=torch.float32, device=rt.device)
    ok, out = kernels.run(direction_int8, rt.view(-1, BLOCK), st["exp_avg"].view(-1, BLOCK), st["exp_avg_scale"],
                          st["exp_avg_sq"].view(-1, BLOCK), st["exp_avg_sq_scale"], hp)
    return out.view(rt.shape) if ok else None
