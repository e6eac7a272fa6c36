"""``hybrid``: a GrassJump jump with probability ``jump_prob``, else a GrassWalk step."""

import torch

from . import jump, svd, walk

NAME = "hybrid"
OPTIONS = {"step_size": 0.1, "update_rank": 1, "jump_prob": 0.3}
NEEDS_GENERATOR = True
init = svd.init


def update(q, x, ctx):
    p = float(ctx.options.get("jump_prob", OPTIONS["jump_prob"]))
    u = torch.rand((), generator=ctx.generator, device=q.device)
    if float(u) < p:
        return jump.update(q, x, ctx)
    return walk.update(q, x, ctx)
