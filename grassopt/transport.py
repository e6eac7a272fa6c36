"""Moment transport when the basis changes (docs/algorithms.md#transport).

With ``C = Q_new^T Q_old`` (``r x r``), applied to the Adam moments before the new gradient enters
the averages. The moments are stored transposed, ``k x r`` (``Mt = M^T``), so ``M' = C M`` reads
``Mt' = Mt C^T``:

- ``keep`` (GaLore, APOLLO): moments unchanged;
- ``reset``: ``M = V = 0`` and the bias-correction count restarts;
- ``rotate`` (SubTrack++, GrassWalk, GrassJump, LDAdam): each old coordinate is a random variable
  with mean ``M`` and variance ``V - M*M``; ``M' = C M`` and
  ``V' = |(C*C)(V - M*M) + (C M)*(C M)|``. Unlike the public SubTrack++ code, ``V'`` is *not*
  multiplied by ``(1 - beta2)``.

Each function updates the moments in place and returns whether the bias-correction count restarts.
"""

from __future__ import annotations

from torch import Tensor

TRANSPORTS = ("keep", "reset", "rotate")


def keep(q_old: Tensor, q_new: Tensor, mt: Tensor, vt: Tensor) -> bool:
    return False


def reset(q_old: Tensor, q_new: Tensor, mt: Tensor, vt: Tensor) -> bool:
    mt.zero_()
    vt.zero_()
    return True


def rotate(q_old: Tensor, q_new: Tensor, mt: Tensor, vt: Tensor) -> bool:
    ct = q_old.mT @ q_new  # C^T
    cm = mt @ ct  # (C M)^T
    vt.copy_(((vt - mt * mt) @ (ct * ct)).add_(cm * cm).abs_())
    mt.copy_(cm)
    return False


_BY_NAME = {"keep": keep, "reset": reset, "rotate": rotate}


def transport(kind: str, q_old: Tensor, q_new: Tensor, mt: Tensor, vt: Tensor) -> bool:
    """Apply the named transport to ``k x r`` moments in place; True when the bias count restarts."""
    try:
        fn = _BY_NAME[kind]
    except KeyError:
        raise ValueError(f"unknown transport {kind!r}; choose one of {list(TRANSPORTS)}") from None
    return fn(q_old, q_new, mt, vt)
