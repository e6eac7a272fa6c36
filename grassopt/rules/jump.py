"""``jump`` (GrassJump): a fresh Haar-random basis at every update (docs/algorithms.md#jump).

Initialised from the SVD of the first gradient (``init="svd"``, default) or at random
(``init="random"``). An update is one QR of a ``d x r`` Gaussian matrix (with the sign fix that
makes the law Haar). The rule does not set ``ctx.angle``: the optimizer measures it with
``linalg.largest_angle`` (an ``r x r`` ``eigvalsh``), which costs about as much as the jump itself.
"""

from ..linalg import haar
from . import svd
from ._options import check_choice

NAME = "jump"
OPTIONS = {"init": "svd"}
NEEDS_GENERATOR = True
INITS = ("svd", "random")


def validate(options, rank):
    """``init`` in ``INITS``."""
    check_choice(NAME, options, "init", INITS)


def init(x, ctx):
    if ctx.options.get("init", "svd") == "random":
        return haar(x.shape[0], ctx.rank, ctx.generator, x.device)
    return svd.init(x, ctx)


def update(q, x, ctx):
    return haar(q.shape[0], q.shape[1], ctx.generator, q.device)
