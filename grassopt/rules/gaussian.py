"""``gaussian`` (APOLLO): a random Gaussian projection, entries N(0, 1/r), redrawn every ``T`` steps.

The basis is *not* orthonormal (``E[Q^T Q] = (d/r) I`` only on average) and it is not optimizer
state: it is a pure function of a seed. The optimizer keeps the seed (a plain int), draws a new
one at each basis update (moments are kept, docs/algorithms.md#apollo), and regenerates ``Q`` from it at
every step, so a projected matrix costs ``2 k r`` floats, not ``d r + 2 k r`` (docs/algorithms.md#memory).

Because ``Q`` is not orthonormal, nothing that assumes it applies: no re-orthonormalisation, no
principal angles, no ``rotate`` transport, no recovery scaling of ``X - Q Q^T X`` (the optimizer
checks ``ORTHONORMAL`` and refuses those combinations).
"""

import math

import torch

from ._options import accept_all

NAME = "gaussian"
OPTIONS: dict = {}
NEEDS_GENERATOR = True
#: the columns of Q are not orthonormal: skip re-orthonormalisation and angle diagnostics
ORTHONORMAL = False
#: Q is a function of a seed: the optimizer stores the seed and calls ``init`` every step with a
#: generator seeded from it (``update`` is never called)
FROM_SEED = True
validate = accept_all


def init(x, ctx):
    d, r = x.shape[0], ctx.rank
    q = torch.randn(d, r, generator=ctx.generator, device=x.device, dtype=torch.float32)
    return q.mul_(1.0 / math.sqrt(r))


def update(q, x, ctx):
    return init(x, ctx)
