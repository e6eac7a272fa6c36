"""``rsvd``: randomized SVD (Halko et al.): a Gaussian sketch, power iterations, a small SVD.

Costs ``O(d k (r + p))`` instead of the ``O(d^2 k)`` of a full SVD.
"""

import torch

from ..linalg import count_fallback, qr_positive, robust_svd
from ._options import check_count

NAME = "rsvd"
OPTIONS = {"oversample": 8, "power_iters": 2}
NEEDS_GENERATOR = True


def validate(options, rank):
    """``oversample`` and ``power_iters`` integers ``>= 0``."""
    check_count(NAME, options, "oversample")
    check_count(NAME, options, "power_iters")


def init(x, ctx):
    d, k = x.shape
    width = min(ctx.rank + int(ctx.options.get("oversample", 8)), d)
    omega = torch.randn(k, width, generator=ctx.generator, device=x.device, dtype=x.dtype)
    y = qr_positive(x @ omega)
    for _ in range(int(ctx.options.get("power_iters", 2))):
        y = qr_positive(x @ (x.mT @ y))
    small = robust_svd(y.mT @ x)  # (r + p) x k; a fallback is counted in ctx.svd_fallbacks
    count_fallback(ctx, small)
    return (y @ small.U[:, : ctx.rank]).contiguous()


def update(q, x, ctx):
    return init(x, ctx)
