"""``jump`` (GrassJump): a fresh Haar-random basis at every update (ALGORITHMS.md 1.3).

Initialised from the SVD of the first gradient (``init="svd"``, default) or at random
(``init="random"``).
"""

from ..linalg import haar
from . import svd

NAME = "jump"
OPTIONS = {"init": "svd"}
NEEDS_GENERATOR = True
INITS = ("svd", "random")


def init(x, ctx):
    if ctx.options.get("init", "svd") == "random":
        return haar(x.shape[0], ctx.rank, ctx.generator, x.device)
    return svd.init(x, ctx)


def update(q, x, ctx):
    return haar(q.shape[0], q.shape[1], ctx.generator, q.device)
