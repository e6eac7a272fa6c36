"""``svd`` (GaLore): the top-``r`` singular subspace of the current gradient, recomputed every ``T`` steps.

The SVD is ``linalg.robust_svd``: when LAPACK/cuSOLVER fails to converge it falls back (``gesvd`` on
CUDA, float64, the Gram's ``eigh``) and adds one to ``ctx.svd_fallbacks``; it never returns NaN.
"""

from ..linalg import svd_basis
from ._options import accept_all

NAME = "svd"
OPTIONS: dict = {}
NEEDS_GENERATOR = False
validate = accept_all


def init(x, ctx):
    return svd_basis(x, ctx.rank, ctx.transposed, stats=ctx)  # robust: counts fallbacks in ctx


def update(q, x, ctx):
    return svd_basis(x, ctx.rank, ctx.transposed, stats=ctx)
