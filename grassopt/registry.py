"""Every preset by name, and the one function that builds any of them for a model.

The words, used the same way in code, messages and docs: a **preset** is a name that
``grassopt train --preset`` takes, and :data:`ENTRIES` holds one :class:`Entry` per preset (its family,
description, builder and options). grassopt's own presets (:data:`grassopt.PRESETS`, family ``subspace``)
are :class:`grassopt.SubspaceAdamW` configurations; the others build another optimizer. A **variant** is a
preset with settings (``NAME:key=value``), one row of a ``grassopt bench`` table; a fine-tuning
**method** (``grassopt finetune --method``) is a preset or an adapter (``lora``, ``dora``).

``grassopt train --preset NAME``, ``grassopt finetune --method NAME``, ``grassopt bench`` and
:mod:`grassopt.hf` all build through here, so a name means the same optimizer everywhere:

- grassopt's presets (:data:`grassopt.PRESETS`: ``adamw``, ``galore``, ``subtrack++``, ...):
  :class:`grassopt.SubspaceAdamW` over :func:`grassopt.param_groups` (:func:`grassopt.make_optimizer`);
- ``adamw-torch``: ``torch.optim.AdamW`` (fused where the device has the kernel);
- the reference optimizers (:mod:`grassopt.references`, ``ref-muon``, ...) and the reference
  packages of our own presets (``ref-galore``, ``ref-apollo``);
- ``rso``: randomized subspace optimization (:func:`grassopt.sketch.rso`, which sketches the model);
- ``zo`` and ``mezo``: forward-only steps (:class:`grassopt.zo.ZO`).

:data:`ENTRIES` says what each name is (``family``, ``description``); :func:`build` makes one;
:func:`state_bytes` counts any one's state the same way.

``plain_lr`` and ``plain_weight_decay`` give the plain parameters (those the method does not project
or orthogonalize: embedding, head, norms, biases; everything but the hidden matrices of
:func:`grassopt.targets.hidden_matrices`) their own rate and decay, the same split for every preset
that takes param groups; the presets of :data:`ONE_RATE` refuse them (:func:`check_plain`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import references
from .functional import fused_available
from .optimizer import SUBSPACE_DEFAULTS, SubspaceAdamW
from .presets import PRESETS, default_rank, make_optimizer
from .targets import PlainRates, check_plain_rates, hidden_matrices, plain_rates, resolve_rank

__all__ = ["Entry", "Request", "ENTRIES", "OTHER_ENTRIES", "PRESETS", "build", "state_bytes", "is_forward_only", "FORWARD_ONLY",
           "ONE_RATE", "check_plain"]


@dataclass(frozen=True)
class Entry:
    """One optimizer name: its family (``subspace``, ``torch``, ``reference``, ``rso``, ``zo``), what it is, how it
    is built (``build(request) -> torch.optim.Optimizer``, a :class:`Request`) and the options it takes
    (``options``; None: its builder checks them itself, e.g. a preset's rule or a reference's settings;
    ``hint``: what else to say when one is refused)."""

    family: str
    description: str
    build: Callable[[Request], torch.optim.Optimizer] | None = field(default=None, compare=False, repr=False)
    options: frozenset[str] | None = None
    hint: str = ""

    @property
    def forward_only(self) -> bool:
        return self.family == "zo"


@dataclass
class Request:
    """What :func:`build` was asked for (its arguments, ``options`` a copy, ``targets`` a list)."""

    name: str
    model: nn.Module
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    rank: int | str | None
    update_interval: int | None
    targets: list[str]
    options: dict[str, Any]
    seed: int
    state_dtype: str
    stochastic_rounding: bool
    sketch: str | None
    sketch_rank: float | int
    eps: float | None
    plain_lr: float | None
    plain_weight_decay: float | None
    plain_state_dtype: str | None = None
    sharded: bool = False
    compile: bool = False

    @property
    def split(self) -> dict[str, Any]:
        return {"plain_lr": self.plain_lr, "plain_weight_decay": self.plain_weight_decay}

    def plain(self) -> PlainRates | None:
        return plain_rates(self.model, self.targets, self.lr, self.weight_decay, self.plain_lr,
                           self.plain_weight_decay)


# ---------------------------------------------------------------------------------------- the builders
def _build_preset(r: Request) -> torch.optim.Optimizer:
    cls: Callable[..., SubspaceAdamW] = SubspaceAdamW
    if r.sharded:  # each projected matrix stepped by one owner rank (the replicated step's numbers, bit for bit)
        from .distributed import FSDPSubspaceAdamW
        cls = functools.partial(FSDPSubspaceAdamW, owners=True)
    return make_optimizer(r.model, r.name, lr=r.lr, rank=r.rank, update_interval=r.update_interval, targets=r.targets,
                          cls=cls, weight_decay=r.weight_decay, betas=r.betas, eps=1e-6 if r.eps is None else r.eps,
                          seed=r.seed, state_dtype=r.state_dtype, stochastic_rounding=r.stochastic_rounding,
                          plain_state_dtype=r.plain_state_dtype, compile=r.compile, **r.split,
                          **(r.options if PRESETS[r.name] is not None else {}))


def _build_adamw_torch(r: Request) -> torch.optim.Optimizer:
    """torch's fused kernel wherever the device has one: its fastest AdamW."""
    groups = _decay_groups(r.model, r.weight_decay, r.plain())
    fused = fused_available([p for g in groups for p in g["params"]]) or None
    eps: dict[str, Any] = {} if r.eps is None else {"eps": r.eps}
    return torch.optim.AdamW(groups, lr=r.lr, betas=r.betas, fused=fused, **eps)


def _build_rso(r: Request) -> torch.optim.Optimizer:
    from . import sketch as gs
    from .targets import sketch_rank_spec
    opts = r.options
    inner_steps = int(opts.get("inner_steps", r.update_interval or SUBSPACE_DEFAULTS["update_interval"]))
    return gs.rso(r.model, sketch_rank_spec(r.sketch_rank), inner_steps=inner_steps,
                  lr=r.lr, weight_decay=r.weight_decay, mu=float(opts.get("mu", 0.0)),
                  law=r.sketch or "haar", seed=r.seed, targets=r.targets, betas=r.betas,
                  eps=float(opts.get("eps", 1e-6 if r.eps is None else r.eps)), inner=opts.get("inner", "adam"),
                  **r.split)


def _build_zo(r: Request) -> torch.optim.Optimizer:
    from .zo import ZO
    if isinstance(r.rank, str):
        raise ValueError(f"preset {r.name!r} takes an integer rank, got rank={r.rank!r}")
    return ZO(r.model, rank=8 if r.rank is None else r.rank, lr=r.lr, weight_decay=r.weight_decay,
              targets=r.targets, dense=r.name == "mezo", seed=r.seed, **r.options)


def _build_reference(r: Request) -> torch.optim.Optimizer:
    return references.build(r.name, r.model, lr=r.lr, weight_decay=r.weight_decay, betas=r.betas,
                            settings=r.options, plain=r.plain())


def _build_ref_galore(r: Request) -> torch.optim.Optimizer:
    plain = r.plain()
    references.require(r.name)  # one line if the package is missing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdamW
        groups = _reference_groups(r.model, r.rank, r.update_interval, r.targets, "galore",
                                   {"scale": r.options.get("alpha", 0.25)}, plain)
        return GaLoreAdamW(groups, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay, no_deprecation_warning=True)


def _build_ref_apollo(r: Request) -> torch.optim.Optimizer:
    plain = r.plain()
    references.require(r.name)  # one line if the package is missing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from apollo_torch import APOLLOAdamW
        extra = {"scale": r.options.get("scale", 1.0), "proj": "random",
                 "scale_type": r.options.get("scale_type", "channel")}
        return APOLLOAdamW(_reference_groups(r.model, r.rank, r.update_interval, r.targets, "apollo", extra, plain),
                           lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)


def _by_rank(model: nn.Module, rank: int | str | None, targets: Iterable[str], ours: str
             ) -> tuple[dict[int, list[nn.Parameter]], list[nn.Parameter]]:
    """({rank: the hidden matrices at that rank, ranks ascending}, every other trainable parameter), each in
    ``model.parameters()`` order: the targets and ranks of :func:`grassopt.param_groups` (``rank``, else the
    default rank of our preset ``ours``); a matrix whose short side is not larger than its rank is left with
    the others (as grassopt leaves it unprojected)."""
    spec = default_rank(ours) if rank is None else rank
    rank_of = {}
    for _, w in hidden_matrices(model, targets):
        k = resolve_rank(spec, w.shape)
        if k < min(w.shape):
            rank_of[id(w)] = k
    params = [p for p in model.parameters() if p.requires_grad]
    by_rank = {k: [p for p in params if rank_of.get(id(p)) == k] for k in sorted(set(rank_of.values()))}
    return by_rank, [p for p in params if id(p) not in rank_of]


def _build_ref_alice(r: Request) -> torch.optim.Optimizer:
    """Alice (pytorch-optimizer) on the hidden matrices, at grassopt's ranks and update interval, and
    ``torch.optim.AdamW`` on everything else (at ``plain_lr``), as one optimizer."""
    references.require(r.name)
    from pytorch_optimizer import Alice
    by_rank, rest = _by_rank(r.model, r.rank, r.targets, "galore")
    opts = {"alpha": 0.3, "alpha_c": 0.4, "gamma": 1.01, "leading_basis": 40, **r.options}
    interval = r.update_interval or SUBSPACE_DEFAULTS["update_interval"]
    groups = [{"params": ws, "rank": k, "update_interval": interval, **opts,
               "leading_basis": min(int(opts["leading_basis"]), k)} for k, ws in sorted(by_rank.items())]
    if not groups:
        raise ValueError(f"{r.name} found no hidden matrix larger than its rank ({r.rank!r})")
    alice = Alice(groups, lr=r.lr, weight_decay=r.weight_decay)
    return references.HiddenAndAdamW(alice, references._rest_adamw(rest, r.lr, r.weight_decay, r.betas, 1e-8,
                                                                   r.plain()))


def _build_ref_galore_adafactor(r: Request) -> torch.optim.Optimizer:
    """galore-torch's GaLoreAdafactor (GaLore's projection around Adafactor's factored statistics, no first
    moment, relative steps off so that ``lr`` is the rate) on the hidden matrices, at grassopt's ranks and
    update interval, and ``torch.optim.AdamW`` on everything else (at ``plain_lr``), as one optimizer."""
    references.require(r.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdafactor
    by_rank, rest = _by_rank(r.model, r.rank, r.targets, "galore")
    interval = r.update_interval or SUBSPACE_DEFAULTS["update_interval"]
    groups = [{"params": ws, "rank": k, "update_proj_gap": interval, "scale": r.options.get("alpha", 0.25),
               "proj_type": "std"} for k, ws in sorted(by_rank.items())]
    if not groups:
        raise ValueError(f"{r.name} found no hidden matrix larger than its rank ({r.rank!r})")
    adafactor = GaLoreAdafactor(groups, lr=r.lr, weight_decay=r.weight_decay, relative_step=False,
                                scale_parameter=False, warmup_init=False)
    return references.HiddenAndAdamW(adafactor, references._rest_adamw(rest, r.lr, r.weight_decay, r.betas, 1e-8,
                                                                       r.plain()))


RSO_OPTIONS = {"inner_steps", "mu", "inner", "eps"}
ZO_OPTIONS = {"eps", "momentum", "law", "lazy", "others", "clip", "nonfinite"}

#: The names beside grassopt's presets, with one line each (``grassopt train --help`` lists them).
OTHER_ENTRIES: dict[str, Entry] = {
    "adamw-torch": Entry("torch", "torch.optim.AdamW (full rank, PyTorch's own implementation; fused=True where the "
                                 "device has the fused kernel)", _build_adamw_torch),
    "ref-galore": Entry("reference", "GaLoreAdamW from the reference package galore-torch (optional: pip install "
                                    "grassopt[bench])", _build_ref_galore, frozenset({"alpha"}),
                       " (alpha: GaLore's scale of the update, 0.25 by default)"),
    "ref-apollo": Entry("reference", "APOLLOAdamW from the reference package apollo-torch (optional: pip install "
                                    "grassopt[bench])", _build_ref_apollo, frozenset({"scale", "scale_type"}),
                       " (scale: APOLLO's scale of the update, 1.0 by default; scale_type: channel or tensor)"),
    "ref-alice": Entry("reference", "Alice from pytorch-optimizer (low-rank Adam-like statistics in a tracked "
                                   "subspace with full-rank compensation) on the hidden matrices at the rank and update "
                                   "interval + torch.optim.AdamW on the rest", _build_ref_alice,
                        frozenset({"alpha", "alpha_c", "gamma", "leading_basis"}),
                        " (alpha, alpha_c, gamma, leading_basis: Alice's own, the package's defaults)"),
    "ref-galore-adafactor": Entry("reference", "GaLoreAdafactor from galore-torch (Adafactor inside GaLore's "
                                              "subspace) on the hidden matrices + torch.optim.AdamW on the rest",
                                  _build_ref_galore_adafactor, frozenset({"alpha"}),
                                  " (alpha: GaLore's scale of the update, 0.25 by default)"),
    "zo": Entry("zo", "forward-only training: zeroth-order low-rank (U V^T, Haar V) gradient estimates (grassopt.zo)",
               _build_zo, frozenset(ZO_OPTIONS)),
    "mezo": Entry("zo", "forward-only training with dense Gaussian perturbations (MeZO), the baseline of zo",
                 _build_zo, frozenset(ZO_OPTIONS)),
    "rso": Entry("rso", "randomized subspace optimization (grassopt.sketch.rso): the covered layers train a low-rank "
                       "B in a random subspace P (resampled every --update-interval steps) and store only x P for "
                       "backward", _build_rso, frozenset(RSO_OPTIONS),
                " (the rank is sketch_rank, the law is sketch, the outer iteration is update_interval)"),
    # the reference optimizers people pick today (grassopt.references; optional: pip install grassopt[bench]);
    # their settings are checked by grassopt.references
    **{name: Entry("reference", ref.description, _build_reference) for name, ref in references.REFERENCES.items()},
}
#: Every name: the presets first, then the others.
ENTRIES: dict[str, Entry] = {**{name: Entry("subspace", f"grassopt preset {name!r}: SubspaceAdamW with "
                                                  f"{PRESETS[name] or 'no projection (plain AdamW)'}", _build_preset)
                             for name in PRESETS}, **OTHER_ENTRIES}
FORWARD_ONLY = tuple(name for name, entry in ENTRIES.items() if entry.forward_only)

#: The presets that take one learning rate (``plain_lr`` / ``plain_weight_decay`` refused), and why.
ONE_RATE = {name: "its forward-only step moves every parameter it covers along one estimate, at lr (grassopt.zo)"
            for name in FORWARD_ONLY}


def is_forward_only(name: str) -> bool:
    """True for the presets that step without a backward pass (``zo``, ``mezo``)."""
    return name in FORWARD_ONLY


def _check_options(name: str, options: dict[str, Any], known: set[str], hint: str = "") -> None:
    bad = set(options) - known
    if bad:
        raise ValueError(f"unknown option(s) {sorted(bad)} for preset {name!r}; it takes {sorted(known)}{hint}")


def check_plain(name: str, plain_lr: float | None = None, plain_weight_decay: float | None = None) -> None:
    """Refuse (one line) a bad ``plain_lr`` / ``plain_weight_decay``, or either one for a preset of :data:`ONE_RATE`."""
    check_plain_rates(plain_lr, plain_weight_decay)
    given = [k for k, v in (("plain_lr", plain_lr), ("plain_weight_decay", plain_weight_decay)) if v is not None]
    if given and name in ONE_RATE:
        raise ValueError(f"{name} takes one rate: {ONE_RATE[name]}; leave {' and '.join(given)} unset")


def _decay_groups(model: nn.Module, weight_decay: float, plain: PlainRates | None = None) -> list[dict[str, Any]]:
    if plain is not None:  # hidden matrices at lr, the plain rest at plain.lr (as the references split)
        return references._decay_groups(model.parameters(), weight_decay, plain)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _reference_groups(model: nn.Module, rank: int | str | None, update_interval: int | None,
                      targets: Iterable[str], ours: str, extra: dict[str, Any],
                      plain: PlainRates | None = None) -> list[dict[str, Any]]:
    """Projected/plain groups for the reference packages: the same targets and ranks (``rank``,
    else the default rank of our preset ``ours``) as :func:`grassopt.param_groups`. With ``plain``,
    the projected groups come first, then the unprojected hidden matrices (at lr), then the plain
    parameters at ``plain.lr`` and ``plain.weight_decay``."""
    by_rank, rest = _by_rank(model, rank, targets, ours)
    projected = [{"params": ws, "rank": r, "update_proj_gap": update_interval or SUBSPACE_DEFAULTS["update_interval"],
                  "proj_type": "std", **extra} for r, ws in by_rank.items()]
    if plain is None:
        return [{"params": rest}, *projected]
    kept = {"params": [p for p in rest if id(p) in plain.hidden]}
    others = {"params": [p for p in rest if id(p) not in plain.hidden], "lr": plain.lr,
              "weight_decay": plain.weight_decay}
    return [g for g in (*projected, kept, others) if g["params"]]


def build(name: str, model: nn.Module, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 0.0, rank: int | str | None = None, update_interval: int | None = None,
          targets: str | Iterable[str] = "all-linear", options: dict[str, Any] | None = None, seed: int = 0,
          state_dtype: str = "float32", stochastic_rounding: bool = False, sketch: str | None = None,
          sketch_rank: float | int = 0.125, eps: float | None = None, plain_lr: float | None = None,
          plain_weight_decay: float | None = None, plain_state_dtype: str | None = None,
          sharded: bool = False, compile: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a key of :data:`ENTRIES`) over ``model``'s trainable parameters.

    ``sharded``: ``model`` is sharded with FSDP2 (``fully_shard``); the presets are then built as
    :class:`grassopt.distributed.FSDPSubspaceAdamW` with ``owners=True`` (``adamw-torch`` steps DTensors as it
    is; the other kinds are refused).

    ``rank``, ``update_interval`` and ``targets`` are those of :func:`grassopt.param_groups` (``zo``:
    the rank of its perturbations, 8 by default); ``options`` are the preset's own settings (subspace
    options of a preset, a reference's knobs, RSO's ``inner_steps``/``mu``/``inner``/``eps``, ZO's
    ``eps``/``momentum``/``law``/``lazy``/``others``). ``state_dtype`` and ``stochastic_rounding``
    apply to the presets. ``rso`` sketches ``model`` in place (rank ``sketch_rank``, law
    ``sketch`` or ``haar``); call it before wrapping the model in DDP. ``eps`` (Adam's, added to
    ``sqrt(V)`` or ``sqrt(V_hat)`` as each preset does) applies to the presets, ``adamw-torch`` and ``rso``;
    None keeps each one's default (1e-6 for grassopt's, torch's 1e-8 for ``adamw-torch``).

    ``plain_lr`` and ``plain_weight_decay`` (None: the same as ``lr`` / ``weight_decay``) are the rate and
    decay of the parameters that are not hidden matrices (:func:`grassopt.targets.hidden_matrices` of
    ``targets``: embedding, head, norms, biases), for every preset but the forward-only ones (:data:`ONE_RATE`).
    ``rso``'s sketched layers (its ``B``) keep ``lr``; ``ref-muon``'s AdamW part gets ``plain_lr``.
    ``plain_state_dtype`` (grassopt's presets only) is the moment format of those parameters (None: ``state_dtype``).
    ``compile`` (grassopt's presets only): ``SubspaceAdamW(compile=True)``, the compiled step.
    """
    if name not in ENTRIES:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(ENTRIES)}")
    check_plain(name, plain_lr, plain_weight_decay)  # before anything is built (rso sketches the model)
    entry = ENTRIES[name]
    r = Request(name, model, lr, betas, weight_decay, rank, update_interval,
                [targets] if isinstance(targets, str) else list(targets), dict(options or {}), seed, state_dtype,
                stochastic_rounding, sketch, sketch_rank, eps, plain_lr, plain_weight_decay, plain_state_dtype,
                sharded, compile)
    if sharded and entry.family not in ("subspace", "torch"):
        raise ValueError(f"{name!r} does not run on a model sharded with FSDP2; use one of grassopt's presets or "
                         "adamw-torch, or data parallel (DDP) without --fsdp")
    _check_eps_and_options(entry, r)
    assert entry.build is not None, name
    return entry.build(r)


def _check_eps_and_options(entry: Entry, r: Request) -> None:
    """Refuse (one line) ``eps`` where it does not apply and any option the preset does not take; ``--opt eps=...``
    of a preset or ``adamw-torch`` becomes ``r.eps``."""
    name, opts = r.name, r.options
    if r.eps is not None and entry.family not in ("subspace", "torch", "rso"):
        raise ValueError(f"eps applies to grassopt's presets, adamw-torch and rso, not to {name!r} "
                         "(set a reference's own settings through options)")
    if r.plain_state_dtype is not None and entry.family != "subspace":
        raise ValueError(f"plain_state_dtype applies to grassopt's presets, not to {name!r}; leave it unset")
    if r.compile and entry.family != "subspace":
        raise ValueError(f"compile=True applies to grassopt's presets (SubspaceAdamW), not to {name!r}; leave it off")
    if "eps" in opts and entry.family in ("subspace", "torch"):  # --opt eps=...: the same setting as eps
        if r.eps is not None and opts["eps"] != r.eps:
            raise ValueError(f"eps is given twice ({r.eps!r} and the option eps={opts['eps']!r}); give it once")
        r.eps = opts.pop("eps")
    if "betas" in opts and entry.family == "subspace":  # a bench variant's betas=(...): every group's betas
        r.betas = tuple(opts.pop("betas"))
    if opts and (entry.family == "torch" or (entry.family == "subspace" and PRESETS[name] is None)):
        raise ValueError(f"preset {name!r} projects nothing (plain AdamW) and takes no options but eps; got "
                         f"{sorted(opts)} (leave them out, or choose a projected preset)")
    if entry.options is not None:
        _check_options(name, opts, set(entry.options), entry.hint)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors, as allocated (:func:`grassopt.references.tensor_bytes`):
    nested lists and dicts (SOAP's preconditioners), each storage once and whole (bitsandbytes'
    shared quantization maps; galore-torch's bases, slices of a full SVD factor), tensor subclasses
    by their inner tensors (torchao's 8-bit codes, scales and maps), and the reference packages'
    projector bases (galore-torch, apollo-torch). One counter for every entry."""
    seen: set = set()
    total = references.tensor_bytes(list(opt.state.values()), seen)
    for st in opt.state.values():
        proj = st.get("projector") if isinstance(st, dict) else None
        mat = getattr(proj, "ortho_matrix", None)
        if torch.is_tensor(mat):
            total += references.tensor_bytes(mat, seen)
    return total
