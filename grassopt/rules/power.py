"""``power``: one warm-started power (subspace) iteration, ``Q' = qr(X X^T Q)`` (docs/algorithms.md#rules).

The cheapest data-driven rule: two ``d x k x r`` products. The QR's signs are fixed so that
``diag(R) > 0``, which keeps each column continuous with the previous basis.
"""

from ..linalg import qr_positive
from . import svd

NAME = "power"
OPTIONS: dict = {}
NEEDS_GENERATOR = False
init = svd.init
validate = svd.validate


def update(q, x, ctx):
    a = ctx.projected if ctx.projected is not None else q.mT @ x  # Q^T X, r x k (often known already)
    return qr_positive(x @ a.mT)
