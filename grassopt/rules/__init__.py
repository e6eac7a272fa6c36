"""Subspace rules: where the basis ``Q`` comes from (docs/algorithms.md#rules).

The rule protocol. A rule is one small module with

- ``NAME`` (str): its registry name;
- ``OPTIONS`` (dict): its own options and their defaults. They live in the param group (the
  optimizer fills in the defaults) and reach the rule as ``ctx.options``; an option of another rule
  in the group is an error;
- ``NEEDS_GENERATOR`` (bool): whether it draws random numbers. The optimizer then owns a generator
  for the parameter, seeded from ``(seed, parameter index)`` and saved in ``state_dict``, and passes
  it as ``ctx.generator``; a rule draws from nothing else;
- ``init(x, ctx) -> Q`` and ``update(q, x, ctx) -> Q'``: pure functions on float32 tensors (on ``x``'s
  device): ``x`` is the gradient oriented with the short side as rows (``d x k``), ``Q`` is ``d x r``.
  ``update`` may set ``ctx.angle`` to the largest principal angle it moved (a tensor, when it knows
  it exactly; otherwise the optimizer measures it with ``linalg.largest_angle``). Both add one to
  ``ctx.svd_fallbacks`` each time an SVD needed a fallback (``linalg.robust_svd``);
- ``validate(options, rank) -> None`` (optional): raises a ``ValueError`` with a one-line message
  naming the option and the fix when one of its options has a bad value. ``options`` holds only the
  rule's own options that were given (missing ones take their defaults and need no check). Call it
  through :func:`check_options`; a rule without ``validate`` accepts any value of its options.

Two optional flags (read with :func:`rule_flag`):

- ``ORTHONORMAL`` (default True): the bases have orthonormal columns. When False (``gaussian``)
  the optimizer skips re-orthonormalisation and angle diagnostics, and refuses ``rotate``
  transport and recovery scaling, which assume ``Q Q^T`` is a projector;
- ``FROM_SEED`` (default False): the basis is a pure function of a seed. The optimizer then stores
  the seed (a plain int), not ``Q``, draws a new seed at each basis update, and calls ``init``
  with a generator seeded from it at every step to regenerate ``Q``.

Adding a rule is one file here and one line in ``RULES``; the optimizer does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Mapping

import torch

from . import frozen, gaussian, hybrid, jump, power, rsvd, svd, track, walk

RULES: dict[str, ModuleType] = {
    m.NAME: m for m in (svd, rsvd, frozen, power, track, walk, jump, hybrid, gaussian)
}


@dataclass
class RuleContext:
    """What a rule may read besides the gradient: the group's options and the parameter's RNG."""

    rank: int
    transposed: bool
    generator: torch.Generator | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    #: ``Q^T X`` in the current basis when the optimizer already has it (saves a product)
    projected: torch.Tensor | None = None
    #: set by ``update`` to the largest principal angle it moved, when it knows it exactly
    angle: torch.Tensor | None = None
    #: incremented by ``init``/``update`` each time an SVD needed a fallback (``linalg.robust_svd``)
    svd_fallbacks: int = 0


def get_rule(name: str) -> ModuleType:
    """The rule module registered as ``name``; a ``ValueError`` listing the known ones otherwise."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown subspace rule {name!r}; choose one of {sorted(RULES)}"
        ) from None


_FLAG_DEFAULTS = {"ORTHONORMAL": True, "FROM_SEED": False}


def rule_flag(rule: ModuleType, flag: str) -> bool:
    """A rule's optional flag (``ORTHONORMAL`` or ``FROM_SEED``), with its default."""
    return bool(getattr(rule, flag, _FLAG_DEFAULTS[flag]))


def check_options(rule: ModuleType, options: Mapping[str, Any], rank: int) -> None:
    """Check the values of ``rule``'s options in ``options`` (a param group, or any mapping).

    Only the keys of ``rule.OPTIONS`` are looked at (a param group holds many others); they are
    passed to ``rule.validate(own_options, rank)`` when the rule has one. Raises the rule's
    ``ValueError`` (a one-line message naming the option and the fix), e.g.
    ``update_rank=0 is not valid for subspace rule 'walk': use update_rank='full' or an integer
    in [1, rank=8]``.
    """
    validate = getattr(rule, "validate", None)
    if validate is None:
        return
    validate({k: options[k] for k in rule.OPTIONS if k in options}, rank)


def all_rule_options() -> set[str]:
    """Every option name some rule understands."""
    return {k for m in RULES.values() for k in m.OPTIONS}
