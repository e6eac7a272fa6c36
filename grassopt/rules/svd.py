"""``svd`` (GaLore): the top-``r`` singular subspace of the current gradient, recomputed every ``T`` steps."""

from ..linalg import svd_basis

NAME = "svd"
OPTIONS: dict = {}
NEEDS_GENERATOR = False


def init(x, ctx):
    return svd_basis(x, ctx.rank, ctx.transposed)


def update(q, x, ctx):
    return svd_basis(x, ctx.rank, ctx.transposed)
