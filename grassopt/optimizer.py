"""``SubspaceAdamW``: AdamW whose projected param groups run inside a moving rank-``r`` subspace.

One step for a projected ``m x n`` weight (docs/algorithms.md#projected-step), with ``X`` the gradient
oriented so that its rows are the short side ``d`` (``linalg.orient``):

1. first step: ``Q = rule.init(X)``; every ``update_interval`` steps after that:
   ``Q_old = Q; Q = rule.update(Q, X)`` and the moments are transported (``transport.py``);
2. ``R = Q^T X``; ``M = b1 M + (1 - b1) R``; ``V = b2 V + (1 - b2) R*R``; ``N = M / (sqrt(V) + eps)``;
3. ``D = alpha Q N`` (+ ``alpha_r c E Phi`` with recovery scaling, ``recovery.py``);
4. ``W = W - lr_t D`` with ``lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)``, then ``W = W - lr wd W``.

Two optional components make the other baselines (docs/algorithms.md#apollo) configurations of this
same step rather than copies of it:

- ``scaling="channel"`` or ``"tensor"`` (APOLLO, APOLLO-Mini): Adam in the subspace only estimates
  a scale, ``phi = ||N|| / (||R|| + 1e-8)`` per slice along the long side or per tensor, and the
  direction is the raw gradient scaled, ``D = alpha c X Phi``, with the norm-growth limiter ``c``;
- ``error_feedback=True`` (LDAdam): ``X = G + E`` and, after the step, ``E = X - Q Q^T X``, kept
  in one full-size float32 buffer per matrix (formed in place: no full-size temporary).

Rules whose basis is a function of a seed (``gaussian``) store the seed, not ``Q``.

A param group is projected when it has a ``rank``; otherwise it is plain AdamW with the same Adam
convention. Subspace maths and all optimizer state are float32 whatever the parameter's dtype, but
for the moments, which are stored in the group's ``state_dtype`` codec (``grassopt.codecs``);
nothing is tied to a device. This class is the shell (groups, state, generators, diagnostics): the
options are declared once in :data:`grassopt.options.OPTIONS` (defaults, checks, which fix the state's
meaning); the step's maths are functions in ``grassopt/optim/`` (``_projected.py``, ``_plain.py``); a
parameter's state is declared once, by ``grassopt.optim.state.state_spec``, next to
``load_state_dict``'s checks.

Randomness: two generators per parameter, both seeded from ``(seed, parameter index)`` (two streams)
and saved in ``state_dict``: the rules' draws (``rng_state``) and the rounding's (``rounding_rng_state``:
stochastic rounding of bf16 weights, a codec's stochastic rounding), so rounding never moves a basis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import bases
from .codecs import get_codec
from .optim import _compiled, _plain, _projected
from .optim._projected import mix_seed as _mix_seed
from .optim.groups import check_params, normalize_params
from .optim.state import RNG_KEYS, check_state_dict, init_state
from .qlinear import int8_module
from .options import OPTIONS, SUBSPACE_DEFAULTS, check_group, check_value, complete_group, step_error
from .rules import get_rule, rule_flag

__all__ = ["SubspaceAdamW", "SUBSPACE_DEFAULTS"]

_D = {k: o.default for k, o in OPTIONS.items()}  # the constructor's defaults: the table's


class SubspaceAdamW(Optimizer):
    """AdamW with gradient-subspace projection for the param groups that carry a ``rank``.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or param-group dicts (see
            :func:`grassopt.param_groups`, which builds them from a model and a preset).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (GaLore's convention: ``eps`` is added
            to ``sqrt(V)`` and bias correction is folded into the step size; ``eps=1e-6``). ``eps``
            must be > 0: ``eps=0`` would divide 0 by 0 wherever ``V`` is 0 (torch's AdamW writes NaN
            there); 1e-30 is Adam without eps, to rounding, wherever that is defined.
        seed: seeds the per-parameter generators (with the parameter's index): one for the random
            rules, one (another stream) for stochastic rounding.
        check_finite: check, before anything is changed, that every gradient is finite, and raise a
            ``FloatingPointError`` naming the offending parameters otherwise. Costs one fused
            norm over the plain groups' gradients per step (projected ones are checked on ``Q^T X``).
        state_dtype: the moments' format, a name in :data:`grassopt.codecs.CODECS` (``"float32"``,
            ``"int8"``: block-wise quantized, see :mod:`grassopt.codecs.int8`; ``"bfloat16"``). Per group.
        stochastic_rounding: round the float32 update of a bf16 parameter stochastically (unbiased),
            from the optimizer's seeded per-parameter rounding generators. Per group.
        fused: ``None`` uses torch's fused Adam kernel where the device has one (CPU, CUDA, MPS, ...),
            ``False`` forces the ``foreach`` ops (same maths, to float rounding).
        compile: run the step's elementwise work (int8 decode and encode, Adam, the update with its
            decay and stochastic rounding, the recovery scales and limiter) as ``torch.compile``
            (inductor) kernels, :mod:`grassopt.optim._compiled`; equal to the eager step within 1e-6
            relative. Where compile is unavailable (no compiler, another device) or fails, one warning
            and the eager step.

    Every option, its default, check and meaning: :data:`grassopt.options.OPTIONS`
    (docs/algorithms.md#options). Projected-group keys: ``rank`` (required), ``update_interval``,
    ``alpha``, ``alpha_r``, ``rule`` (``grassopt.rules.RULES``), ``transport``, ``recovery``,
    ``zeta``, ``scaling``, ``error_feedback``, and the options of the chosen rule (for example
    ``step_size``, ``step_mode``, ``update_rank`` for ``track``; defaults come from the rule).

    Nothing is changed by a refusal: bad options or parameters (at construction, in
    :meth:`add_param_group`, in :meth:`load_state_dict`) and bad gradients or a non-finite ``lr``
    set by a scheduler (at :meth:`step`) raise a one-line ``ValueError`` naming the option or
    parameter and the fix before anything is written.
    """

    # Parameters on the meta device are refused (module.to_empty replaces them, so an optimizer built
    # on them would silently train nothing); the memory estimate builds one on shapes only.
    _shapes_only = False

    def __init__(
        self,
        params,
        lr: float = _D["lr"],
        betas: tuple[float, float] = _D["betas"],
        eps: float = _D["eps"],
        weight_decay: float = _D["weight_decay"],
        *,
        seed: int = _D["seed"],
        check_finite: bool = _D["check_finite"],
        state_dtype: str = _D["state_dtype"],
        stochastic_rounding: bool = _D["stochastic_rounding"],
        fused: bool | None = _D["fused"],
        compile: bool = _D["compile"],
    ):
        for key, value in (("fused", fused), ("compile", compile)):
            msg = check_value(key, value)
            if msg:
                raise ValueError(msg)
        if isinstance(params, (Tensor, str, dict)) or not isinstance(params, Iterable):
            raise TypeError(f"params must be an iterable of tensors, (name, tensor) pairs or param-group dicts, got "
                            f"{type(params).__name__} (e.g. model.parameters() or grassopt.param_groups(model, ...))")
        betas = tuple(betas) if isinstance(betas, list) else betas  # anything else is checked per group
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed,
                        check_finite=check_finite, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)
        #: None: torch's fused Adam kernel wherever the device has it; False: foreach ops; True: insist
        self._fused = fused
        #: compile=True: the compiled kernels (compiled on first use; the eager step where they cannot run)
        self._kernels = _compiled.Kernels() if compile else None
        self._generators: dict[Tensor, torch.Generator] = {}  # the rules' draws
        self._rounding_generators: dict[Tensor, torch.Generator] = {}  # stochastic rounding only
        self._seed_generators: dict[str, torch.Generator] = {}  # scratch, reseeded before each use
        self._diag: dict[Tensor, dict[str, Any]] = {}
        #: id(parameter) -> (group index, index in the group, index over all groups): O(1) look-ups
        self._where: dict[int, tuple[int, int, int]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, atomically: the group is completed with its defaults and checked whole
        (options, values, parameters: :mod:`grassopt.options`, :mod:`grassopt.optim.groups`) on a
        copy, and appended only when every check passed, so a refused group leaves the optimizer (and
        the caller's dict) as they were."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        gi = len(self.param_groups)
        where = f"param group {gi}"
        group = complete_group(normalize_params(param_group, where), where, self.defaults)
        check_params(group, where, self.param_groups, self._shapes_only)
        check_group(group, where)
        super().add_param_group(group)  # torch's own checks (names in all groups or none) raise before appending
        param_group.clear()  # the group is the caller's dict, as with torch's optimizers
        param_group.update(group)
        self.param_groups[-1] = param_group
        flat = sum(len(g["params"]) for g in self.param_groups[:-1])
        for i, p in enumerate(param_group["params"]):
            self._where[id(p)] = (gi, i, flat + i)

    def _param_name(self, gi: int, i: int) -> str:
        names = self.param_groups[gi].get("param_names")
        return names[i] if names else f"parameter {i} of param group {gi}"

    def _flat_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _find(self, p: Tensor) -> tuple[int, int, int] | None:
        """``(group index, index in the group, index over all groups)`` of a parameter, in O(1); None for
        a tensor that is not a parameter here."""
        where = self._where.get(id(p))
        if where is None or not (where[0] < len(self.param_groups) and where[1] < len(
                ps := self.param_groups[where[0]]["params"]) and ps[where[1]] is p):  # groups edited in place
            flat = [(gi, i, q) for gi, g in enumerate(self.param_groups) for i, q in enumerate(g["params"])]
            self._where = {id(q): (gi, i, n) for n, (gi, i, q) in enumerate(flat)}
            where = self._where.get(id(p))
        return where

    def _locate(self, p: Tensor) -> tuple[int, int, int]:
        """:meth:`_find`, for a tensor that must be a parameter here (``KeyError`` otherwise)."""
        where = self._find(p)
        if where is None:
            raise KeyError("the tensor is not a parameter of this optimizer")
        return where

    def _param_index(self, p: Tensor) -> int:
        return self._locate(p)[2]

    def basis(self, p: Tensor) -> Tensor | None:
        """The current basis ``Q`` (``d x r``, float32) of a projected parameter; None before its first
        step or for a plain parameter. Rules that keep a seed instead (``gaussian``) regenerate it."""
        st = self.state.get(p, {})
        if "Q" in st:
            return bases.load(st)
        if "seed" not in st:
            return None
        group = self.param_groups[self._locate(p)[0]]
        return _projected.seeded_basis(get_rule(group["rule"]), group, st["seed"],
                                       torch.empty(min(p.shape), 0, device=p.device), self._seed_generators)

    # ------------------------------------------------------------------ randomness
    def _seeded(self, p: Tensor, table: dict[Tensor, torch.Generator], stream: int) -> torch.Generator:
        """The generator of ``p`` in ``table``, created on first use from ``(seed, parameter index)``:
        stream 0 is ``mix_seed(seed, index)`` (the rules'), stream ``s`` ``mix_seed(that, s)``."""
        gen = table.get(p)
        if gen is None:
            gi, _, index = self._locate(p)
            seed = _mix_seed(int(self.param_groups[gi]["seed"]), index)
            gen = torch.Generator(device=p.device)
            gen.manual_seed(_mix_seed(seed, stream) if stream else seed)
            table[p] = gen
        return gen

    def _generator(self, p: Tensor) -> torch.Generator:
        """The generator of the rules' draws (``walk``, ``jump``, ``rsvd``, ...) for ``p``."""
        return self._seeded(p, self._generators, 0)

    def _rounding_generator(self, p: Tensor) -> torch.Generator:
        """The generator of ``p``'s stochastic rounding (weights and codec state), apart from the rules'."""
        return self._seeded(p, self._rounding_generators, 1)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for i, p in enumerate(self._flat_params()):
            for key, table in zip(RNG_KEYS, (self._generators, self._rounding_generators)):
                gen = table.get(p)
                if gen is not None:
                    sd["state"][i] = {**sd["state"].get(i, {}), key: gen.get_state()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; float32 state stays float32 (it is not cast to a bf16 parameter's dtype).

        Everything is checked before anything changes (:func:`grassopt.optim.state.check_state_dict`:
        ``ValueError``, one line naming the param group or parameter and what differs): the number of
        groups and parameters; the options that fix what the state means (``changes_state_meaning`` in
        :data:`grassopt.options.OPTIONS`: ``rank``, ``rule``, ``transport``, ``recovery``, ``scaling``,
        ``error_feedback``, ``state_dtype``) equal this optimizer's; the saved options valid; every
        parameter's state complete, of the shapes and dtypes its parameter needs, and finite, its step
        counts integers and its generator states loadable. The hyper-parameters (``lr``, ``betas``,
        ``alpha``, rule options, ...) are then taken from the state dict, as torch's optimizers do. A
        checkpoint without a generator state (e.g. ``rounding_rng_state``, older than it) reseeds that
        generator from ``(seed, parameter index)``.
        """
        checked = check_state_dict(state_dict, self.param_groups, self.defaults, self._param_name)
        plan = [(self.param_groups[gi]["params"][i], st, gens) for gi, i, st, gens in checked]
        super().load_state_dict({**state_dict, "state": {}})
        for group in self.param_groups:  # state dicts saved before an option existed get its default
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if "rank" in group:
                for key, value in {**SUBSPACE_DEFAULTS, **get_rule(group["rule"]).OPTIONS}.items():
                    group.setdefault(key, value)
        self.state.clear()
        self._generators.clear()
        self._rounding_generators.clear()
        self._diag.clear()
        for p, st, gens in plan:
            for key, table in zip(RNG_KEYS, (self._generators, self._rounding_generators)):
                if key in gens:
                    table[p] = gens[key]
            self.state[p] = {k: v.detach().to(device=p.device).clone() if isinstance(v, Tensor) else v
                             for k, v in st.items() if k not in RNG_KEYS}
            if "step" in st:  # fields a checkpoint written before they existed lacks (e.g. the int8 code map)
                fields = get_codec(self.param_groups[self._locate(p)[0]]["state_dtype"]).FIELDS
                for k, v in fields.items():
                    self.state[p].setdefault(k, v)

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict[str, dict[str, Any]]:
        """Per projected parameter: the last basis update and the recovery of the last step.

        ``angle_deg``: largest principal angle turned by the last basis update (degrees);
        ``last_update``: the step it happened at; ``residual_norm``: ``||X - Q Q^T X||_F`` and
        ``residual_ratio`` (its share of ``||X||_F``), measured at every step with recovery, at
        basis updates otherwise; ``limiter``: the norm-growth limiter's factor (1 = did not act).
        """
        out: dict[str, dict[str, Any]] = {}
        for group in self.param_groups:
            if "rank" not in group:
                continue
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"]):
                d = self._diag.get(p)
                if d is None:
                    continue
                key = name or f"param {self._param_index(p)}"
                out[key] = {k: (float(v) if isinstance(v, Tensor) else v) for k, v in d.items()}
                if out[key].get("angle") is not None:
                    out[key]["angle_deg"] = math.degrees(out[key].pop("angle"))
        return out

    # ------------------------------------------------------------------ the step
    def _check_finite(self, checks: list[tuple[list[tuple[int, int]], Tensor]]) -> None:
        """Raise, before anything changes, if a gradient is not finite.

        Each check is a tensor and the parameters it covers. For a projected group with bases the
        tensor is the group's ``R = Q^T X`` rows (a NaN or inf anywhere in ``X`` reaches ``R``), which
        the step needs anyway: no pass over the full gradients. Plain parameters are checked on their
        gradients: one read pass, the cheapest exact test there is, by their sums (a sum is finite
        when every element is, unless it overflows; a non-finite sum is confirmed element by element
        before anything is reported). One host sync per step.
        """
        if not checks:
            return
        sums = [t.sum(dtype=torch.float32) for _, t in checks]
        dev = sums[0].device
        ok = torch.stack([s.to(dev) for s in sums]).isfinite()
        if bool(ok.all()):
            return
        bad = []
        for (who, t), good in zip(checks, ok.tolist()):
            if not good and not bool(torch.isfinite(t).all()):  # an overflowing sum of finite values passes
                bad += [self._param_name(gi, i) for gi, i in who]
        if not bad:
            return
        raise FloatingPointError(
            f"non-finite gradient (NaN or inf) in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            "nothing was updated. Lower the learning rate, clip gradients, or use a GradScaler with fp16; "
            "pass check_finite=False to skip this check.")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step(None)
        return loss

    @torch.no_grad()
    def step_parameters(self, params: Iterable[Tensor]) -> None:
        """Step only ``params`` (those with a gradient), exactly as :meth:`step` would step them.

        This is what layer-wise updates call from a gradient hook: each parameter is updated as
        soon as its gradient is complete, and its gradient can then be freed.
        """
        chosen: dict[int, list[int]] = {}
        for p in params:  # O(len(params)): a layer-wise hook steps one parameter without a pass over all
            where = self._find(p) if p.grad is not None else None
            if where is not None:  # (tensors that are not parameters here are ignored, as by step)
                chosen.setdefault(where[0], []).append(where[1])
        self._step({gi: sorted(set(idx)) for gi, idx in chosen.items()})

    def _step(self, only: dict[int, list[int]] | None) -> None:
        """Step every parameter with a gradient (``only``: those of ``{group index: [indices]}``)."""
        work: list[tuple[dict[str, Any], Any]] = []
        checks: list[tuple[list[tuple[int, int]], Tensor]] = []
        for gi, group in enumerate(self.param_groups):  # every check before the first write
            if only is not None and gi not in only:
                continue
            chosen = []
            for i in range(len(group["params"])) if only is None else only[gi]:
                p = group["params"][i]
                g = p.grad
                if g is None:
                    continue
                if (g.shape != p.shape or g.layout != torch.strided or not g.dtype.is_floating_point
                        or g.device != p.device):
                    raise ValueError(self._grad_error(gi, i, p, g))
                chosen.append((i, p))
            if not chosen:
                continue
            msg = step_error(group)  # an LR scheduler (or a user) may have changed them since
            if msg:
                raise ValueError(f"param group {gi}: {msg}; it was set after construction (an LR scheduler?): "
                                 "nothing was updated")
            if "rank" in group:
                batch = self._prepare(group, chosen)
                if group["check_finite"]:
                    checks += [([(gi, i)], t) for i, t in batch.checks()]
                work.append((group, batch))
            else:
                if group["check_finite"]:
                    checks += [([(gi, i)], p.grad) for i, p in chosen]
                work.append((group, [p for _, p in chosen]))
        self._check_finite(checks)
        for group, batch in work:
            if "rank" in group:
                self._projected_step(group, batch)
            else:
                self._plain_step(batch, group)

    def _grad_error(self, gi: int, i: int, p: Tensor, g: Tensor) -> str:
        """The one-line message for a gradient that cannot step its parameter."""
        name = self._param_name(gi, i)
        if g.shape != p.shape:
            why = (f"has shape {tuple(g.shape)} but the parameter has shape {tuple(p.shape)}; a gradient must "
                   "have its parameter's shape (was .grad or .grad.data replaced?)")
        elif g.layout != torch.strided:
            why = (f"is {g.layout}; SubspaceAdamW needs dense gradients (use nn.Embedding(sparse=False), "
                   "or assign p.grad = p.grad.to_dense())")
        elif not g.dtype.is_floating_point:
            why = f"has dtype {g.dtype}; it must be floating point (the parameter is {p.dtype})"
        else:
            why = f"is on {g.device} but the parameter is on {p.device}; move the gradient to {p.device}"
        return f"the gradient of {name} {why}; nothing was updated"

    def _plain_step(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """AdamW on every parameter of a plain group (``optim/_plain.py``): float32 tensors with dense
        moments in one fused call per step count; low-precision parameters or encoded moments one
        tensor at a time."""
        codec = get_codec(group["state_dtype"])
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if "step" not in st:
                init_state(st, group, p)
        sr = group["stochastic_rounding"]
        _plain.plain_adamw_(
            params, [cast(Tensor, p.grad) for p in params], states, codec=codec, lr=group["lr"], betas=group["betas"],
            eps=group["eps"], weight_decay=group["weight_decay"], fused=self._fused,
            generators=[self._rounding_generator(p) if sr and (p.dtype != torch.float32 or int8_module(p) is not None)
                        else None for p in params],
            state_generators=[self._rounding_generator(p) if codec.needs_generator(st) else None
                              for p, st in zip(params, states)], kernels=self._kernels)

    def _prepare(self, group: dict[str, Any], chosen: list[tuple[int, Tensor]]) -> _projected.Batch:
        """The oriented gradients of a projected group, its current bases, and ``R = Q^T X`` where a
        basis exists (so the group's checks, norms and the recovery correction are single operations)."""
        return _projected.prepare(group, get_rule(group["rule"]), chosen, [self.state[p] for _, p in chosen],
                                  self._seed_generators)

    def _projected_step(self, group: dict[str, Any], batch: _projected.Batch) -> None:
        """One step for every parameter of a projected group (``optim/_projected.py``)."""
        rule = get_rule(group["rule"])
        params = batch.params
        seeds = ([_mix_seed(int(group["seed"]), self._param_index(p)) if "step" not in self.state[p] else 0
                  for p in params] if rule_flag(rule, "FROM_SEED") else [0] * len(params))
        _projected.projected_step_(
            batch, [self.state[p] for p in params], [self._diag.setdefault(p, {}) for p in params], rule=rule,
            group=group, codec=get_codec(group["state_dtype"]), seeds=seeds,
            generator=lambda j: self._generator(params[j]),
            rounding_generator=lambda j: self._rounding_generator(params[j]), cache=self._seed_generators,
            fused=self._fused, kernels=self._kernels)
