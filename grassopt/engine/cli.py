"""Argument types shared by the command lines of the training applications."""

from __future__ import annotations

import argparse
import ast

from ..targets import resolve_rank

__all__ = ["key_value", "rank_spec"]


def key_value(text: str) -> tuple[str, object]:
    """``--opt KEY=VALUE``: the key (``-`` read as ``_``) and the value as a Python literal, else the string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip().replace("-", "_"), parsed


def rank_spec(text: str) -> int | str:
    """``--rank``: an integer, or a fraction of each matrix's short side such as ``d/4``."""
    value: int | str = int(text) if text.strip().lstrip("-").isdigit() else text
    try:
        resolve_rank(value, (1 << 62, 1 << 62))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value
