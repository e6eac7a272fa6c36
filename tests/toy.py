"""A small regression problem shared by the moment-format tests: a three-layer tanh MLP (16 -> 48 -> 40
-> 4, so rank-4 projections fit in both orientations) and batches of a fixed random target."""

from __future__ import annotations

import torch
from torch import nn


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 4))


def toy_data(n: int = 40) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 4, generator=g)
    xs = [torch.randn(32, 16, generator=g) for _ in range(n)]
    return [(x, torch.tanh(x @ w)) for x in xs]


def toy_train(model: nn.Module, opt: torch.optim.Optimizer, data) -> list[float]:
    """One optimizer step per batch of ``data``; the losses before each step."""
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
