"""``walk`` (GrassWalk): a geodesic step in a random tangent direction (docs/algorithms.md#walk).

``Z ~ N(0, 1)^{d x r}`` from ``ctx.generator``, ``H = Z - Q Q^T Z``; the geodesic step 1.0 turns the basis
along the top ``update_rank`` singular directions of ``H`` by angles proportional to their singular
values, scaled so that the largest angle is exactly ``step_size`` radians. No gradient information
enters the walk; it starts from the SVD basis of the first gradient.

``update_rank`` is ``"full"`` (the default: all ``r`` directions, docs/algorithms.md#walk) or an integer in
``[1, r]``. The default was 1 until the ablations measured a rank-1 walk equal to a frozen basis at
every step size: one direction of ``r`` turns per update, so the subspace barely moves. The full
step moves every principal angle at once (all ``r`` are non-zero when ``d >= 2 r``), and the walk
mixes: ``E[Q Q^T]`` tends to ``(r/d) I``, the Haar average. It costs ``O(d r^2)`` products and one
``r x r`` ``eigh``, about 1.2 to 1.4 times a rank-1 step (which needs only ``eigvalsh`` and one
inverse-iteration solve) at ``d = 512, r = 128``.

The default ``step_size`` is 1.5 rad (the bound is pi/2), set from ``benchmarks/ablations.md`` (iv): on
``tiny`` (rank 64 of 256, an update every 50 steps) the final eval loss fell monotonically with the step
size, 0.03 and 0.1 rad equal to a frozen basis, 1.5 rad best; the 0.1 rad of the rank-1 era moves the
subspace too little to matter (docs/algorithms.md#walk).
"""

import math

import torch

from ..linalg import geodesic_step
from . import svd
from ._options import check_step_size, check_update_rank

NAME = "walk"
OPTIONS = {"step_size": 1.5, "update_rank": "full"}
NEEDS_GENERATOR = True
init = svd.init


def validate(options, rank, rule=NAME):
    """``step_size`` in ``(0, pi/2]`` radians; ``update_rank`` ``"full"`` or an integer in ``[1, rank]``.

    ``rule`` is the name in the messages (``hybrid`` checks its walk options with this function)."""
    check_step_size(rule, options, upper=math.pi / 2, what=" radians (the largest angle of a step)")
    check_update_rank(rule, options, rank)


def update(q, x, ctx):
    return step(q, ctx, ctx.options.get("step_size", OPTIONS["step_size"]),
                ctx.options.get("update_rank", OPTIONS["update_rank"]))


def step(q, ctx, step_size, update_rank):
    """One walk step from ``q`` with explicit options (``hybrid`` calls it with its own defaults)."""
    eta = float(step_size)
    z = torch.randn(q.shape, generator=ctx.generator, device=q.device, dtype=q.dtype)
    q_new, theta = geodesic_step(q, z, lambda s: s * (eta / s[0]), update_rank)
    ctx.angle = theta.max()
    return q_new
