"""``hybrid``: a GrassJump jump with probability ``jump_prob``, else a GrassWalk step.

The walk branch is ``walk.step`` with this rule's ``step_size`` and ``update_rank``, whose defaults
are ``walk``'s own (1.5 rad, ``"full"``): smaller or rank-1 walk steps were measured equal to a
frozen basis (``walk``; docs/algorithms.md#walk). The coin is drawn from ``ctx.generator`` and read
on the host (one sync per update).
"""

import torch

from . import jump, svd, walk
from ._options import check_probability

NAME = "hybrid"
OPTIONS = {"step_size": walk.OPTIONS["step_size"], "update_rank": walk.OPTIONS["update_rank"], "jump_prob": 0.3}
NEEDS_GENERATOR = True
init = svd.init


def validate(options, rank):
    """``walk``'s checks (``step_size`` in ``(0, pi/2]``, ``update_rank``) and ``jump_prob`` in ``[0, 1]``."""
    walk.validate(options, rank, rule=NAME)
    check_probability(NAME, options, "jump_prob")


def update(q, x, ctx):
    p = float(ctx.options.get("jump_prob", OPTIONS["jump_prob"]))
    u = torch.rand((), generator=ctx.generator, device=q.device)
    if float(u) < p:
        return jump.update(q, x, ctx)
    return walk.step(q, ctx, ctx.options.get("step_size", OPTIONS["step_size"]),
                     ctx.options.get("update_rank", OPTIONS["update_rank"]))
