"""Moments without ``M`` (``state_dtype="no-m"``): for ``betas[0] == 0`` only. Adam's first moment is then
``M = 0 M + 1 G = G`` at every step (and its bias correction ``1 - 0^t = 1``), so it carries nothing
from one step to the next and is not stored: the state is ``exp_avg_sq`` (``V``, float32, the moments'
shape) alone, half of float32's bytes, and the direction is ``G / (sqrt(V) + eps)`` with the step size
``lr sqrt(1 - b2^t)`` (RMSprop with Adam's bias-corrected ``V``). The step decodes a zero ``M`` a chunk
at a time, which the Adam overwrites with ``G``; a group with ``betas[0] != 0`` is refused (its ``M``
would have nowhere to live)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import Codec, Layout


def beta1_error(name: str, group: dict[str, Any]) -> str | None:
    """The one-line refusal of a group with ``betas[0] != 0`` for a codec that stores no ``M``."""
    betas = group.get("betas")
    if isinstance(betas, tuple | list) and len(betas) == 2 and betas[0] != 0:
        return (f"state_dtype={name!r} stores no first moment, so it needs betas[0] == 0, not "
                f"betas={tuple(betas)!r}; pass betas=(0.0, {betas[1]!r}) or choose another state_dtype")
    return None


class NoM(Codec):
    """``V`` alone: ``exp_avg_sq`` float32 of the moments' shape; ``M`` is not stored (``betas[0] == 0``)."""

    NAME = "no-m"
    NON_NEGATIVE = frozenset({"exp_avg_sq"})

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return {"exp_avg_sq": (torch.float32, shape)}

    def shape(self, state: dict) -> torch.Size:
        return state["exp_avg_sq"].shape

    def group_error(self, group: dict[str, Any]) -> str | None:
        return beta1_error(self.NAME, group)

    def load(self, state: dict, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor]:
        v = state["exp_avg_sq"].view(-1)
        v = v if lo == 0 and hi is None else v[lo:hi]
        return torch.zeros_like(v), v  # M = 0: with b1 = 0 the Adam makes it G

    def store(self, state: dict, m: Tensor, v: Tensor, lo: int = 0, generator: torch.Generator | None = None) -> None:
        pass  # V was updated in place (load returned the stored tensor); M is not kept
