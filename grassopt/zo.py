"""Forward-only training: zeroth-order low-rank gradient estimates with Haar-Stiefel subspaces.

For each covered weight ``W`` (``m x n``, an ``nn.Linear``) a step perturbs along a low-rank
direction ``Z = U V^T``: ``U`` (``m x r``) fresh N(0, 1) every step, ``V`` (``n x r``) drawn from a
sketch law with ``E[V V^T] = I`` (``haar`` by default, ``gaussian``, ``coordinate``; see
``grassopt.sketch.laws``) and kept for ``lazy`` steps. All covered layers move together; the
directional derivative is estimated by two forward passes (SPSA),

    g = (L(W + eps Z) - L(W - eps Z)) / (2 eps),

and every layer steps along ``g U V^T``. Given ``V``, ``E_U[g U V^T] = G V V^T`` for a quadratic loss
(and as ``eps -> 0`` in general), the gradient projected on the subspace of ``V``; averaged over
``V`` it is the gradient itself. With ``dense=True`` the direction is a full Gaussian ``Z`` (MeZO),
whose estimate is unbiased for ``G``.

Memory. Nothing is stored but seeds: ``U``, ``V`` (and MeZO's ``Z``) are regenerated from
``(seed, step, layer)`` whenever they are needed (the MeZO trick). The perturbation is not
written into ``W``: a forward hook adds ``sign * eps * (x V) U^T`` to the layer's output, which is
exactly the output of ``W + sign * eps U V^T`` without touching ``W`` (so the weights are restored
bit for bit by construction) and with ``O((m + n) r)`` extra memory for one layer at a time. The
optional momentum lives in the ``m x r`` coordinates ``g U`` while ``V`` is fixed (reset when ``V``
changes): ``O(m r)`` per layer.

Usage::

    opt = grassopt.zo.ZO(model, rank=8, lr=1e-4, eps=1e-3, law="haar", lazy=50)
    for batch in data:
        loss = opt.step(lambda: loss_fn(model, batch))    # two forward passes, no backward

Parameters outside the covered layers are frozen (``others="frozen"``, the default) or perturbed
in place with a full-rank Gaussian (``others="perturb"``; their restoration then carries float
rounding, as in MeZO).

Divergence guard. Non-finite options are refused, at construction and (``lr``, ``eps``, ``momentum``,
``weight_decay``) again before each step's forward passes, since a scheduler may set them. A step whose losses or estimate ``g`` are not finite changes
nothing: it raises ``FloatingPointError`` (``nonfinite="raise"``, the default) or is skipped, counted
in ``skipped_steps`` and warned about (``nonfinite="skip"``). ``clip`` bounds ``|g|`` (off by default:
the scale of ``g`` is that of the loss's directional derivative along a random direction, which
depends on the loss and the layer sizes, so no bound is right for every model, and one that acted
by default would silently change the steps); clipped steps are counted in ``clipped_steps``, and
``last_estimate`` holds the last ``g`` before clipping, to choose ``clip`` from.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from numbers import Integral, Real
from typing import Any, cast

import torch
from torch import Tensor, nn

from .targets import select_targets
from .sketch.laws import LAWS, check_law, mix_seed, projection

__all__ = ["ZO"]

_U, _V, _Z, _OTHER = 0, 1, 2, 3  # streams of the seed derivation
NONFINITE = ("raise", "skip")


def _finite(v: Any, low: float, strict: bool = False, high: float = math.inf) -> bool:
    """``v`` a real number (not a bool, not a tensor), finite, ``>= low`` (``> low``) and ``< high``."""
    x = cast(float, v)  # (the type checker's Real has no comparisons)
    return (isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(x)
            and (x > low if strict else x >= low) and x < high)


def _option_error(key: str, v: Any) -> str | None:
    """The one-line message for a bad value of a numeric option of a ZO param group, else None."""
    if key == "lr" and not _finite(v, 0.0):
        return f"lr={v!r} must be >= 0 and finite (a float learning rate such as 1e-4)"
    if key == "eps" and not _finite(v, 0.0, strict=True):
        return f"eps={v!r} must be > 0 and finite (the perturbation size, e.g. 1e-3)"
    if key == "momentum" and not _finite(v, 0.0, high=1.0):
        return f"momentum={v!r} must lie in [0, 1) (0: plain SGD)"
    if key == "weight_decay" and not _finite(v, 0.0):
        return f"weight_decay={v!r} must be >= 0 and finite (e.g. 0.0)"
    return None


class ZO(torch.optim.Optimizer):
    """Zeroth-order (forward-only) optimizer with low-rank perturbations; see the module docstring.

    Args:
        model: the module whose loss the closure computes.
        rank: ``r`` of the perturbation ``U V^T`` (ignored with ``dense=True``).
        lr: learning rate; eps: perturbation size; momentum: in ``m x r`` coordinates (0: SGD).
        law: law of ``V`` (``haar``, ``gaussian``, ``coordinate``); lazy: steps ``V`` is kept.
        targets: linear layers to cover (as :func:`grassopt.select_targets`).
        dense: MeZO's full-rank Gaussian direction instead of ``U V^T``.
        others: ``"frozen"`` or ``"perturb"`` for parameters outside the covered layers.
        weight_decay: decoupled, applied to covered weights at each step.
        seed: all randomness derives from ``(seed, step, layer)``.
        clip: bound on ``|g|``, the estimated directional derivative of a step (None: off).
        nonfinite: ``"raise"`` or ``"skip"``: what a step whose losses or ``g`` are not finite does
            (either way it changes nothing; see the module docstring).
    """

    zeroth_order = True  # training loops check this: step(closure) without backward

    # set in __init__ (declared here: their types are needed before __init__ is checked)
    model: nn.Module
    rank: int
    law: str
    lazy: int
    dense: bool
    seed: int
    others: str
    clip: float | None
    nonfinite: str
    clipped_steps: int
    skipped_steps: int
    _layers: list[nn.Linear]
    _extra: list[Tensor]
    _step: int
    _handles: list[Any]

    def __init__(self, model: nn.Module, rank: int = 8, lr: float = 1e-4, eps: float = 1e-3, *,
                 momentum: float = 0.0, law: str = "haar", lazy: int = 50, targets: str | Iterable[str] = "all-linear",
                 dense: bool = False, others: str = "frozen", weight_decay: float = 0.0, seed: int = 0,
                 clip: float | None = None, nonfinite: str = "raise"):
        check_law(law)
        for key, value in (("lr", lr), ("eps", eps), ("momentum", momentum), ("weight_decay", weight_decay)):
            msg = _option_error(key, value)
            if msg:
                raise ValueError(msg)
        if clip is not None and not _finite(clip, 0.0, strict=True):
            raise ValueError(f"clip={clip!r} must be None (off) or > 0 and finite (the bound on |g|, the estimated "
                             "directional derivative; see ZO.last_estimate for its scale)")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite={nonfinite!r} must be 'raise' or 'skip' (what a step with a non-finite "
                             "loss or estimate does)")
        if not isinstance(lazy, Integral) or isinstance(lazy, bool) or lazy < 1:
            raise ValueError(f"lazy={lazy!r} must be an integer >= 1 (steps a subspace V is kept)")
        if not isinstance(seed, Integral) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} must be an integer (all randomness derives from it), e.g. seed=0")
        if not isinstance(dense, bool):
            raise ValueError(f"dense={dense!r} must be True or False")
        if dense and momentum:
            raise ValueError("momentum lives in the m x r coordinates of the low-rank mode; "
                             "dense (MeZO) steps are plain SGD: use momentum=0 with dense=True")
        if others not in ("frozen", "perturb"):
            raise ValueError(f"others={others!r} must be 'frozen' or 'perturb'")
        layers = [(name, mod) for name, mod in select_targets(model, targets) if mod.weight.requires_grad]
        if not layers:
            raise ValueError(f"no nn.Linear matched targets={targets!r}; ZO needs at least one covered layer")
        if not dense:
            for name, mod in layers:
                if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= mod.in_features:
                    raise ValueError(f"rank={rank!r} must be an integer in [1, in_features={mod.in_features}] for "
                                     f"{name}; lower the rank or leave this layer out of targets")
        covered = {id(mod.weight) for _, mod in layers}  # biases count among the others
        extra = [(n, p) for n, p in model.named_parameters()
                 if p.requires_grad and id(p) not in covered] if others == "perturb" else []
        groups = [{"params": [mod.weight for _, mod in layers], "param_names": [f"{n}.weight" for n, _ in layers]}]
        if extra:
            groups.append({"params": [p for _, p in extra], "param_names": [n for n, _ in extra]})
        self._built = False
        super().__init__(groups, dict(lr=lr, eps=eps, momentum=momentum, weight_decay=weight_decay))
        self._built = True
        self.model, self.rank, self.law, self.lazy, self.dense, self.seed = model, rank, law, lazy, dense, seed
        self.others, self.clip, self.nonfinite = others, clip, nonfinite
        self.clipped_steps = self.skipped_steps = 0
        self.last_estimate: float | None = None
        self._layers = [mod for _, mod in layers]
        self._extra = [p for _, p in extra]
        self._active: tuple[int, float] | None = None  # (step, signed eps) while a perturbed pass runs
        self._step = 0
        self._handles = [mod.register_forward_hook(self._make_hook(i)) for i, mod in enumerate(self._layers)]

    # ---------------------------------------------------------------- random directions (regenerated)
    def _gen(self, device, step: int, stream: int, index: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(mix_seed(mix_seed(self.seed, stream, index), step, LAWS[self.law]))
        return g

    def _uv(self, i: int, step: int) -> tuple[Tensor, Tensor]:
        w = self._layers[i].weight
        m, n = w.shape
        u = torch.randn(m, self.rank, generator=self._gen(w.device, step, _U, i), device=w.device)
        v = projection(self.law, n, self.rank, mix_seed(self.seed, _V, 0), step // self.lazy, i, device=w.device)
        return u, v

    def _z(self, p: Tensor, stream: int, i: int, step: int) -> Tensor:
        return torch.randn(p.shape, generator=self._gen(p.device, step, stream, i), device=p.device)

    def _make_hook(self, i: int):
        def hook(module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if self._active is None:
                return None
            step, signed_eps = self._active
            x = inputs[0].reshape(-1, module.in_features)
            out = output if output.is_contiguous() else output.contiguous()
            flat = out.view(-1, module.out_features)  # += eps x Z^T in place: no output-size temporary
            if self.dense:
                flat.addmm_(x, self._z(module.weight, _Z, i, step).to(x.dtype).mT, alpha=signed_eps)
            else:
                u, v = self._uv(i, step)
                flat.addmm_(x @ v.to(x.dtype), u.mT.to(x.dtype), alpha=signed_eps)
            return out
        return hook

    def _perturb_others(self, scale: float, step: int) -> None:
        for j, p in enumerate(self._extra):
            p.add_(self._z(p, _OTHER, j, step).to(p.dtype), alpha=scale)

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """Two forward passes of ``closure`` (at ``+eps`` and ``-eps``) and one update.

        Returns the mean of the two losses (an estimate of the loss at the current weights).
        """
        if closure is None:
            raise ValueError("ZO.step needs a closure that returns the loss (it runs forward passes only)")
        for gi, group in enumerate(self.param_groups):  # a scheduler (or a user) may have changed them
            for key in ("lr", "eps", "momentum", "weight_decay") if gi == 0 else ("lr",):
                msg = _option_error(key, group[key])
                if msg:
                    raise ValueError(f"param group {gi}: {msg}; it was set after construction (an LR "
                                     "scheduler?): nothing was updated")
        step = self._step
        eps = self.param_groups[0]["eps"]
        applied = 0.0  # how far the in-place perturbation of `others` currently is from the weights
        try:
            self._active = (step, eps)
            self._perturb_others(eps, step)
            applied = eps
            loss_plus = closure().detach().float()
            self._active = (step, -eps)
            self._perturb_others(-2 * eps, step)
            applied = -eps
            loss_minus = closure().detach().float()
        finally:
            self._active = None
            if applied:
                self._perturb_others(-applied, step)
        g = ((loss_plus - loss_minus) / (2 * eps)).item()
        if not math.isfinite(g):  # a non-finite loss, or a difference quotient that overflowed
            what = (f"non-finite loss in a ZO step ({loss_plus.item()}, {loss_minus.item()})"
                    if not (torch.isfinite(loss_plus) and torch.isfinite(loss_minus)) else
                    f"non-finite estimate g = (L+ - L-) / (2 eps) = {g} in a ZO step (losses {loss_plus.item()}, "
                    f"{loss_minus.item()})")
            if self.nonfinite == "raise":
                raise FloatingPointError(f"{what}; lower eps or the learning rate; nothing was updated "
                                         "(nonfinite='skip' skips such steps)")
            self.skipped_steps += 1
            self._step += 1  # the next step draws fresh directions
            warnings.warn(f"{what}; the step was skipped, nothing was updated ({self.skipped_steps} skipped so far)",
                          RuntimeWarning, stacklevel=2)
            return (loss_plus + loss_minus) / 2
        self.last_estimate = g
        if self.clip is not None and abs(g) > self.clip:
            g = math.copysign(self.clip, g)
            self.clipped_steps += 1
        self._update(g, step)
        self._step += 1
        return (loss_plus + loss_minus) / 2

    def _update(self, g: float, step: int) -> None:
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for i, mod in enumerate(self._layers):
            w = mod.weight
            w32 = w if w.dtype == torch.float32 else w.float()
            if self.dense:
                w32.add_(self._z(w, _Z, i, step), alpha=-lr * g)
            else:
                u, v = self._uv(i, step)
                coords = u.mul_(g)  # g U, m x r
                if mom:
                    st = self.state[w]
                    block = step // self.lazy
                    if st.get("block") != block:  # a new V: the old coordinates mean nothing now
                        st["momentum_buffer"] = torch.zeros_like(coords)
                        st["block"] = block
                    buf = st["momentum_buffer"]
                    buf.mul_(mom).add_(coords)
                    coords = buf
                w32.addmm_(coords, v.mT, alpha=-lr)
            if wd:
                w32.add_(w32, alpha=-lr * wd)
            if w32 is not w:
                w.copy_(w32)
        if self._extra:
            lr_x = self.param_groups[1]["lr"] if len(self.param_groups) > 1 else lr
            for j, p in enumerate(self._extra):
                p.add_(self._z(p, _OTHER, j, step).to(p.dtype), alpha=-lr_x * g)

    # ---------------------------------------------------------------- bookkeeping
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zo_step"] = self._step
        return sd

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_built", True):  # after construction: ZO steps only the layers it was built for
            raise ValueError("ZO steps the layers chosen at construction (targets=..., others=...); a group added "
                             "later would never be updated: build a new ZO to cover other parameters")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, checked whole before anything changes: ``zo_step``, the groups (count,
        sizes, finite options) and the momentum buffers (shape ``m x r`` of their layer, finite).
        The buffers stay float32 whatever the layer's dtype."""
        if not isinstance(state_dict, dict) or "zo_step" not in state_dict:
            raise ValueError("not a ZO optimizer state dict (no 'zo_step'); was it saved from grassopt.zo.ZO?")
        step, groups, saved = state_dict["zo_step"], state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(step, Integral) or isinstance(step, bool) or step < 0:
            raise ValueError(f"the saved zo_step={step!r} must be an integer >= 0; the state dict is corrupt")
        if not isinstance(groups, list) or not isinstance(saved, dict) or len(groups) != len(self.param_groups) \
                or any(not isinstance(g, dict) or len(g.get("params", ())) != len(mine["params"])
                       for g, mine in zip(groups, self.param_groups)):
            raise ValueError("the saved ZO optimizer covers other parameters (its param groups differ in number or "
                             "size); build ZO on the same model with the same targets and others before loading")
        for gi, group in enumerate(groups):
            for key in ("lr", "eps", "momentum", "weight_decay"):
                msg = _option_error(key, group.get(key, self.defaults[key]))
                if msg:
                    raise ValueError(f"the saved optimizer state: param group {gi}: {msg}")
        index = {k: i for i, k in enumerate(k for g in groups for k in g["params"])}
        params = [p for g in self.param_groups for p in g["params"]]
        for key, st in saved.items():
            i = index.get(key)
            if i is None or not isinstance(st, dict):
                raise ValueError(f"the saved state has an entry {key!r} that is not one of its parameters; the "
                                 "state dict is corrupt")
            p = params[i]
            where = f"the saved state of parameter {i}"
            shape = (p.shape[0], self.rank)
            buf = st.get("momentum_buffer")
            if set(st) - {"momentum_buffer", "block"} or (st and (buf is None or "block" not in st)):
                raise ValueError(f"{where} has keys {sorted(st)} but ZO keeps ['block', 'momentum_buffer']; the "
                                 "checkpoint is from another optimizer")
            if not st:
                continue
            if not isinstance(buf, Tensor) or buf.dtype != torch.float32 or tuple(buf.shape) != shape:
                got = f"{buf.dtype} {tuple(buf.shape)}" if isinstance(buf, Tensor) else type(buf).__name__
                raise ValueError(f"{where}: momentum_buffer is {got} but this ZO needs torch.float32 {shape} "
                                 f"(rows x rank); the checkpoint is of another model or rank")
            if not bool(buf.isfinite().all()):
                raise ValueError(f"{where}: momentum_buffer is not finite (a corrupt checkpoint, or state saved "
                                 "after a divergence); load an earlier checkpoint")
            if not isinstance(st["block"], Integral) or isinstance(st["block"], bool):
                raise ValueError(f"{where}: block={st['block']!r} must be an integer; the state dict is corrupt")
        # the state is set here, not by torch, which would cast the float32 buffers to a bf16 layer's dtype
        super().load_state_dict({**{k: v for k, v in state_dict.items() if k != "zo_step"}, "state": {}})
        self.state.clear()
        for key, st in saved.items():
            p = params[index[key]]
            self.state[p] = {k: v.detach().to(device=p.device).clone() if isinstance(v, Tensor) else v
                             for k, v in st.items()}
        self._step = int(step)

    def remove_hooks(self) -> None:
        """Detach the forward hooks (the model is then an ordinary module again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
