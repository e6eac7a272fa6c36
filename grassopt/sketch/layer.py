"""``SketchedLinear``: an ``nn.Linear`` whose backward pass needs only ``x P`` (docs/algorithms.md#sketches).

A sketched layer keeps the original ``weight`` and ``bias`` Parameter objects (optimizers, weight
tying and ``state_dict`` keys keep working) and adds, in RSO mode, a trainable ``B`` (``m x r``).

Sharing. Layers that read the same input tensor (q/k/v of an attention block, gate/up of a SwiGLU
MLP) share one projection group: one ``P`` and one stored ``x P``. Groups form by themselves in the
first forward pass that needs them (``share="input"``): a layer without a group joins the group of
a layer that already consumed the very same input tensor (same object, same version, same rank),
or starts its own. The group's index (the index of its first layer among the sketched layers, in
module order) seeds its ``P``, and each layer's group index is saved in its ``state_dict``
(``_extra_state``), so a resumed run has its groups (and its ``P``) before any forward pass.
``share=None`` gives every layer its own ``P``.

Sharing a ``P`` between layers changes nothing in expectation (each layer's estimate stays
unbiased); it only correlates the estimation errors of layers that read the same input.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .function import SketchedLinearFunction
from .laws import LAWS, check_law, projection

__all__ = ["MODES", "SHARES", "SketchState", "ProjectionGroup", "SketchedLinear"]

#: Modes of a sketched model; the codes are stored in checkpoints (never renumber them).
MODES: dict[str, int] = {"estimator": 0, "rso": 1}
#: How layers share projections: ``"input"`` (layers reading the same tensor) or ``None``.
SHARES = ("input", None)
_AUTOCAST_DEVICES = {"cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "maia"}
_FORMAT = 1  # layout of the _extra_state tensor
_REGISTRY_LIMIT = 64  # inputs remembered for group formation (dead references are pruned first)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown sketch mode {mode!r}; choose 'estimator' (unbiased lifted gradient "
                         f"G P P^T in W.grad) or 'rso' (randomized subspace optimization)")
    return mode


def _name_of(codes: dict[str, int], code: int) -> str | int:
    return next((k for k, v in codes.items() if v == code), code)


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``P`` is drawn and merged in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


class ProjectionGroup:
    """Layers that share one sketch matrix ``P`` (``n x r``) and, per input, one ``x P``."""

    def __init__(self, state: SketchState, index: int, n: int, r: int):
        self.state, self.index, self.n, self.r = state, index, n, r
        self._key: tuple | None = None  # (step, device, master dtype) of the cached matrices
        self._casts: dict[torch.dtype, Tensor] = {}
        self._xp: tuple | None = None  # (weakref x, x version, weakref xp, p)

    def matrix(self, device: torch.device, weight_dtype: torch.dtype, dtype: torch.dtype | None = None) -> Tensor:
        """``P`` at the current step, drawn in ``_master_dtype(weight_dtype)``, returned in ``dtype``
        (default: the master dtype). Cached until the step changes."""
        master = _master_dtype(weight_dtype)
        key = (self.state.step, torch.device(device), master)
        if self._key != key:
            p = projection(self.state.law, self.n, self.r, self.state.seed, self.state.step, self.index,
                           device=device, dtype=master)
            self._key, self._casts, self._xp = key, {master: p}, None
        dtype = master if dtype is None else dtype
        cached = self._casts.get(dtype)
        if cached is None:
            cached = self._casts[dtype] = self._casts[master].to(dtype)
        return cached

    def cached_matrices(self) -> list[Tensor]:
        """The matrices held for the current step (master and casts): resident, not activations."""
        return list(self._casts.values())

    def sketch(self, x: Tensor, xc: Tensor, p: Tensor) -> Tensor:
        """``xc @ p`` without a graph; the same tensor for every layer of the group that reads ``x``.

        ``x`` is the layer's input as received (the cache key), ``xc`` it in the compute dtype.
        Only weak references are kept: once the autograd graph that saved ``xp`` is freed, so is it.
        """
        c = self._xp
        if c is not None and c[0]() is x and c[1] == x._version and c[3] is p:
            xp = c[2]()
            if xp is not None:
                return xp
        with torch.no_grad():
            xp = torch.matmul(xc.detach(), p)
        self._xp = (weakref.ref(x), x._version, weakref.ref(xp), p)
        return xp

    def clear(self) -> None:
        self._key, self._casts, self._xp = None, {}, None

    def __getstate__(self) -> dict[str, Any]:  # pickling / deepcopy: caches are rebuilt on demand
        d = dict(self.__dict__)
        d.update(_key=None, _casts={}, _xp=None)
        return d


class SketchState:
    """What the sketched layers of one model share: settings, the step counter, the groups.

    ``step`` indexes the sketch matrices: the optimizer step (estimator mode, advanced by
    :func:`grassopt.sketch.next_step`) or the outer iteration (RSO mode, advanced by the
    :class:`grassopt.sketch.RSO` optimizer). It is saved in every sketched layer's ``state_dict``.
    """

    def __init__(self, mode: str, law: str, seed: int, share: str | None):
        self.mode, self.law, self.seed, self.share = check_mode(mode), check_law(law), int(seed), share
        self.step = 0
        self.groups: dict[int, ProjectionGroup] = {}
        self._inputs: list[tuple[weakref.ref, int, ProjectionGroup]] = []
        self.ungrouped = 0

    def group(self, index: int, n: int, r: int) -> ProjectionGroup:
        g = self.groups.get(index)
        if g is None:
            g = self.groups[index] = ProjectionGroup(self, index, n, r)
        elif (g.n, g.r) != (n, r):
            raise ValueError(f"projection group {index} has n={g.n}, r={g.r}; a layer with n={n}, r={r} "
                             "cannot join it (the checkpoint does not match this model)")
        return g

    def find_input(self, x: Tensor) -> ProjectionGroup | None:
        self._inputs = [e for e in self._inputs if e[0]() is not None]
        for ref, version, g in reversed(self._inputs):
            if ref() is x and version == x._version:
                return g
        return None

    def remember_input(self, x: Tensor, g: ProjectionGroup) -> None:
        if self.find_input(x) is None:
            self._inputs.append((weakref.ref(x), x._version, g))
            del self._inputs[:-_REGISTRY_LIMIT]

    def clear_caches(self) -> None:
        self._inputs = []
        for g in self.groups.values():
            g.clear()

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_inputs"] = []
        return d


class SketchedLinear(nn.Linear):
    """A linear layer whose backward pass stores only ``x P`` (see :mod:`grassopt.sketch`).

    It is an ``nn.Linear`` (same ``weight``, ``bias``, ``in_features``, ``out_features``), so code
    that selects linear layers, such as :func:`grassopt.param_groups`, still finds it.

    Built from an ``nn.Linear`` by :func:`grassopt.sketch.sketch`; ``weight`` and ``bias`` are the
    very Parameter objects of that layer. In ``"estimator"`` mode ``weight.grad`` receives the
    unbiased estimate ``G P P^T``; in ``"rso"`` mode ``weight`` is frozen and the trainable ``B``
    (``out_features x rank``, zero-initialised, at least float32) gets the exact gradient ``G P``; the layer computes
    ``x (W + B P^T)^T + bias``. Without autograd (``torch.no_grad()``, evaluation) no ``x P`` is
    stored and the estimator layer is an ordinary linear layer.
    """

    def __init__(self, linear: nn.Linear, rank: int, state: SketchState, index: int, name: str = ""):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the parameters are the given layer's
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        if linear.bias is not None:
            self.bias = linear.bias
        else:
            self.register_parameter("bias", None)
        self.rank, self.index, self.name = int(rank), int(index), name
        self._state = state
        self._group: ProjectionGroup | None = None
        self._weight_requires_grad = linear.weight.requires_grad
        if state.mode == "rso":
            w = linear.weight
            # B is the optimizer's variable: at least float32, like the merge (cast for the forward)
            self.B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=w.device,
                                              dtype=_master_dtype(w.dtype)))
            w.requires_grad_(False)
        else:
            self.register_parameter("B", None)
        if state.share is None:
            self._group = state.group(self.index, self.in_features, self.rank)
        else:
            state.ungrouped += 1

    # ------------------------------------------------------------------ groups and P
    @property
    def mode(self) -> str:
        return self._state.mode

    @property
    def group(self) -> ProjectionGroup | None:
        """This layer's projection group (``None`` until its first forward pass that needs one)."""
        return self._group

    def _set_group(self, g: ProjectionGroup) -> None:
        if self._group is None:
            self._state.ungrouped -= 1
        self._group = g

    def _group_for(self, x: Tensor) -> ProjectionGroup:
        st = self._state
        g = self._group
        if g is None:
            g = st.find_input(x)
            if g is None or g.r != self.rank or g.n != self.in_features:
                g = st.group(self.index, self.in_features, self.rank)
            self._set_group(g)
        if st.ungrouped > 0:  # let layers not grouped yet join through this input
            st.remember_input(x, g)
        return g

    def projection_matrix(self, dtype: torch.dtype | None = None) -> Tensor | None:
        """``P`` (``in_features x rank``) of the current step, or ``None`` while the layer has no group."""
        if self._group is None:
            return None
        return self._group.matrix(self.weight.device, self.weight.dtype, dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        w, bias, b = self.weight, self.bias, self.B
        dev = x.device.type
        autocast = dev in _AUTOCAST_DEVICES and x.is_floating_point() and torch.is_autocast_enabled(dev)
        graph = torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)
                                             or (bias is not None and bias.requires_grad))
        if not graph:
            y = F.linear(x, w, bias)
            if b is not None:  # (x P) B^T, under autocast if it is on
                p = self._group_for(x).matrix(w.device, w.dtype, None if autocast else x.dtype)
                y = y + torch.matmul(torch.matmul(x, p), (b if autocast else b.to(x.dtype)).mT)
            return y
        ct = torch.get_autocast_dtype(dev) if autocast else x.dtype

        def cast(t: Tensor | None) -> Tensor | None:
            return t if t is None or t.dtype == ct or not t.is_floating_point() else t.to(ct)

        g = self._group_for(x)
        p = g.matrix(w.device, w.dtype, ct)
        xc = cast(x)
        xp = g.sketch(x, xc, p)  # type: ignore[arg-type]  # (xc: x is a tensor)
        ctx = torch.autocast(dev, enabled=False) if autocast else contextlib.nullcontext()
        with ctx:
            return SketchedLinearFunction.apply(xc, xp, cast(w), cast(bias), p, cast(b))

    # ------------------------------------------------------------------ state dict
    def get_extra_state(self) -> Tensor:
        """``[format, mode, law, rank, seed, step, group index]`` as an int64 tensor (safetensors-safe)."""
        st = self._state
        gi = -1 if self._group is None else self._group.index
        return torch.tensor([_FORMAT, MODES[st.mode], LAWS[st.law], self.rank, st.seed, st.step, gi],
                            dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        t = torch.as_tensor(state).to("cpu", torch.int64).tolist()
        if len(t) != 7 or t[0] != _FORMAT:
            raise ValueError(f"{self.name or 'sketched layer'}: unrecognised sketch state {t!r} in the checkpoint")
        _, mode, law, rank, seed, step, gi = t
        st = self._state
        saved = {"mode": _name_of(MODES, mode), "law": _name_of(LAWS, law), "rank": rank}
        ours = {"mode": st.mode, "law": st.law, "rank": self.rank}
        mismatch = [f"{k}={saved[k]!r} (this model: {ours[k]!r})" for k in saved if saved[k] != ours[k]]
        if mismatch:
            raise ValueError(f"{self.name or 'sketched layer'}: the checkpoint was sketched with "
                             f"{', '.join(mismatch)}; call grassopt.sketch.sketch (or rso) with the "
                             "checkpoint's settings before loading it")
        if (st.seed, st.step) != (seed, step):
            st.seed, st.step = seed, step  # the checkpoint's stream of sketch matrices continues
            st.clear_caches()
        if gi >= 0 and (self._group is None or self._group.index != gi):
            self._set_group(st.group(gi, self.in_features, self.rank))

    def extra_repr(self) -> str:
        st = self._state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, mode={st.mode}, law={st.law}")
