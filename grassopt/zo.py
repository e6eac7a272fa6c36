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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .targets import select_targets
from .sketch.laws import LAWS, check_law, mix_seed, projection

__all__ = ["ZO"]

_U, _V, _Z, _OTHER = 0, 1, 2, 3  # streams of the seed derivation


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
    """

    zeroth_order = True  # training loops check this: step(closure) without backward

    def __init__(self, model: nn.Module, rank: int = 8, lr: float = 1e-4, eps: float = 1e-3, *,
                 momentum: float = 0.0, law: str = "haar", lazy: int = 50, targets: str | Iterable[str] = "all-linear",
                 dense: bool = False, others: str = "frozen", weight_decay: float = 0.0, seed: int = 0):
        check_law(law)
        if eps <= 0:
            raise ValueError(f"eps={eps} must be > 0 (the perturbation size)")
        if lr < 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum} must lie in [0, 1)")
        if lazy < 1:
            raise ValueError(f"lazy={lazy} must be >= 1 (steps a subspace V is kept)")
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
        super().__init__(groups, dict(lr=lr, eps=eps, momentum=momentum, weight_decay=weight_decay))
        self.model, self.rank, self.law, self.lazy, self.dense, self.seed = model, rank, law, lazy, dense, seed
        self.others = others
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
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
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
        if not (torch.isfinite(loss_plus) and torch.isfinite(loss_minus)):
            raise FloatingPointError(f"non-finite loss in a ZO step ({loss_plus.item()}, {loss_minus.item()}); "
                                     "lower eps or the learning rate; nothing was updated")
        g = ((loss_plus - loss_minus) / (2 * eps)).item()
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        step = state_dict.get("zo_step")
        if step is None:
            raise ValueError("not a ZO optimizer state dict (no 'zo_step'); was it saved from grassopt.zo.ZO?")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "zo_step"})
        self._step = int(step)

    def extra_memory_elements(self) -> int:
        """Elements the method keeps between steps (momentum) plus the largest per-layer draw."""
        kept = sum(v.numel() for st in self.state.values() for v in st.values() if torch.is_tensor(v))
        per_layer = max((mod.weight.numel() if self.dense else (sum(mod.weight.shape) * self.rank))
                        for mod in self._layers)
        return kept + per_layer

    def remove_hooks(self) -> None:
        """Detach the forward hooks (the model is then an ordinary module again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
