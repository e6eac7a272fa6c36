"""float32 moments: ``exp_avg`` and ``exp_avg_sq`` as float32 tensors of the moments' shape (the default)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Codec, Layout


class Float32(Codec):
    NAME = "float32"
    DENSE = True
    NON_NEGATIVE = frozenset({"exp_avg_sq"})

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return {"exp_avg": (torch.float32, shape), "exp_avg_sq": (torch.float32, shape)}

    def init(self, state: dict, shape: tuple[int, ...], device: torch.device | str,
             like: Tensor | None = None) -> None:
        if like is None or tuple(like.shape) != tuple(shape):
            return super().init(state, shape, device)
        for key in self.layout(tuple(shape)):  # the parameter's strides (and tensor type: FSDP's DTensor)
            state[key] = torch.zeros_like(like, dtype=torch.float32, memory_format=torch.preserve_format)

    def tensors(self, state: dict) -> tuple[Tensor, Tensor]:
        return state["exp_avg"], state["exp_avg_sq"]

    def load(self, state: dict, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor]:
        m, v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        return (m, v) if lo == 0 and hi is None else (m[lo:hi], v[lo:hi])

    def store(self, state: dict, m: Tensor, v: Tensor, lo: int = 0, generator: torch.Generator | None = None) -> None:
        pass  # load returned the stored tensors themselves
