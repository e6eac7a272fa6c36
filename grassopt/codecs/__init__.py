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
from .float32 import Float32
from .int8 import Int8

__all__ = ["CODECS", "CHUNK", "Codec", "Layout", "get_codec", "detect", "MOMENT_KEYS"]

#: name -> codec: the values a param group's ``state_dtype`` may take.
CODECS: dict[str, Codec] = {
    "float32": Float32(),
    "int8": Int8(),
    "bfloat16": BFloat16(),
}

#: Every state key a codec stores (the "moments" of the memory accounting).
MOMENT_KEYS = frozenset(k for c in CODECS.values() for k in c.layout((1,)))


def get_codec(name: Any) -> Codec:
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"state_dtype={name!r} must be one of {list(CODECS)}") from None


def detect(state: dict) -> str | None:
    """The name of the codec whose layout (keys and dtypes) the moments in ``state`` have, or None."""
    for name, codec in CODECS.items():
        lay = codec.layout((1,))
        if all(getattr(state.get(k), "dtype", None) == dt for k, (dt, _) in lay.items()) and \
                not (MOMENT_KEYS - set(lay)) & set(state):
            return name
    return None
