"""bfloat16 moments: ``exp_avg`` and ``exp_avg_sq`` stored as bf16 tensors of the moments' shape (half
of float32's bytes), decoded to float32 for the step and encoded back by rounding to nearest."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Codec, Layout


class BFloat16(Codec):
    NAME = "bfloat16"
    NON_NEGATIVE = frozenset({"exp_avg_sq"})

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return {"exp_avg": (torch.bfloat16, shape), "exp_avg_sq": (torch.bfloat16, shape)}

    def load(self, state: dict, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor]:
        hi = state["exp_avg"].numel() if hi is None else hi
        return state["exp_avg"].view(-1)[lo:hi].float(), state["exp_avg_sq"].view(-1)[lo:hi].float()

    def store(self, state: dict, m: Tensor, v: Tensor, lo: int = 0, generator: torch.Generator | None = None) -> None:
        hi = lo + m.numel()
        state["exp_avg"].view(-1)[lo:hi].copy_(m)  # round to nearest even
        state["exp_avg_sq"].view(-1)[lo:hi].copy_(v)
