"""Random sketch matrices ``P`` (``n x r``) with ``E[P P^T] = I`` (docs/algorithms.md#sketches).

Three laws:

- ``gaussian``: i.i.d. entries N(0, 1/r);
- ``haar``: ``sqrt(n/r) Q`` with ``Q`` Haar-distributed on the Stiefel manifold (QR of a Gaussian
  matrix with the sign fix, :func:`grassopt.linalg.haar`): the minimum-variance isotropic law;
- ``coordinate``: ``r`` distinct coordinates ``i_1..i_r`` drawn uniformly, columns ``sqrt(n/r) e_i``.

For a fixed ``G`` the lifted estimate ``G P P^T`` is unbiased under every law, and
``E||G P P^T - G||_F^2 / ||G||_F^2`` is ``(n+1)/r`` (gaussian) and ``n/r - 1`` (haar, coordinate).

Every draw comes from a fresh ``torch.Generator`` on the target device, seeded from
``(seed, step, index)`` (:func:`mix_seed`), so data-parallel ranks draw the same ``P`` without any
communication and a resumed run draws exactly the matrices the uninterrupted run would have drawn:
there is no generator state to save.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linalg import haar

__all__ = ["LAWS", "check_law", "mix_seed", "draw", "projection"]

#: The laws of ``P``; the integer codes are stored in checkpoints (never renumber them).
LAWS: dict[str, int] = {"gaussian": 0, "haar": 1, "coordinate": 2}

_MASK64 = 0xFFFFFFFFFFFFFFFF


def check_law(law: str) -> str:
    if law not in LAWS:
        raise ValueError(f"unknown sketch law {law!r}; choose one of {sorted(LAWS)}")
    return law


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit generator seed from ``(seed, step, index)``: splitmix64 chained over the three.

    Each stage is a bijection of 64-bit words, so nearby triples (consecutive steps, neighbouring
    layers) give unrelated seeds.
    """
    z = _splitmix(int(seed) & _MASK64)
    z = _splitmix(z ^ (int(step) & _MASK64))
    z = _splitmix(z ^ (int(index) & _MASK64))
    return z & 0x7FFFFFFFFFFFFFFF


def draw(law: str, n: int, r: int, generator: torch.Generator | None, device=None,
         dtype: torch.dtype = torch.float32) -> Tensor:
    """One ``n x r`` matrix of ``law`` (``E[P P^T] = I_n``), drawn from ``generator``."""
    check_law(law)
    if not 1 <= r <= n:
        raise ValueError(f"a sketch needs 1 <= r <= n, got n={n}, r={r}")
    if law == "gaussian":
        p = torch.randn(n, r, generator=generator, device=device, dtype=dtype)
        return p.mul_(1.0 / math.sqrt(r))
    if law == "haar":
        return haar(n, r, generator, device, dtype).mul_(math.sqrt(n / r))
    idx = torch.randperm(n, generator=generator, device=device)[:r]
    p = torch.zeros(n, r, device=device, dtype=dtype)
    p[idx, torch.arange(r, device=device)] = math.sqrt(n / r)
    return p


def projection(law: str, n: int, r: int, seed: int, step: int, index: int, device=None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The sketch matrix of layer group ``index`` at ``step``: :func:`draw` from a generator on
    ``device`` seeded with :func:`mix_seed` ``(seed, step, index)``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "meta":  # shapes only (memory estimates of big models): no values, no generator
        return draw(law, n, r, None, device=device, dtype=dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed, step, index))
    return draw(law, n, r, gen, device=device, dtype=dtype)
