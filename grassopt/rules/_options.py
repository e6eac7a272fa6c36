"""Checks shared by the rules' ``validate`` functions (one-line ``ValueError`` messages naming the fix)."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Mapping


def accept_all(options: Mapping[str, Any], rank: int) -> None:
    """The ``validate`` of a rule without options: there is nothing to check."""


def _bad(rule: str, key: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"{key}={value!r} is not valid for subspace rule {rule!r}: use {fix}")


def is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_step_size(rule: str, options: Mapping[str, Any], upper: float | None = None, what: str = "") -> None:
    """``step_size`` a finite number in ``(0, upper]`` (``(0, inf)`` without ``upper``)."""
    if "step_size" not in options:
        return
    v = options["step_size"]
    if not (is_real(v) and v > 0 and (upper is None or v <= upper)):
        span = "a number > 0" if upper is None else f"a number in (0, {upper:.4g}]"
        raise _bad(rule, "step_size", v, span + what)


def check_update_rank(rule: str, options: Mapping[str, Any], rank: int) -> None:
    """``update_rank`` ``"full"`` or an integer in ``[1, rank]``."""
    if "update_rank" not in options:
        return
    v = options["update_rank"]
    if not (v == "full" if isinstance(v, str) else is_int(v) and 1 <= v <= rank):
        raise _bad(rule, "update_rank", v, f"update_rank='full' or an integer in [1, rank={rank}]")


def check_choice(rule: str, options: Mapping[str, Any], key: str, choices) -> None:
    """``options[key]`` one of ``choices``."""
    if key in options and options[key] not in tuple(choices):
        raise _bad(rule, key, options[key], "one of " + ", ".join(repr(c) for c in choices))


def check_probability(rule: str, options: Mapping[str, Any], key: str) -> None:
    if key in options and not (is_real(options[key]) and 0 <= options[key] <= 1):
        raise _bad(rule, key, options[key], "a probability in [0, 1]")


def check_count(rule: str, options: Mapping[str, Any], key: str, minimum: int = 0) -> None:
    if key in options and not (is_int(options[key]) and options[key] >= minimum):
        raise _bad(rule, key, options[key], f"an integer >= {minimum}")
