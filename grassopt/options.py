"""The param-group options of :class:`grassopt.SubspaceAdamW`, declared once: :data:`OPTIONS`.

Each :class:`Option` holds an option's default, its check (and its one-line error), its choices,
whether it fixes what a parameter's saved state means (``load_state_dict`` then refuses a checkpoint
saved with another value), whether the step re-checks it (an LR scheduler may change it), its scope
and its documentation. Read by the optimizer's construction and ``add_param_group``
(:func:`complete_group`, :func:`check_group`), by its step (:func:`step_error`), by
``load_state_dict``'s checks (:mod:`grassopt.optim.state`), by the presets
(:func:`grassopt.presets.resolve_preset`), by the command lines' ``--opt`` help and by the docs
(:func:`markdown`, the table in docs/algorithms.md#options).

The rules' own options (``step_size``, ``update_rank``, ...) are *referenced*, not copied: each rule
declares them in its ``OPTIONS`` (defaults) and checks them in its ``validate`` (grassopt.rules), so a
new subspace rule stays one file and one registry line. :func:`rule_option_names` lists them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from .bases import BASIS_DTYPES
from .codecs import CODECS
from .rules import RULES, all_rule_options, check_options, get_rule, rule_flag
from .transport import TRANSPORTS

__all__ = ["Option", "OPTIONS", "UNSET", "SUBSPACE_DEFAULTS", "STRUCTURAL_KEYS", "option_names",
           "rule_option_names", "preset_option_names", "complete_group", "check_group", "step_error",
           "check_value", "markdown"]


class _Unset:
    def __repr__(self) -> str:
        return "(unset)"


#: The default of an option that is absent unless given (``rank``: absent means a plain group).
UNSET: Any = _Unset()

#: Scopes: every param group; projected groups only (a ``rank`` is needed); the constructor only.
SCOPES = ("group", "subspace", "optimizer")


@dataclass(frozen=True)
class Option:
    """One option: ``default``; ``check(value) -> bool`` (True when valid; None: ``choices`` decide, or
    anything is accepted); ``choices`` (a callable returning them: registries are read when needed);
    ``changes_state_meaning`` (a saved state with another value is refused on load); ``doc``.

    ``error``: the rest of the one-line message after ``key=value`` (``{choices}`` is replaced), or a
    callable ``value -> full message``; ``mismatch``: ``load_state_dict``'s message for another saved value
    (``{gi}``, ``{key}``, ``{saved}``, ``{mine}``); ``scheduled``: the step checks it again.
    """

    default: Any
    check: Callable[[Any], bool] | None = None
    choices: Callable[[], Sequence[Any]] | None = None
    changes_state_meaning: bool = False
    doc: str = ""
    error: str | Callable[[Any], str] = ""
    scope: str = "group"
    scheduled: bool = False
    mismatch: str | None = None

    def message(self, key: str, value: Any) -> str | None:
        """The one-line message for ``value``, or None when it is valid."""
        if self.check is not None:
            ok = self.check(value)
        elif self.choices is not None:
            ok = _one_of(value, self.choices())
        else:
            return None
        if ok:
            return None
        if callable(self.error):
            return self.error(value)
        choices = list(self.choices()) if self.choices is not None else None
        return f"{key}={value!r} " + self.error.format(choices=choices)


def _one_of(value: Any, choices: Iterable[Any]) -> bool:
    return any(type(value) is type(c) and value == c for c in choices)  # types too: 1 is not True


def _real(v: Any, low: float, strict: bool = False) -> bool:
    """``v`` a finite real number (not a bool, not a tensor) ``>= low`` (``> low``)."""
    if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(v):
        return False
    return float(v) > low if strict else float(v) >= low


def _int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _betas(v: Any) -> bool:
    return isinstance(v, tuple | list) and len(v) == 2 and all(_real(b, 0.0) and float(b) < 1 for b in v)


def _eps_error(v: Any) -> str:
    if isinstance(v, Real) and not isinstance(v, bool) and v == 0:
        return (f"eps={v!r} must be > 0: eps is added to sqrt(V), so eps=0 divides 0 by 0 wherever V is 0 "
                "(a coordinate with no gradient yet) and writes NaN into the weights; use e.g. eps=1e-8 "
                "(torch's default) or 1e-6 (ours)")
    return f"eps={v!r} must be > 0 and finite (it is added to sqrt(V); e.g. 1e-6, the default)"


def _rule_error(v: Any) -> str:
    if not isinstance(v, str):
        return f"rule={v!r} must be the name of a subspace rule, e.g. 'track'"
    return f"unknown subspace rule {v!r}; choose one of {sorted(RULES)}"


_BOOL = "must be True or False"
_MEANING = ("the saved optimizer has {key}={saved!r} but this one has {key}={mine!r}; build the optimizer with "
            "the preset and settings it was saved with")

#: Every option a param group (or the constructor, scope ``optimizer``) takes, but the rules' own.
OPTIONS: dict[str, Option] = {
    # ---------------------------------------------------------------- every group (AdamW)
    "lr": Option(1e-3, lambda v: _real(v, 0.0), scheduled=True, doc="learning rate",
                 error="must be >= 0 and finite (a float learning rate such as 1e-3)"),
    "betas": Option((0.9, 0.999), _betas, scheduled=True, doc="Adam's (beta1, beta2), each in [0, 1)",
                    error="must be a pair (beta1, beta2) of numbers in [0, 1), e.g. (0.9, 0.999)"),
    "eps": Option(1e-6, lambda v: _real(v, 0.0, strict=True), scheduled=True, error=_eps_error,
                  doc="added to sqrt(V) (GaLore's convention); must be > 0 (eps=0 writes NaN where V is 0)"),
    "weight_decay": Option(0.0, lambda v: _real(v, 0.0), scheduled=True, doc="decoupled weight decay",
                           error="must be >= 0 and finite (e.g. 0.0 or 0.1)"),
    "seed": Option(0, lambda v: isinstance(v, Integral) and not isinstance(v, bool),
                   doc="seeds the per-parameter generators (with the parameter's index): the random rules' "
                       "draws and, from a separate stream, the stochastic rounding",
                   error="must be an integer (it seeds the random rules and stochastic rounding), e.g. seed=0"),
    "check_finite": Option(True, _bool, error=_BOOL,
                           doc="refuse a non-finite gradient before anything changes (FloatingPointError)"),
    "state_dtype": Option("float32", choices=lambda: list(CODECS), changes_state_meaning=True,
                          error="must be one of {choices}",
                          mismatch="the saved state has {saved} moments but its group has state_dtype={mine!r}; "
                                   "build the optimizer with the state_dtype it was saved with",
                          doc="the moments' format, a codec of grassopt.codecs.CODECS"),
    "stochastic_rounding": Option(False, _bool, error=_BOOL,
                                  doc="round the float32 update of a low-precision weight (bf16, or int8 of "
                                      "grassopt.qlinear) stochastically; else to nearest"),
    "initial_lr": Option(UNSET, lambda v: _real(v, 0.0), doc="set by LR schedulers from lr",
                         error="must be >= 0 and finite (set by LR schedulers from lr)"),
    "name": Option(UNSET, doc="a label of the group (kept, not read)"),
    # ---------------------------------------------------------------- projected groups (a rank)
    "rank": Option(UNSET, lambda v: _int(v, 1), scope="subspace", changes_state_meaning=True,
                   error="must be an integer >= 1",
                   mismatch="the saved optimizer has rank={saved} but this one has rank={mine}; build the "
                            "optimizer with the same groups before loading",
                   doc="the subspace's dimension r (< the short side of every matrix); a group is projected "
                       "when it has one"),
    "update_interval": Option(200, lambda v: _int(v, 1), scope="subspace",
                              error="must be an integer >= 1 (steps between basis updates)",
                              doc="T, the steps between basis updates"),
    "alpha": Option(0.25, lambda v: _real(v, 0.0, strict=True), scope="subspace",
                    error="must be > 0 and finite (the scale of the update, e.g. 0.25)",
                    doc="the scale of the projected update"),
    "alpha_r": Option(None, lambda v: v is None or _real(v, 0.0), scope="subspace",
                      error="must be >= 0 and finite, or None (the same as alpha)",
                      doc="the scale of the recovered residual; None: the same as alpha (Fira's form)"),
    "rule": Option("track", lambda v: isinstance(v, str) and v in RULES, lambda: sorted(RULES), scope="subspace",
                   changes_state_meaning=True, error=_rule_error, mismatch=_MEANING,
                   doc="where the basis comes from, a rule of grassopt.rules.RULES (its options: below)"),
    "transport": Option("rotate", choices=lambda: list(TRANSPORTS), scope="subspace", changes_state_meaning=True,
                        error=lambda v: f"unknown transport {v!r}; choose one of {list(TRANSPORTS)}",
                        mismatch=_MEANING, doc="what the moments do when the basis changes"),
    "recovery": Option(True, _bool, scope="subspace", changes_state_meaning=True, error=_BOOL, mismatch=_MEANING,
                       doc="recovery scaling of the residual X - Q Q^T X (Fira), with the norm-growth limiter"),
    "zeta": Option(1.01, lambda v: _real(v, 1.0), scope="subspace",
                   error="must be >= 1 and finite (the limiter may only shrink the residual's growth; a large "
                         "zeta such as 1e6 lets it act on explosions only)",
                   doc="the norm-growth limiter's bound on the growth of the recovered (or scaled) update"),
    "scaling": Option(None, choices=lambda: [None, "channel", "tensor"], scope="subspace",
                      changes_state_meaning=True, error="must be None, 'channel' or 'tensor'", mismatch=_MEANING,
                      doc="APOLLO's update: the raw gradient scaled per channel or per tensor (None: projected)"),
    "error_feedback": Option(False, _bool, scope="subspace", changes_state_meaning=True, error=_BOOL,
                             mismatch=_MEANING, doc="LDAdam's full-size error-feedback buffer"),
    "basis_dtype": Option("float32", choices=lambda: list(BASIS_DTYPES), scope="subspace", changes_state_meaning=True,
                          error="must be one of {choices}", mismatch=_MEANING,
                          doc="how Q is stored (grassopt.bases): float32, bfloat16, or int8 or int4 with a float32 "
                              "scale per column; decoded for the step, re-orthonormalised at basis updates"),
    # ---------------------------------------------------------------- the constructor only
    "fused": Option(None, choices=lambda: [None, True, False], scope="optimizer",
                    error=lambda v: f"fused={v!r} must be None (automatic), True or False",
                    doc="None: torch's fused Adam kernel where the device has one; False: foreach ops"),
    "compile": Option(False, _bool, scope="optimizer",
                      error=lambda v: f"compile={v!r} must be True or False",
                      doc="True: the step's elementwise work as torch.compile (inductor) kernels "
                          "(grassopt.optim._compiled); the eager step where compile is unavailable"),
}

#: Keys of a param group that are not options: its parameters and their names.
STRUCTURAL_KEYS = frozenset({"params", "param_names"})

#: Defaults of a projected group (a group with a ``rank``). The components default to SubTrack++.
SUBSPACE_DEFAULTS: dict[str, Any] = {k: o.default for k, o in OPTIONS.items()
                                     if o.scope == "subspace" and o.default is not UNSET}


def option_names(scope: str) -> list[str]:
    """The options of ``scope`` (``group``, ``subspace`` or ``optimizer``), in the table's order."""
    return [k for k, o in OPTIONS.items() if o.scope == scope]


def rule_option_names() -> list[str]:
    """Every option some rule declares (in its ``OPTIONS``), sorted."""
    return sorted(all_rule_options())


def preset_option_names() -> list[str]:
    """The options a preset's projected group may override (``resolve_preset``, ``--opt``)."""
    return [k for k in option_names("subspace") if k != "rank"] + rule_option_names()


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_value(key: str, value: Any) -> str | None:
    """The one-line message for ``value`` of option ``key`` (None when valid)."""
    return OPTIONS[key].message(key, value)


def complete_group(group: dict[str, Any], where: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown keys and fill in the defaults of ``group`` (a new dict whose ``params`` is already a
    list): ``defaults`` (the optimizer's) for every group; the table's and the rule's for a projected one."""
    group = dict(group)
    projected = group.get("rank") is not None
    if not projected:
        group.pop("rank", None)
    subspace = set(option_names("subspace")) | all_rule_options()
    allowed = STRUCTURAL_KEYS | set(option_names("group")) | (subspace if projected else set())
    for key in group:
        if key not in allowed:
            hint = "; subspace options need a 'rank' in the group" if key in subspace else _suggest(key, allowed)
            raise ValueError(f"unknown param-group option {key!r}{hint}")
    for key, value in defaults.items():
        group.setdefault(key, value)
    if isinstance(group["betas"], list):
        group["betas"] = tuple(group["betas"])
    if projected:
        msg = check_value("rule", group.setdefault("rule", SUBSPACE_DEFAULTS["rule"]))
        if msg:
            raise ValueError(f"{where}: {msg}")
        rule = get_rule(group["rule"])
        for key in sorted(all_rule_options() - set(rule.OPTIONS)):
            if key in group:
                raise ValueError(f"option {key!r} is not used by subspace rule {rule.NAME!r} "
                                 f"(its options: {sorted(rule.OPTIONS) or 'none'}); remove it or change the rule")
        for key, value in {**SUBSPACE_DEFAULTS, **rule.OPTIONS}.items():
            group.setdefault(key, value)
    return group


def step_error(group: dict[str, Any]) -> str | None:
    """The message for a bad scheduled option (``lr``, ``betas``, ``eps``, ``weight_decay``), else None.

    An LR scheduler (or a user) may change them between steps, so the step checks them too: a few
    Python comparisons per group in the common case.
    """
    lr, eps, wd, betas = group["lr"], group["eps"], group["weight_decay"], group["betas"]
    if (type(lr) in _NUMBER and type(eps) in _NUMBER and type(wd) in _NUMBER and type(betas) is tuple
            and len(betas) == 2 and type(betas[0]) in _NUMBER and type(betas[1]) in _NUMBER
            and 0 <= lr < math.inf and 0 < eps < math.inf and 0 <= wd < math.inf
            and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        return CODECS[group.get("state_dtype", "float32")].group_error(group)  # the common case, cheaply (every group, every step)
    for key in _SCHEDULED:
        msg = check_value(key, group[key])
        if msg:
            return msg
    return CODECS[group.get("state_dtype", "float32")].group_error(group)


_NUMBER = (float, int)  # exact types (not bool) for the fast path of step_error
_SCHEDULED = [k for k, o in OPTIONS.items() if o.scheduled]


def check_group(group: dict[str, Any], where: str) -> None:
    """Check a complete group's option values (``ValueError``, one line naming the option and the fix;
    ``where`` names the group). Changes nothing."""
    projected = "rank" in group
    for key, opt in OPTIONS.items():
        if opt.scope == "optimizer" or (opt.scope == "subspace" and not projected) or key not in group:
            continue
        msg = opt.message(key, group[key])
        if msg:
            raise ValueError(f"{where}: {msg}")
    msg = CODECS[group["state_dtype"]].group_error(group) if "state_dtype" in group else None
    if msg:  # the codec's own cross-option check (e.g. no stored M needs betas[0] == 0)
        raise ValueError(f"{where}: {msg}")
    if projected:
        msg = _constraint_error(group)
        if msg:
            raise ValueError(f"{where}: {msg}")


def _constraint_error(group: dict[str, Any]) -> str | None:
    """What a projected group's options, each valid, cannot do together (or with its rule and shapes)."""
    rule, rank, scaling = get_rule(group["rule"]), group["rank"], group["scaling"]
    if scaling is not None and group["recovery"]:
        return (f"scaling={scaling!r} replaces the projected update by the scaled raw gradient, so there is no "
                "residual to recover: set recovery=False")
    if scaling is not None and group["error_feedback"]:
        return (f"scaling={scaling!r} applies the full gradient, so there is no compression error to feed back: "
                "set error_feedback=False")
    if not rule_flag(rule, "ORTHONORMAL"):
        needs = [k for k, on in (("transport='rotate'", group["transport"] == "rotate"),
                                 ("recovery=True", group["recovery"]),
                                 ("error_feedback=True", group["error_feedback"])) if on]
        if needs:
            return (f"rule {rule.NAME!r} draws bases without orthonormal columns, but {' and '.join(needs)} "
                    "assume Q Q^T is a projector; use transport='keep' or 'reset', recovery=False, "
                    "error_feedback=False (or an orthonormal rule)")
    try:  # the rule's own options are the rule's to check (grassopt.rules.check_options)
        check_options(rule, group, rank)
    except ValueError as e:
        return str(e)
    names = group.get("param_names") or [f"param {j}" for j in range(len(group["params"]))]
    for name, p in zip(names, group["params"]):
        if p.dim() != 2:
            return (f"{name} has shape {tuple(p.shape)}: only 2-D weights can be projected; put it in a group "
                    "without 'rank' (grassopt.param_groups does this for you)")
        if rank >= min(p.shape):
            return (f"rank={rank} must be < min{tuple(p.shape)}={min(p.shape)} for {name}; lower the rank or train "
                    "this matrix in a plain group (grassopt.param_groups falls back with a warning)")
    return None


def markdown() -> str:
    """The table of docs/algorithms.md#options (tests/test_options.py keeps the docs equal to it)."""
    rows = ["| option | default | scope | fixes the state's meaning | what it is |", "|---|---|---|---|---|"]
    for key, o in OPTIONS.items():
        default = "required" if key == "rank" else "unset" if o.default is UNSET else f"`{o.default!r}`"
        choices = f" One of {', '.join(f'`{c!r}`' for c in o.choices())}." if o.choices is not None else ""
        rows.append(f"| `{key}` | {default} | {o.scope} | {'yes' if o.changes_state_meaning else ''} "
                    f"| {o.doc}.{choices} |")
    rules = "; ".join(f"`{name}`: {', '.join(f'`{k}={v!r}`' for k, v in RULES[name].OPTIONS.items())}"
                      for name in sorted(RULES) if RULES[name].OPTIONS)
    return "\n".join(rows) + f"\n\nThe rules' own options (projected groups; their defaults): {rules}.\n"
