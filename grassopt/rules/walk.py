"""``walk`` (GrassWalk): a geodesic step in a random tangent direction (ALGORITHMS.md 1.2).

``Z ~ N(0, 1)^{d x r}``, ``H = Z - Q Q^T Z``; the top-``update_rank`` singular values are rescaled
so that the largest angle equals ``step_size`` radians. No gradient information enters the walk;
it starts from the SVD basis of the first gradient.
"""

import torch

from ..linalg import geodesic_step
from . import svd

NAME = "walk"
OPTIONS = {"step_size": 0.1, "update_rank": 1}
NEEDS_GENERATOR = True
init = svd.init


def update(q, x, ctx):
    eta = float(ctx.options.get("step_size", OPTIONS["step_size"]))
    z = torch.randn(q.shape, generator=ctx.generator, device=q.device, dtype=q.dtype)
    q_new, theta = geodesic_step(q, z, lambda s: s * (eta / s[0]), int(ctx.options.get("update_rank", 1)))
    ctx.angle = theta.max()
    return q_new
