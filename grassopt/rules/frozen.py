"""``frozen``: the SVD basis of the first gradient, never updated (the no-update ablation)."""

from . import svd

NAME = "frozen"
OPTIONS: dict = {}
NEEDS_GENERATOR = False
init = svd.init
validate = svd.validate


def update(q, x, ctx):
    return q
