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
nothing is tied to a device. This class is the shell (groups, state, checks, diagnostics): the
step's maths are functions in ``grassopt/optim/`` (``_projected.py``, ``_plain.py``), and a
parameter's state is declared once, by ``grassopt.optim.state.state_spec``. Random rules draw only from generators the optimizer owns, seeded
from ``(seed, parameter index)``, saved in ``state_dict``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._dtensor import check_params  # FSDP2 shards: a clear error at construction, not wrong maths later
from .codecs import CODECS, detect, get_codec
from .optim import _plain, _projected
from .optim._projected import mix_seed as _mix_seed
from .optim.state import init_state, state_spec
from .rules import all_rule_options, check_options, get_rule, rule_flag
from .transport import TRANSPORTS

__all__ = ["SubspaceAdamW", "SUBSPACE_DEFAULTS"]

#: Defaults of a projected group (a group with a ``rank``). The components default to SubTrack++.
SUBSPACE_DEFAULTS: dict[str, Any] = {
    "update_interval": 200,
    "alpha": 0.25,
    "alpha_r": None,  # None: the same as alpha (Fira's form alpha * (Q N + S))
    "rule": "track",
    "transport": "rotate",
    "recovery": True,
    "zeta": 1.01,
    "scaling": None,  # None (the projected update), "channel" or "tensor" (APOLLO's gradient scaling)
    "error_feedback": False,  # LDAdam's full-size error-feedback buffer
}
SCALINGS = (None, "channel", "tensor")
_PLAIN_KEYS = {"params", "param_names", "lr", "betas", "eps", "weight_decay", "seed", "check_finite",
               "initial_lr", "name", "state_dtype", "stochastic_rounding"}
_SUBSPACE_KEYS = {"rank", *SUBSPACE_DEFAULTS}
_NUMBER = (float, int)  # exact types (not bool) for the fast path of _hyper_error
_NON_NEGATIVE = {"residual_norm"}  # state keys besides the codecs' own (Codec.NON_NEGATIVE)


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _real_error(v: Any, low: float, strict: bool = False) -> bool:
    """True unless ``v`` is a finite real number (not a bool, not a tensor) ``>= low`` (``> low``)."""
    if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(v):
        return True
    return not (v > low if strict else v >= low)


def _hyper_error(group: dict[str, Any]) -> str | None:
    """The message for a bad ``lr``, ``eps``, ``weight_decay`` or ``betas`` of a group, else None.

    These are the options an LR scheduler (or a user) may change between steps, so the step checks
    them too: a few Python comparisons per group. ``eps`` must be > 0: it is added to ``sqrt(V)``
    (GaLore's convention), so ``eps=0`` divides 0 by 0 wherever ``V`` is 0 (a coordinate, or a
    subspace direction, that has had no gradient yet) and writes NaN into the weights (torch's
    AdamW does the same with ``eps=0``; a tiny positive eps such as 1e-30 is Adam without eps, to float
    rounding, wherever that is defined).
    """
    lr, eps, wd, betas = group["lr"], group["eps"], group["weight_decay"], group["betas"]
    if (type(lr) in _NUMBER and type(eps) in _NUMBER and type(wd) in _NUMBER and type(betas) is tuple
            and len(betas) == 2 and type(betas[0]) in _NUMBER and type(betas[1]) in _NUMBER
            and 0 <= lr < math.inf and 0 < eps < math.inf and 0 <= wd < math.inf
            and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        return None  # the common case, cheaply (the step checks every group it steps)
    if _real_error(lr, 0.0):
        return f"lr={lr!r} must be >= 0 and finite (a float learning rate such as 1e-3)"
    if _real_error(eps, 0.0, strict=True):
        if isinstance(eps, Real) and not isinstance(eps, bool) and eps == 0:
            return (f"eps={eps!r} must be > 0: eps is added to sqrt(V), so eps=0 divides 0 by 0 wherever V is 0 "
                    "(a coordinate with no gradient yet) and writes NaN into the weights; use e.g. eps=1e-8 "
                    "(torch's default) or 1e-6 (ours)")
        return f"eps={eps!r} must be > 0 and finite (it is added to sqrt(V); e.g. 1e-6, the default)"
    if _real_error(wd, 0.0):
        return f"weight_decay={wd!r} must be >= 0 and finite (e.g. 0.0 or 0.1)"
    if (not isinstance(betas, tuple | list) or len(betas) != 2
            or any(_real_error(b, 0.0) or b >= 1 for b in betas)):
        return f"betas={betas!r} must be a pair (beta1, beta2) of numbers in [0, 1), e.g. (0.9, 0.999)"
    return None


class SubspaceAdamW(Optimizer):
    """AdamW with gradient-subspace projection for the param groups that carry a ``rank``.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or param-group dicts (see
            :func:`grassopt.param_groups`, which builds them from a model and a preset).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (GaLore's convention: ``eps`` is added
            to ``sqrt(V)`` and bias correction is folded into the step size; ``eps=1e-6``). ``eps``
            must be > 0: ``eps=0`` would divide 0 by 0 wherever ``V`` is 0 (torch's AdamW writes NaN
            there); 1e-30 is Adam without eps, to rounding, wherever that is defined.
        seed: seeds the per-parameter generators of random rules (with the parameter's index).
        check_finite: check, before anything is changed, that every gradient is finite, and raise a
            ``FloatingPointError`` naming the offending parameters otherwise. Costs one fused
            norm over the plain groups' gradients per step (projected ones are checked on ``Q^T X``).
        state_dtype: the moments' format, a name in :data:`grassopt.codecs.CODECS`: ``"float32"`` or
            ``"int8"`` (block-wise quantized Adam moments, ``n + 4 ceil(n/256)`` bytes per moment of
            ``n`` elements; see :mod:`grassopt.codecs.int8`). Per group.
        stochastic_rounding: round the float32 update of a bf16 parameter stochastically (unbiased),
            from the optimizer's seeded per-parameter generators. Per group.
        fused: ``None`` uses torch's fused Adam kernel where the device has one (CPU, CUDA, MPS, ...),
            ``False`` forces the ``foreach`` ops (same maths, to float rounding).

    Nothing is changed by a refusal: bad options or parameters (at construction, in
    :meth:`add_param_group`, in :meth:`load_state_dict`) and bad gradients or a non-finite ``lr``
    set by a scheduler (at :meth:`step`) raise a one-line ``ValueError`` naming the option or
    parameter and the fix before anything is written.

    Projected-group keys: ``rank`` (required), ``update_interval`` (``T``), ``alpha``, ``alpha_r``,
    ``rule`` (see ``grassopt.rules.RULES``), ``transport`` (``keep``/``reset``/``rotate``),
    ``recovery`` (bool), ``zeta`` (limiter), ``scaling`` (``None``/``"channel"``/``"tensor"``:
    APOLLO's update, the raw gradient scaled by ``||N|| / ||R||``), ``error_feedback`` (bool:
    LDAdam's full-size error buffer), and the options of the chosen rule (for example
    ``step_size``, ``step_mode``, ``update_rank`` for ``track``; defaults come from the rule).
    """

    # Parameters on the meta device are refused (module.to_empty replaces them, so an optimizer built
    # on them would silently train nothing); the memory estimate builds one on shapes only.
    _shapes_only = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        seed: int = 0,
        check_finite: bool = True,
        state_dtype: str = "float32",
        stochastic_rounding: bool = False,
        fused: bool | None = None,
    ):
        if fused not in (None, True, False):
            raise ValueError(f"fused={fused!r} must be None (automatic), True or False")
        if isinstance(params, (Tensor, str, dict)) or not isinstance(params, Iterable):
            raise TypeError(f"params must be an iterable of tensors, (name, tensor) pairs or param-group dicts, got "
                            f"{type(params).__name__} (e.g. model.parameters() or grassopt.param_groups(model, ...))")
        betas = tuple(betas) if isinstance(betas, list) else betas  # anything else is checked per group
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed,
                        check_finite=check_finite, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)
        #: None: torch's fused Adam kernel wherever the device has it; False: foreach ops; True: insist
        self._fused = fused
        self._generators: dict[Tensor, torch.Generator] = {}
        self._seed_generators: dict[str, torch.Generator] = {}  # scratch, reseeded before each use
        self._diag: dict[Tensor, dict[str, Any]] = {}
        #: id(parameter) -> (group index, index in the group, index over all groups): O(1) look-ups
        self._where: dict[int, tuple[int, int, int]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, atomically: the group is completed with its defaults and checked whole
        (options, values, parameters) on a copy, and appended only when every check passed, so a
        refused group leaves the optimizer (and the caller's dict) as they were."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        gi = len(self.param_groups)
        group = self._complete_group(param_group, gi)
        self._check_params(group, gi)
        self._validate_group(group, gi)
        super().add_param_group(group)  # torch's own checks (names in all groups or none) raise before appending
        param_group.clear()  # the group is the caller's dict, as with torch's optimizers
        param_group.update(group)
        self.param_groups[-1] = param_group
        flat = sum(len(g["params"]) for g in self.param_groups[:-1])
        for i, p in enumerate(param_group["params"]):
            self._where[id(p)] = (gi, i, flat + i)

    def _complete_group(self, param_group: dict[str, Any], gi: int) -> dict[str, Any]:
        """A new dict: ``params`` a list of tensors (names moved to ``param_names``), unknown keys
        refused, every default filled in. Changes nothing."""
        where = f"param group {gi}"
        group = dict(param_group)
        if "params" not in group:
            raise ValueError(f"{where} has no 'params': give a list of tensors or (name, tensor) pairs")
        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError(f"{where}: params must be an ordered collection such as a list, not a set "
                            "(the order of a set changes between runs)")
        elif isinstance(params, (dict, str)) or not isinstance(params, Iterable):
            raise TypeError(f"{where}: params must be a list of tensors or (name, tensor) pairs, got "
                            f"{type(params).__name__} (use model.parameters() or model.named_parameters())")
        params = list(params)
        named = [isinstance(p, tuple) for p in params]
        if any(named):
            if not all(named) or not all(len(p) == 2 and isinstance(p[0], str) for p in params):
                raise ValueError(f"{where}: params must be all tensors or all (name, tensor) pairs")
            group["param_names"] = [n for n, _ in params]
            params = [p for _, p in params]
        group["params"] = params
        projected = group.get("rank") is not None
        if not projected:
            group.pop("rank", None)
        subspace = _SUBSPACE_KEYS | all_rule_options()
        allowed = _PLAIN_KEYS | (subspace if projected else set())
        for key in group:
            if key not in allowed:
                hint = "; subspace options need a 'rank' in the group" if key in subspace else _suggest(key, allowed)
                raise ValueError(f"unknown param-group option {key!r}{hint}")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        if projected:
            name = group.get("rule", SUBSPACE_DEFAULTS["rule"])
            if not isinstance(name, str):
                raise ValueError(f"{where}: rule={name!r} must be the name of a subspace rule, e.g. 'track'")
            rule = get_rule(name)
            for key in all_rule_options() - set(rule.OPTIONS):
                if key in group:
                    raise ValueError(
                        f"option {key!r} is not used by subspace rule {rule.NAME!r} "
                        f"(its options: {sorted(rule.OPTIONS) or 'none'}); remove it or change the rule")
            for key, value in {**SUBSPACE_DEFAULTS, **rule.OPTIONS}.items():
                group.setdefault(key, value)
        return group

    def _check_params(self, group: dict[str, Any], gi: int) -> None:
        """The parameters of a new group: dense floating-point leaf tensors with data, each in one
        group once. Raises before anything changes."""
        where = f"param group {gi}"
        params = group["params"]
        names = group.get("param_names")
        if names is not None and (not isinstance(names, (list, tuple)) or len(names) != len(params)
                                  or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"{where}: param_names must be a list of {len(params)} strings, one per parameter")
        names = names or [f"parameter {j}" for j in range(len(params))]
        seen: dict[int, str] = {}
        for name, p in zip(names, params):
            if not isinstance(p, Tensor):
                raise TypeError(f"{where}: {name} is a {type(p).__name__}, not a tensor; pass tensors or "
                                "(name, tensor) pairs (model.parameters() or model.named_parameters())")
            if p.is_meta and not self._shapes_only:
                raise ValueError(f"{where}: {name} is on the meta device (it has no data); materialize the model "
                                 "(module.to_empty(device=...) then initialize it) before building the optimizer")
            if p.layout != torch.strided:
                raise ValueError(f"{where}: {name} has layout {p.layout}; only dense (strided) tensors can be "
                                 "trained (convert it with .to_dense())")
            if p.is_complex():
                raise ValueError(f"{where}: {name} has dtype {p.dtype}; complex parameters are not supported "
                                 "(train torch.view_as_real of it instead)")
            if not p.dtype.is_floating_point:
                raise ValueError(f"{where}: {name} has dtype {p.dtype}; only floating-point tensors can be "
                                 "trained (leave it out of the optimizer, or make it a float tensor)")
            if not (p.is_leaf or p.retains_grad):
                raise ValueError(f"{where}: {name} is not a leaf tensor (it was computed from others); "
                                 "pass the nn.Parameter it comes from")
            if id(p) in seen:
                raise ValueError(f"{where}: {name} is listed twice in the group (also as {seen[id(p)]}); "
                                 "list each parameter once")
            seen[id(p)] = name
        for gj, other in enumerate(self.param_groups):
            for j, q in enumerate(other["params"]):
                if id(q) in seen:
                    as_ = other["param_names"][j] if other.get("param_names") else f"its parameter {j}"
                    raise ValueError(f"{where}: {seen[id(q)]} is already in param group {gj} ({as_}); "
                                     "a parameter may belong to one group only")
        if "rank" in group:
            check_params(group)  # FSDP2 shards: a clear error now, not wrong maths later

    def _validate_group(self, group: dict[str, Any], gi: int) -> None:
        """Check a complete group's option values (``ValueError`` with a one-line message naming the
        option and the fix). Changes nothing: run before a group is added or a state dict loaded."""
        names = group.get("param_names") or [f"param {j}" for j in range(len(group["params"]))]
        where = f"param group {gi}"

        def bad(msg: str) -> None:
            raise ValueError(f"{where}: {msg}")

        msg = _hyper_error(group)
        if msg:
            bad(msg)
        if "initial_lr" in group and _real_error(group["initial_lr"], 0.0):
            bad(f"initial_lr={group['initial_lr']!r} must be >= 0 and finite (set by LR schedulers from lr)")
        seed = group["seed"]
        if not isinstance(seed, Integral) or isinstance(seed, bool):
            bad(f"seed={seed!r} must be an integer (it seeds the random rules and stochastic rounding), e.g. seed=0")
        if not isinstance(group["check_finite"], bool):
            bad(f"check_finite={group['check_finite']!r} must be True or False")
        if not isinstance(group["state_dtype"], str) or group["state_dtype"] not in CODECS:
            bad(f"state_dtype={group['state_dtype']!r} must be one of {list(CODECS)}")
        if not isinstance(group["stochastic_rounding"], bool):
            bad(f"stochastic_rounding={group['stochastic_rounding']!r} must be True or False")
        if "rank" not in group:
            return
        rule = get_rule(group["rule"])
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            bad(f"rank={rank!r} must be an integer >= 1")
        T = group["update_interval"]
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            bad(f"update_interval={T!r} must be an integer >= 1 (steps between basis updates)")
        if not isinstance(group["transport"], str) or group["transport"] not in TRANSPORTS:
            bad(f"unknown transport {group['transport']!r}; choose one of {list(TRANSPORTS)}")
        if _real_error(group["zeta"], 1.0):
            bad(f"zeta={group['zeta']!r} must be >= 1 and finite (the limiter may only shrink the residual's "
                "growth; a large zeta such as 1e6 lets it act on explosions only)")
        if _real_error(group["alpha"], 0.0, strict=True):
            bad(f"alpha={group['alpha']!r} must be > 0 and finite (the scale of the update, e.g. 0.25)")
        if group["alpha_r"] is not None and _real_error(group["alpha_r"], 0.0):
            bad(f"alpha_r={group['alpha_r']!r} must be >= 0 and finite, or None (the same as alpha)")
        if not isinstance(group["recovery"], bool):
            bad(f"recovery={group['recovery']!r} must be True or False")
        if group["scaling"] not in SCALINGS:
            bad(f"scaling={group['scaling']!r} must be None, 'channel' or 'tensor'")
        if not isinstance(group["error_feedback"], bool):
            bad(f"error_feedback={group['error_feedback']!r} must be True or False")
        if group["scaling"] is not None and group["recovery"]:
            bad(f"scaling={group['scaling']!r} replaces the projected update by the scaled raw gradient, so there "
                "is no residual to recover: set recovery=False")
        if group["scaling"] is not None and group["error_feedback"]:
            bad(f"scaling={group['scaling']!r} applies the full gradient, so there is no compression error to feed "
                "back: set error_feedback=False")
        if not rule_flag(rule, "ORTHONORMAL"):
            needs = [k for k, on in (("transport='rotate'", group["transport"] == "rotate"),
                                     ("recovery=True", group["recovery"]),
                                     ("error_feedback=True", group["error_feedback"])) if on]
            if needs:
                bad(f"rule {rule.NAME!r} draws bases without orthonormal columns, but {' and '.join(needs)} "
                    "assume Q Q^T is a projector; use transport='keep' or 'reset', recovery=False, "
                    "error_feedback=False (or an orthonormal rule)")
        try:  # the rule's own options are the rule's to check (grassopt.rules.check_options)
            check_options(rule, group, rank)
        except ValueError as e:
            bad(str(e))
        for name, p in zip(names, group["params"]):
            if p.dim() != 2:
                bad(f"{name} has shape {tuple(p.shape)}: only 2-D weights can be projected; put it in a "
                    f"group without 'rank' (grassopt.param_groups does this for you)")
            if rank >= min(p.shape):
                bad(f"rank={rank} must be < min{tuple(p.shape)}={min(p.shape)} for {name}; lower the rank "
                    f"or train this matrix in a plain group (grassopt.param_groups falls back with a warning)")

    def _param_name(self, gi: int, i: int) -> str:
        names = self.param_groups[gi].get("param_names")
        return names[i] if names else f"parameter {i} of param group {gi}"

    # ------------------------------------------------------------------ randomness
    def _flat_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _locate(self, p: Tensor, missing_ok: bool = False) -> tuple[int, int, int] | None:
        """``(group index, index in the group, index over all groups)`` of a parameter, in O(1)
        (None for a tensor that is not a parameter here, with ``missing_ok``)."""
        where = self._where.get(id(p))
        if where is None or not (where[0] < len(self.param_groups) and where[1] < len(
                ps := self.param_groups[where[0]]["params"]) and ps[where[1]] is p):  # groups edited in place
            flat = [(gi, i, q) for gi, g in enumerate(self.param_groups) for i, q in enumerate(g["params"])]
            self._where = {id(q): (gi, i, n) for n, (gi, i, q) in enumerate(flat)}
            where = self._where.get(id(p))
            if where is None and not missing_ok:
                raise KeyError("the tensor is not a parameter of this optimizer")
        return where

    def _param_index(self, p: Tensor) -> int:
        return self._locate(p)[2]

    def basis(self, p: Tensor) -> Tensor | None:
        """The current basis ``Q`` (``d x r``, float32) of a projected parameter; None before its first
        step or for a plain parameter. Rules that keep a seed instead (``gaussian``) regenerate it."""
        st = self.state.get(p, {})
        if "Q" in st or "seed" not in st:
            return st.get("Q")
        group = self.param_groups[self._locate(p)[0]]
        return _projected.seeded_basis(get_rule(group["rule"]), group, st["seed"],
                                       torch.empty(min(p.shape), 0, device=p.device), self._seed_generators)

    def _generator(self, p: Tensor) -> torch.Generator:
        gen = self._generators.get(p)
        if gen is None:
            gi, _, index = self._locate(p)
            gen = torch.Generator(device=p.device)
            gen.manual_seed(_mix_seed(int(self.param_groups[gi]["seed"]), index))
            self._generators[p] = gen
        return gen

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for i, p in enumerate(self._flat_params()):
            gen = self._generators.get(p)
            if gen is not None:
                sd["state"][i] = {**sd["state"].get(i, {}), "rng_state": gen.get_state()}
        return sd

    #: the settings that fix what a projected parameter's state means: a state dict saved with other
    #: values is refused (the other options are hyper-parameters, loaded from the state dict as torch does)
    _STRUCTURE = ("rule", "transport", "recovery", "scaling", "error_feedback")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; float32 state stays float32 (it is not cast to a bf16 parameter's dtype).

        Everything is checked before anything changes (``ValueError``, one line naming the param
        group or parameter and what differs): the number of groups and parameters; the settings that
        fix what the state means (``rank``, ``rule``, ``transport``, ``recovery``, ``scaling``,
        ``error_feedback``, ``state_dtype``) equal this optimizer's; the saved hyper-parameters valid;
        every parameter's state complete, of the shapes and dtypes its parameter needs, and finite
        (moments, ``Q``, block scales, error buffers; ``V`` and the scales non-negative), its step
        counts integers and its generator state loadable. The hyper-parameters (``lr``, ``betas``,
        ``alpha``, rule options, ...) are then taken from the state dict, as torch's optimizers do.
        """
        plan = self._check_state_dict(state_dict)
        super().load_state_dict({**state_dict, "state": {}})
        for group in self.param_groups:  # state dicts saved before an option existed get its default
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if "rank" in group:
                for key, value in {**SUBSPACE_DEFAULTS, **get_rule(group["rule"]).OPTIONS}.items():
                    group.setdefault(key, value)
        self.state.clear()
        self._generators.clear()
        self._diag.clear()
        for p, st, gen in plan:
            if gen is not None:
                self._generators[p] = gen
            self.state[p] = {k: v.detach().to(device=p.device).clone() if isinstance(v, Tensor) else v
                             for k, v in st.items() if k != "rng_state"}
            if "step" in st:  # fields a checkpoint written before they existed lacks (e.g. the int8 code map)
                fields = get_codec(self.param_groups[self._locate(p)[0]]["state_dtype"]).FIELDS
                for k, v in fields.items():
                    self.state[p].setdefault(k, v)

    def _check_state_dict(self, state_dict: Any) -> list[tuple[Tensor, dict[str, Any], torch.Generator | None]]:
        """Check a state dict against this optimizer (see :meth:`load_state_dict`) without changing
        anything; return ``(parameter, saved state, generator or None)`` for every saved state."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"not an optimizer state dict: got {type(state_dict).__name__}")
        saved, groups = state_dict.get("state"), state_dict.get("param_groups")
        if not isinstance(saved, dict) or not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the saved optimizer has {len(groups)} param groups but this one has "
                             f"{len(self.param_groups)}; build the optimizer with the same groups before loading")
        id_map: dict[Any, tuple[int, int]] = {}
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            ids = theirs.get("params")
            if not isinstance(ids, list) or len(ids) != len(mine["params"]):
                n = len(ids) if isinstance(ids, list) else "no"
                raise ValueError(f"param group {gi}: the saved optimizer has {n} parameters but this one has "
                                 f"{len(mine['params'])}; build the optimizer from the same model and groups")
            for i, k in enumerate(ids):
                id_map[k] = (gi, i)
            if ("rank" in mine) != ("rank" in theirs) or mine.get("rank") != theirs.get("rank"):
                raise ValueError(
                    f"param group {gi}: the saved optimizer has rank={theirs.get('rank')} but this one "
                    f"has rank={mine.get('rank')}; build the optimizer with the same groups before loading")
            defaults = {**self.defaults, **SUBSPACE_DEFAULTS}
            if theirs.get("state_dtype", "float32") != mine["state_dtype"]:
                raise ValueError(f"param group {gi}: the saved state has {theirs.get('state_dtype', 'float32')} "
                                 f"moments but its group has state_dtype={mine['state_dtype']!r}; build the "
                                 "optimizer with the state_dtype it was saved with")
            for key in self._STRUCTURE if "rank" in mine else ():
                if theirs.get(key, defaults[key]) != mine[key]:
                    raise ValueError(
                        f"param group {gi}: the saved optimizer has {key}={theirs.get(key, defaults[key])!r} but "
                        f"this one has {key}={mine[key]!r}; build the optimizer with the preset and settings it "
                        "was saved with")
            complete = {**defaults, **theirs, "params": mine["params"], "param_names": mine.get("param_names")}
            if "rank" in mine:
                complete = {**get_rule(mine["rule"]).OPTIONS, **complete}
            else:
                complete = {k: v for k, v in complete.items() if k not in SUBSPACE_DEFAULTS}
            try:
                self._validate_group(complete, gi)
            except ValueError as e:
                raise ValueError(f"the saved optimizer state: {e}") from None
        plan = []
        for key, st in saved.items():
            if key not in id_map:
                raise ValueError(f"the saved state has an entry for parameter {key!r} but the saved param groups "
                                 f"list only {len(id_map)} parameters; the state dict is corrupt")
            gi, i = id_map[key]
            p = self.param_groups[gi]["params"][i]
            where = f"the saved state of {self._param_name(gi, i)}"
            if not isinstance(st, dict):
                raise ValueError(f"{where} is a {type(st).__name__}, not a dict; the state dict is corrupt")
            plan.append((p, st, self._check_param_state(self.param_groups[gi], p, st, where)))
        return plan

    def _check_param_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any],
                           where: str) -> torch.Generator | None:
        """Check one parameter's saved state (``where`` names it); return its generator, if saved."""
        gen = None
        if "rng_state" in st:
            v = st["rng_state"]
            try:
                if not isinstance(v, Tensor):
                    raise TypeError
                gen = torch.Generator(device=p.device)
                gen.set_state(v.to("cpu", torch.uint8))
            except (TypeError, RuntimeError, ValueError):
                raise ValueError(f"{where}: rng_state is not a generator state for {p.device}; the checkpoint is "
                                 "corrupt or from another device") from None
        if set(st) <= {"rng_state"}:
            return gen  # never stepped
        codec = get_codec(group["state_dtype"])
        has = detect(st)
        if has is not None and has != codec.NAME:
            raise ValueError(f"{where} has {has} moments but its group has state_dtype={group['state_dtype']!r}; "
                             "build the optimizer with the state_dtype it was saved with")
        need = state_spec(group, tuple(p.shape))
        missing = [k for k in need if k not in st and k not in codec.FIELDS]
        extra = [k for k in st if k not in need and k != "rng_state"]
        if missing or extra:
            what = (f"lacks {missing}" if missing else "") + (" and " if missing and extra else "") + \
                   (f"has unexpected {extra}" if extra else "")
            raise ValueError(f"{where} {what}; the checkpoint is incomplete or from another optimizer or settings")
        for k, (dtype, shape) in need.items():
            if k in st:
                self._check_state_value(k, st[k], dtype, shape, codec, p, where)
        if "adam_step" in need and st["adam_step"] > st["step"]:
            raise ValueError(f"{where}: adam_step={st['adam_step']} exceeds step={st['step']}; the state dict is corrupt")
        return gen

    @staticmethod
    def _check_state_value(k: str, v: Any, dtype: Any, shape: tuple | None, codec, p: Tensor, where: str) -> None:
        """One saved state entry against its :func:`~grassopt.optim.state.state_spec` entry."""
        if dtype is int:
            if not isinstance(v, Integral) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{where}: {k}={v!r} must be an integer >= 0; the state dict is corrupt")
            return
        if dtype is str:
            msg = codec.field_error(k, v)
            if msg:
                raise ValueError(f"{where}: {msg}; the checkpoint is from another version or corrupt")
            return
        if not isinstance(v, Tensor) or v.dtype != dtype or tuple(v.shape) != shape:
            got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{where}: {k} is {got} but this optimizer needs {dtype} {shape}; the checkpoint "
                             f"is of another model or settings (parameter shape {tuple(p.shape)})")
        if dtype.is_floating_point:
            non_negative = k in _NON_NEGATIVE or k in codec.NON_NEGATIVE
            if not (bool(v.isfinite().all()) and (not non_negative or bool((v >= 0).all()))):
                rule = "finite and >= 0" if non_negative else "finite"
                raise ValueError(f"{where}: {k} is not {rule} (NaN, inf or a wrong sign: a corrupt checkpoint, "
                                 "or state saved after a divergence); load an earlier checkpoint")

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
            where = self._locate(p, missing_ok=True) if p.grad is not None else None
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
            msg = _hyper_error(group)  # an LR scheduler (or a user) may have changed them since
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
            params, [p.grad for p in params], states, codec=codec, lr=group["lr"], betas=group["betas"],
            eps=group["eps"], weight_decay=group["weight_decay"], fused=self._fused,
            generators=[self._generator(p) if sr and p.dtype != torch.float32 else None for p in params],
            state_generators=[self._generator(p) if codec.needs_generator(st) else None
                              for p, st in zip(params, states)])

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
            generator=lambda j: self._generator(params[j]), cache=self._seed_generators, fused=self._fused)
