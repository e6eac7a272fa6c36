"""Moment formats: how a param group stores Adam's two moments (its ``state_dtype``).

Each entry of :data:`CODECS` is a :class:`Codec` (``_base.py``): its layout (the state keys, dtypes and
shapes it keeps for moments of a given shape, hence its exact bytes, read by the optimizer's checks
and by ``grassopt.memory``), its checkpoint fields (e.g. the int8 code map), and its encode/decode
to and from float32, on which the one Adam of ``grassopt.functional`` runs. A new format is one file
here, one line below, and its tests.
"""

from __future__ import annotations

from typing import Any

from ._base import CHUNK, Codec, Layout
from .bfloat16 import BFloat16
from .factored import Factored, FactoredNoM
from .float32 import Float32
from .int4 import Int4
from .int8 import Int8
from .no_m import NoM

__all__ = ["CODECS", "CHUNK", "Codec", "Layout", "get_codec", "detect", "fits", "MOMENT_KEYS"]

#: name -> codec: the values a param group's ``state_dtype`` may take.
CODECS: dict[str, Codec] = {
    "float32": Float32(),
    "int8": Int8(),
    "bfloat16": BFloat16(),
    "factored": Factored(),
    "no-m": NoM(),
    "factored-no-m": FactoredNoM(),
    "int4": Int4(),
}

#: Every state key a codec stores (the "moments" of the memory accounting).
MOMENT_KEYS = frozenset(k for c in CODECS.values() for k in c.keys())


def get_codec(name: Any) -> Codec:
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"state_dtype={name!r} must be one of {list(CODECS)}") from None


def detect(state: dict) -> str | None:
    """The name of the codec whose layout (keys and dtypes) the moments in ``state`` have, or None."""
    for name, codec in CODECS.items():
        if fits(codec, state):
            return name
    return None


def fits(codec: Codec, state: dict) -> bool:
    """Whether the moments in ``state`` are in ``codec``'s layout (and in no other codec's keys). Two
    codecs may lay some shapes out alike (``factored`` keeps a 1-D tensor's ``V`` whole, as float32)."""
    return codec.matches(state) and not (MOMENT_KEYS - codec.keys()) & set(state)
