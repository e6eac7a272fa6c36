"""Moment transport when the basis changes (ALGORITHMS.md 2.1).

With ``C = Q_new^T Q_old`` (``r x r``), applied to the Adam moments ``M``, ``V`` (``r x k``) before
the new gradient enters the averages:

- ``keep`` (GaLore, APOLLO): moments unchanged;
- ``reset``: ``M = V = 0`` and the bias-correction count restarts;
- ``rotate`` (SubTrack++, GrassWalk, GrassJump, LDAdam): each old coordinate is a random variable
  with mean ``M`` and variance ``V - M*M``; ``M' = C M`` and
  ``V' = |(C*C)(V - M*M) + (C M)*(C M)|``. Unlike the public SubTrack++ code, ``V'`` is *not*
  multiplied by ``(1 - beta2)``.

Each function updates ``M`` and ``V`` in place and returns whether the bias-correction count
restarts.
"""

from __future__ import annotations

from torch import Tensor

TRANSPORTS = ("keep", "reset", "rotate")


def keep(q_old: Tensor, q_new: Tensor, m: Tensor, v: Tensor) -> bool:
    return False


def reset(q_old: Tensor, q_new: Tensor, m: Tensor, v: Tensor) -> bool:
    m.zero_()
    v.zero_()
    return True


def rotate(q_old: Tensor, q_new: Tensor, m: Tensor, v: Tensor) -> bool:
    c = q_new.mT @ q_old
    cm = c @ m
    var = (v - m * m).to(c.dtype)
    v.copy_(((c * c) @ var).add_(cm * cm).abs_())
    m.copy_(cm)
    return False


_BY_NAME = {"keep": keep, "reset": reset, "rotate": rotate}


def transport(kind: str, q_old: Tensor, q_new: Tensor, m: Tensor, v: Tensor) -> bool:
    """Apply the named transport in place; True when the bias-correction count restarts."""
    try:
        fn = _BY_NAME[kind]
    except KeyError:
        raise ValueError(f"unknown transport {kind!r}; choose one of {list(TRANSPORTS)}") from None
    return fn(q_old, q_new, m, v)
