"""What a moment format is: the :class:`Codec` interface every entry of ``grassopt.codecs.CODECS`` implements."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["CHUNK", "Codec", "Layout"]

#: Elements a codec decodes at a time in the chunked Adam (a multiple of every codec's block): bounds
#: the transient memory of a step to a few float32 chunks. Read at call time (tests lower it).
CHUNK = 1 << 20

#: ``{state key: (dtype, shape)}`` of the tensors a codec stores for one moment pair.
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


class Codec:
    """How one parameter's Adam moments ``M`` and ``V`` (of a given shape) are stored in its state.

    A codec declares its layout (:meth:`layout`: the tensors it keeps, so also its exact bytes) and
    its checkpoint fields (:attr:`FIELDS`), and converts between its storage and float32
    (:meth:`load` decodes a range of flat elements, :meth:`store` encodes it back). The Adam maths
    (``grassopt.functional``) runs in float32 on what :meth:`load` returns, :data:`CHUNK` elements at
    a time, so a new format is its layout, its ``load``/``store`` and one line in ``CODECS``.
    """

    #: its name in ``CODECS`` (a param group's ``state_dtype``)
    NAME = ""
    #: True when the moments are float32 tensors that :meth:`tensors` returns as they are stored: the
    #: optimizer then steps them in place, fused over the tensors of a group.
    DENSE = False
    #: non-tensor checkpoint fields ``{key: value}`` and the value a checkpoint written before the
    #: field existed is read with (e.g. the int8 code map)
    FIELDS: dict[str, Any] = {}
    #: float32 layout keys whose values are never negative (checked when a checkpoint is loaded)
    NON_NEGATIVE: frozenset[str] = frozenset()
    #: True when the codec updates its ``V`` itself from the whole gradient (:meth:`update_v_`) before
    #: the chunked Adam, which then reads ``V`` as given and stores back only ``M`` (:meth:`store_m`):
    #: a statistic of the whole tensor (e.g. factored row and column sums) cannot be updated a chunk
    #: at a time. :meth:`load` and :meth:`store` keep their meaning (whole moments: the transport).
    UPDATES_V = False

    def layout(self, shape: tuple[int, ...]) -> Layout:
        """The tensors stored for moments of ``shape``: ``{key: (dtype, shape)}``."""
        raise NotImplementedError

    def keys(self) -> frozenset[str]:
        """Every state key this codec may store, for moments of any shape."""
        return frozenset(self.layout((1,)))

    def matches(self, state: dict) -> bool:
        """Whether the moments in ``state`` have one of this codec's layouts (keys and dtypes)."""
        lay = self.layout((1,))
        return all(getattr(state.get(k), "dtype", None) == dt for k, (dt, _) in lay.items())

    def group_error(self, group: dict[str, Any]) -> str | None:
        """Why a param group's other options (e.g. ``betas``) cannot use this codec, or None."""
        return None

    def fields(self) -> dict[str, Any]:
        """The non-tensor fields written into new state (the settings that wrote it)."""
        return {}

    def init(self, state: dict, shape: tuple[int, ...], device: torch.device | str,
             like: Tensor | None = None) -> None:
        """Zero moments of ``shape`` on ``device`` in ``state``, with the codec's fields (``like``: the
        parameter, for codecs whose tensors follow its layout and tensor type, e.g. a DTensor)."""
        for key, (dtype, shp) in self.layout(tuple(shape)).items():
            state[key] = torch.zeros(shp, dtype=dtype, device=device)
        state.update(self.fields())

    def shape(self, state: dict) -> torch.Size:
        """The shape of the moments held in ``state``."""
        return state["exp_avg"].shape

    def numel(self, state: dict) -> int:
        return math.prod(self.shape(state))

    def tensors(self, state: dict) -> tuple[Tensor, Tensor]:
        """``(M, V)`` as stored, for a :attr:`DENSE` codec."""
        raise TypeError(f"{self.NAME!r} moments are not stored as float32 tensors")

    def load(self, state: dict, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor]:
        """Float32 flat ``(M, V)`` of elements ``[lo, hi)`` (bounds from :meth:`chunks`). They may be
        views of the state (dense codecs) or work buffers valid until the next ``load``: call
        :meth:`store` before that."""
        raise NotImplementedError

    def store(self, state: dict, m: Tensor, v: Tensor, lo: int = 0, generator: torch.Generator | None = None) -> None:
        """Encode float32 flat ``m``, ``v`` back into elements ``[lo, lo + m.numel())``."""
        raise NotImplementedError

    def update_v_(self, state: dict, grad: Tensor, beta2: float) -> None:
        """``V = b2 V + (1 - b2) G*G`` in the codec's own form, for a :attr:`UPDATES_V` codec (``grad``:
        the moments' shape, any float dtype)."""
        raise NotImplementedError

    def store_m(self, state: dict, m: Tensor, lo: int = 0) -> None:
        """Encode float32 flat ``m`` back into elements ``[lo, lo + m.numel())`` of ``M`` alone (a
        :attr:`UPDATES_V` codec's step: ``V`` was stored by :meth:`update_v_`)."""
        raise NotImplementedError

    def chunks(self, n: int) -> Iterator[tuple[int, int]]:
        """``(lo, hi)`` ranges covering ``n`` elements, :data:`CHUNK` at a time."""
        step = CHUNK
        return ((lo, min(lo + step, n)) for lo in range(0, n, step))

    def needs_generator(self, state: dict) -> bool:
        """Whether :meth:`store` draws random numbers for this state (it is then given the parameter's
        generator)."""
        return False

    def field_error(self, key: str, value: Any) -> str | None:
        """Why a saved checkpoint field is not valid for this codec, or None."""
        return None

    def __repr__(self) -> str:
        return f"<codec {self.NAME!r}>"
