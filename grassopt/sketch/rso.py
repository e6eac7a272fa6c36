"""RSO, randomized subspace optimization (docs/algorithms.md#rso), as a ``torch.optim.Optimizer``.

Outer iteration ``k``: every covered layer has a frozen ``W`` and a trainable ``B`` (``m x r``,
zero at the start of the iteration); the layer computes ``x (W + B P_k^T)^T`` and stores only
``x P_k`` for the backward pass. ``K = inner_steps`` calls of :meth:`RSO.step` update the ``B``s
with Adam (fresh state each outer iteration) on the subproblem ``f(W + B P_k^T) + mu/2 ||B||^2``;
the K-th call then merges, in at least float32,

    W <- c W + B P_k^T,   c = prod over the K inner steps of (1 - lr_t * weight_decay),

(the frozen ``W`` decays exactly as decoupled AdamW would have decayed it over those steps), sets
``B = 0`` and moves to ``k + 1`` (a fresh ``P``). Every other trainable parameter (embeddings,
norms, the output layer, biases) is trained continuously by AdamW in the same optimizer. One Adam
convention throughout, that of :class:`grassopt.SubspaceAdamW` (``eps`` added to ``sqrt(V)``, bias
correction folded into the step size).

Param groups: group 0 holds the ``B``s (key ``"rso": True``; its ``lr`` is the inner learning rate
and its ``weight_decay`` the decay of the merged ``W``; it also carries the counters
``outer_step``, ``inner_step`` and ``wd_factor``, so they travel with ``state_dict``); the other
groups are AdamW (``weight_decay`` on tensors with 2 or more dimensions only, as nanoGPT does), at
``plain_lr`` and ``plain_weight_decay`` when given (the plain parameters' own rate and decay).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..functional import adam_tensor_
from ..targets import check_plain_rates
from .api import Rank, sketch, sketch_states, sketched_layers
from .layer import SketchedLinear, _master_dtype

__all__ = ["RSO", "rso"]

INNER = ("adam", "sgd")


class RSO(Optimizer):
    """Randomized subspace optimization over the RSO-sketched layers of ``model`` (see module doc).

    Args:
        model: a model sketched with ``mode="rso"`` (use :func:`rso` to sketch and build in one call).
        lr: learning rate of the inner Adam on ``B`` and of AdamW on the other parameters.
        inner_steps: ``K``, optimizer steps per outer iteration (then merge and resample).
        betas, eps: Adam's; ``eps`` is added to ``sqrt(V)``.
        weight_decay: decoupled decay: of the merged ``W`` (accumulated over the inner steps) and
            of the other parameters with 2 or more dimensions.
        mu: proximal coefficient of ``mu/2 ||B||^2`` in the subproblem (its gradient ``mu B`` is
            added to ``B``'s gradient before the inner update).
        inner: ``"adam"`` (default) or ``"sgd"`` (``B <- B - lr (dB + mu B)``), the subproblem solver.
        plain_lr, plain_weight_decay: learning rate and weight decay of the other parameters
            (embeddings, norms, the output layer, biases); None: ``lr`` and ``weight_decay``.
    """

    #: why :class:`grassopt.layerwise.LayerwiseUpdater` refuses RSO: a layer-wise step updates one parameter
    layerwise_refusal = ("its inner-step counter, decay factor and merge (W <- c W + B P^T after the K-th step, "
                         "every layer at once) advance once per optimizer step, not once per parameter")

    def __init__(self, model: nn.Module, lr: float = 1e-3, inner_steps: int = 200,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 mu: float = 0.0, inner: str = "adam", plain_lr: float | None = None,
                 plain_weight_decay: float | None = None):
        check_plain_rates(plain_lr, plain_weight_decay)
        layers = sketched_layers(model)
        if not layers:
            raise ValueError("RSO needs a model sketched with mode='rso'; use grassopt.sketch.rso(model, rank=...) "
                             "or grassopt.sketch.sketch(model, rank=..., mode='rso') first")
        wrong = [name for name, layer in layers if layer.mode != "rso"]
        if wrong:
            raise ValueError(f"{wrong[0]} is sketched in mode={layers[0][1].mode!r}, not 'rso'; RSO needs every "
                             "sketched layer in mode='rso' (unsketch and sketch again)")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps={inner_steps!r} must be an integer >= 1")
        if inner not in INNER:
            raise ValueError(f"inner={inner!r} must be one of {INNER}")
        for key, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("mu", mu)):
            if not value >= 0:
                raise ValueError(f"{key}={value} must be >= 0")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas={betas} must each lie in [0, 1)")
        self._layers: list[SketchedLinear] = [layer for _, layer in layers]
        self._states = sketch_states(model)
        b_ids = {id(layer.B) for layer in self._layers}
        plain_wd = weight_decay if plain_weight_decay is None else plain_weight_decay
        plain = {} if plain_lr is None else {"lr": plain_lr}
        decay: list[tuple[str, torch.Tensor]] = []
        no_decay: list[tuple[str, torch.Tensor]] = []
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in b_ids:
                (no_decay if plain_wd > 0 and p.dim() < 2 else decay).append((name, p))
        groups: list[dict[str, Any]] = [{
            "params": [(f"{name}.B", layer.B) for name, layer in layers], "rso": True,
            "inner_steps": inner_steps, "mu": mu, "inner": inner,
            "outer_step": self._states[0].step, "inner_step": 0, "wd_factor": 1.0}]
        if decay:
            groups.append({"params": decay, "weight_decay": plain_wd, **plain})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, **plain})
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)

    # ------------------------------------------------------------------ counters
    @property
    def rso_group(self) -> dict[str, Any]:
        return self.param_groups[0]

    @property
    def outer_step(self) -> int:
        """Index ``k`` of the current outer iteration (it seeds the sketch matrices)."""
        return self.rso_group["outer_step"]

    @property
    def inner_step(self) -> int:
        """Inner steps done in the current outer iteration (0 .. inner_steps - 1)."""
        return self.rso_group["inner_step"]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One inner step on the ``B``s and one AdamW step on the other parameters; the
        ``inner_steps``-th inner step of an outer iteration ends with :meth:`merge`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group.get("rso"):
                for p in params:
                    if p.grad.is_sparse:
                        raise RuntimeError("RSO does not support sparse gradients")
                    g = p.grad if group["mu"] == 0 else p.grad.add(p, alpha=group["mu"])
                    if group["inner"] == "sgd":
                        self._sgd(p, g, group["lr"])
                    else:
                        self._adam(p, g, group, weight_decay=0.0)
                group["inner_step"] += 1
                group["wd_factor"] *= 1.0 - group["lr"] * group["weight_decay"]
            else:
                for p in params:
                    if p.grad.is_sparse:
                        raise RuntimeError("RSO does not support sparse gradients")
                    self._adam(p, p.grad, group, weight_decay=group["weight_decay"])
        if self.rso_group["inner_step"] >= self.rso_group["inner_steps"]:
            self.merge()
        return loss

    @staticmethod
    def _sgd(p: Tensor, g: Tensor, lr: float) -> None:
        if p.dtype == g.dtype:
            p.add_(g, alpha=-lr)
        else:
            p.copy_(p.float().add_(g.float(), alpha=-lr))

    def _adam(self, p: Tensor, g: Tensor, group: dict[str, Any], weight_decay: float) -> None:
        st = self.state[p]
        if "step" not in st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        st["step"] += 1
        adam_tensor_(p, g, st, st["step"], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                     weight_decay=weight_decay)

    @torch.no_grad()
    def merge(self) -> None:
        """End the outer iteration now: ``W <- c W + B P^T`` (in at least float32), ``B = 0``,
        fresh inner state, next outer iteration (fresh ``P`` at the next forward pass)."""
        group = self.rso_group
        c = group["wd_factor"]
        for layer, b in zip(self._layers, group["params"]):
            w = layer.weight
            wm = w if w.dtype == _master_dtype(w.dtype) else w.to(_master_dtype(w.dtype))
            if c != 1.0:
                wm.mul_(c)
            p = layer.projection_matrix()  # None only if the layer has not run yet; then B is 0
            if p is not None:
                wm.addmm_(b.to(p.dtype), p.mT)
            if wm is not w:
                w.copy_(wm)
            b.zero_()
            self.state.pop(b, None)
        group["outer_step"] += 1
        group["inner_step"] = 0
        group["wd_factor"] = 1.0
        self._sync_states()

    def _sync_states(self) -> None:
        for st in self._states:
            st.step = self.rso_group["outer_step"]

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (float32 moments stay float32); the model's sketch step follows it."""
        saved = state_dict.get("state")
        groups = state_dict.get("param_groups")
        if not isinstance(saved, dict) or not isinstance(groups, list):
            raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
        if not groups or not groups[0].get("rso"):
            raise ValueError("not an RSO state dict: its first param group is not the RSO group")
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for g in self.param_groups for p in g["params"]]
        self.state.clear()
        for key, st in saved.items():
            i = int(key)
            if not 0 <= i < len(params):
                raise ValueError(f"state for parameter index {i} but the optimizer has {len(params)} parameters")
            p = params[i]
            self.state[p] = {k: v.detach().to(device=p.device).clone() if isinstance(v, Tensor) else v
                             for k, v in st.items()}
        self._sync_states()


def rso(model: nn.Module, rank: Rank, inner_steps: int = 200, lr: float = 1e-3, weight_decay: float = 0.0,
        mu: float = 0.0, law: str = "haar", seed: int = 0, targets: str | Iterable[str] = "all-linear",
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, inner: str = "adam",
        share: str | None = "input", plain_lr: float | None = None, plain_weight_decay: float | None = None) -> RSO:
    """Sketch ``model`` in place for RSO (:func:`grassopt.sketch.sketch` with ``mode="rso"``) and
    return its :class:`RSO` optimizer. Wrap the model in DDP after this call."""
    check_plain_rates(plain_lr, plain_weight_decay)  # before the model is sketched
    sketch(model, rank, law=law, targets=targets, mode="rso", seed=seed, share=share)
    return RSO(model, lr=lr, inner_steps=inner_steps, betas=betas, eps=eps, weight_decay=weight_decay,
               mu=mu, inner=inner, plain_lr=plain_lr, plain_weight_decay=plain_weight_decay)
