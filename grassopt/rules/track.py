"""``track`` (SubTrack++): one Grassmann geodesic step that lowers the subspace estimation error.

``F(Q) = min_A ||X - Q A||_F^2`` is minimised by ``A = Q^T X`` with residual ``E = X - Q A``; its
gradient ``-2 E A^T`` is tangent at ``Q``. We move along ``H = 2 E A^T`` (descent), computed as
``2 (X A^T - Q (A A^T))`` so the ``d x k`` residual is never formed (docs/algorithms.md#track).

Step size: ``theta = step_size * sigma`` (``step_mode="raw"``, the paper's form, whose scale
depends on ``||X||^2``) or ``theta = step_size * sigma / ||X||_F^2`` (``"normalized"``, the default:
scale-free, and ``step_size`` bounds the angle in radians).

``update_rank`` (default 1, the paper's rank-1 step) is the number of singular directions of ``H`` the
step turns: an integer in ``[1, r]`` or ``"full"``. Its cost barely depends on it: the singular pairs come
from the ``r x r`` Gram of ``H`` (``linalg.geodesic_step``), not from an SVD of the ``d x r`` ``H``.
"""

import torch

from ..linalg import geodesic_step
from . import svd
from ._options import check_choice, check_step_size, check_update_rank

NAME = "track"
OPTIONS = {"step_size": 0.5, "step_mode": "normalized", "update_rank": 1}
NEEDS_GENERATOR = False
STEP_MODES = ("normalized", "raw")
init = svd.init


def validate(options, rank):
    """``step_size > 0``; ``step_mode`` in ``STEP_MODES``; ``update_rank`` ``"full"`` or in ``[1, rank]``."""
    check_step_size(NAME, options)
    check_choice(NAME, options, "step_mode", STEP_MODES)
    check_update_rank(NAME, options, rank)


def update(q, x, ctx):
    eta = float(ctx.options.get("step_size", OPTIONS["step_size"]))
    mode = ctx.options.get("step_mode", OPTIONS["step_mode"])
    a = ctx.projected if ctx.projected is not None else q.mT @ x  # r x k
    h = 2.0 * (x @ a.mT - q @ (a @ a.mT))  # d x r, = -grad F
    if mode == "raw":
        scale = eta
    else:
        scale = eta / torch.linalg.vector_norm(x).square().clamp_min(torch.finfo(x.dtype).tiny)
    k = ctx.options.get("update_rank", OPTIONS["update_rank"])
    q_new, theta = geodesic_step(q, h, lambda s: s * scale, k)
    ctx.angle = theta.max()
    return q_new
