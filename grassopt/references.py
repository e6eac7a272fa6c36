"""Reference optimizers: what people pick today, each built as its authors recommend.

``grassopt train --preset ref-muon`` (and ``grassopt bench --presets ref-muon ...``) trains with one
of these on the same harness as grassopt's presets: the same model, data order, LR schedule (warmup
then cosine, applied to every param group), gradient clipping, checkpoints and state-byte counter.

``REFERENCES`` is the registry: name -> :class:`Reference` ``(description, build, packages,
betas)``, where ``build(model, lr, weight_decay, betas, settings, plain=None) -> torch.optim.Optimizer``.
:func:`build` resolves the betas and checks the packages first. ``settings`` are the
reference's own knobs (``--opt key=value`` on the command line; an unknown key is an error that
lists the known ones); ``settings["betas"]`` overrides the betas for any reference.

The harness passes ``lr`` and ``weight_decay`` through to every reference, so a sweep tunes each
one's learning rate the same way. Weight decay goes on matrices and embeddings, not on norms (1-D
parameters), as for ``adamw-torch``; Adam-mini decides this itself (no decay on names with "norm").
Each optional package's absence is one line, :class:`MissingPackageError`, naming the pip extra.

``plain`` (a :class:`grassopt.targets.PlainRates`, from ``plain_lr`` / ``plain_weight_decay``) gives
the plain parameters (everything but the hidden matrices that grassopt's presets would project:
embedding, head, norms, biases) their own rate and decay, in param groups of their own (Adam-mini,
which makes one group per parameter itself: those groups' ``lr`` and ``weight_decay`` are set after
construction). ``ref-muon``'s Muon part is the hidden matrices, so its AdamW part gets the plain rate;
so does ``ref-adafactor:rest=adamw``'s.

Hidden matrices + AdamW. For a comparison in which every method trains the embedding, head, norms and
biases the same way (AdamW) and differs only on the hidden matrices (every trainable 2-D parameter but
the embedding tables and the head: attention and MLP weights), :class:`HiddenAndAdamW` holds any torch
optimizer on the hidden matrices and ``torch.optim.AdamW`` on the rest, as one optimizer (one LR
schedule, one state dict): ``ref-muon`` (:class:`MuonAdamW`) always, ``ref-adafactor`` with
``rest=adamw`` (:class:`AdafactorAdamW`). The AdamW part takes the harness's (or ``settings["betas"]``)
betas and ``adamw_eps`` (torch's 1e-8 by default; ``adamw_eps=1e-6`` is grassopt's own AdamW's eps).

Learning rates and settings, with their source:

- ``ref-muon``: ``torch.optim.Muon`` (momentum 0.95, Nesterov, 5 Newton-Schulz steps: Keller
  Jordan's defaults, torch's too) on the hidden matrices (attention and MLP weights);
  ``torch.optim.AdamW`` on embeddings, head and norms. ``adjust_lr_fn="match_rms_adamw"`` (Moonshot,
  "Muon is Scalable for LLM Training", arXiv 2502.16982; torch's Muon docs) scales each matrix's
  step to ``lr * 0.2 * sqrt(max(A, B))``, which gives Muon's update the RMS of AdamW's so that
  both share one learning rate and one weight decay: the AdamW rate. ``adamw_eps`` (or its older
  name ``eps``) is the AdamW part's eps.
- ``ref-adafactor``: ``torch.optim.Adafactor`` with torch's defaults, which are the paper's
  (Shazeer & Stern 2018): relative steps ``min(lr, 1/sqrt(t)) * max(1e-3, RMS(param))``,
  ``beta2_t = 1 - t^-0.8``, update clipping d = 1, no first moment. ``lr`` caps the relative step
  (the paper's constant is 1e-2, torch's default lr). ``rest`` says what trains the parameters that
  are not hidden matrices: ``"adafactor"`` (the default: Adafactor on every parameter) or ``"adamw"``
  (Adafactor on the hidden matrices, the same ones ``ref-muon`` gives Muon, and ``torch.optim.AdamW``
  on the rest, with ``adamw_eps``). Since ``lr`` is Adafactor's relative-step cap, give the AdamW part
  its own rate with ``plain_lr`` (and ``plain_weight_decay``).
- ``ref-adam-mini``: the authors' ``adam-mini`` with dim, n_heads and n_kv_heads of our
  ``Llama``; "the same values as those used for AdamW" for lr, betas, eps and weight decay (its
  README). Its README also recommends ``optimizer.wv_names = {}`` (one lr for the whole value
  matrix) for runs under 10-20k steps, which every run here is: ``--opt single_value_lr=False``
  restores one lr per neuron of V.
- ``ref-adamw8bit``: ``bitsandbytes.optim.AdamW8bit`` (block-wise 8-bit moments, blocks of 256;
  tensors under 4096 elements keep 32-bit state), with the embeddings at 32-bit state, as
  transformers' ``Trainer`` does for ``adamw_bnb_8bit`` following bitsandbytes' advice for
  embeddings (``--opt embedding_bits=8`` to quantize them too).
- ``ref-torchao-adamw8bit``: ``torchao.optim.AdamW8bit`` with its defaults (block size 256, tensors
  under 4096 elements or not divisible by the block size kept in full precision). Its step is
  ``torch.compile``-d per parameter shape: the first step of a run includes that compilation
  (about a minute on a CPU for the nano model; cached on disk for later runs).
- ``ref-soap``: SOAP (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam",
  arXiv 2409.11321) from ``pytorch-optimizer``, with the official README's settings: betas
  (0.95, 0.95), precondition_frequency 10, max_precondition_dim 10000, no 1-D preconditioning
  (lr 3e-3 and weight decay 0.01 there; the harness passes its own). The vocabulary side of the
  embedding and head is not preconditioned, as in the paper's runs, whose vocabularies (50k) exceed
  max_precondition_dim; ``--opt precondition_vocab=True`` preconditions it too.
- ``ref-scale``: SCALE (Glentis, Li, Han, Hong, "A Minimalist Optimizer Design for LLM Pretraining",
  arXiv 2506.16659), written here from the paper (no package has it): SGD whose update of each matrix
  is its gradient divided by the RMS of each of its rows (``W`` is ``out x in``: the norm runs over the
  input side; an embedding table's over the vocabulary side), with first-order momentum (0.9) only on
  the output head; 1-D parameters train with AdamW at ``plain_lr``, as in the authors' code. The RMS
  (not the norm) and the sides are read from the authors' public code. ``rest=scale`` (the default) is
  the paper's method: the embedding and the head are SCALE's too, so the state is the head's momentum
  and the norms' moments; ``rest=adamw`` gives SCALE the hidden matrices only and AdamW everything else
  (the contest's treatment). Either way ``plain_lr`` is the rate of everything but the hidden matrices.
- ``ref-normuon``: NorMuon (Li et al., arXiv 2510.05491) from ``pytorch-optimizer`` on the hidden matrices
  (momentum 0.95, row-wise second moment 0.95, ``update_scale="match_rms"``: the RMS of its update is 0.2,
  as Muon's ``match_rms_adamw``, so it shares AdamW's rate) + ``torch.optim.AdamW`` on the rest.
- ``ref-racs``: RACS (row and column scaled SGD; Gong et al., "Towards Efficient Optimizer Design for LLM via
  Structured Fisher Approximation with a Low-Rank Extension", arXiv 2502.07752) from ``pytorch-optimizer``
  with its defaults (beta 0.9, alpha 0.05, norm-growth limit 1.01) on the hidden matrices: ``m + n + 1``
  numbers of state per matrix; ``torch.optim.AdamW`` on the rest, as in the paper.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import math
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn

from .targets import PlainRates

__all__ = ["REFERENCES", "Reference", "MissingPackageError", "HiddenAndAdamW", "MuonAdamW",
           "AdafactorAdamW", "SCALE", "build", "require", "available",
           "reference_versions", "prepare_resume", "tensor_bytes", "EXTRA"]

#: The pip extra that installs every reference package.
EXTRA = "grassopt[bench]"


class MissingPackageError(ImportError):
    """A reference needs an optional package that is not installed (one line: the package and the extra)."""


class Reference(NamedTuple):
    """One reference optimizer: ``build(model, lr, weight_decay, betas, settings)`` and what it needs."""

    description: str
    build: Callable[..., torch.optim.Optimizer]
    #: (PyPI distribution, import name, minimum version or None) of each package it needs
    packages: tuple[tuple[str, str, str | None], ...] = ()
    #: the betas its authors recommend (None: the harness's, as for AdamW)
    betas: tuple[float, float] | None = None


# ---------------------------------------------------------------------------------------- helpers
def _settings(name: str, given: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for {name}; it takes {sorted(defaults)} (and betas)")
    return {**defaults, **given}


def _decay_groups(params: Iterable[nn.Parameter], weight_decay: float, plain: PlainRates | None = None,
                  **extra: Any) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings, none on 1-D parameters (norms), as adamw-torch. With
    ``plain``: the hidden matrices first (``weight_decay``), then the plain parameters at ``plain.lr``
    (matrices with ``plain.weight_decay``, 1-D parameters with none)."""
    params = [p for p in params if p.requires_grad]
    if plain is None:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, **extra},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **extra}]
    else:
        rest = [p for p in params if id(p) not in plain.hidden]
        groups = [{"params": [p for p in params if id(p) in plain.hidden], "weight_decay": weight_decay, **extra},
                  {"params": [p for p in rest if p.dim() >= 2], "weight_decay": plain.weight_decay,
                   "lr": plain.lr, **extra},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr": plain.lr, **extra}]
    return [g for g in groups if g["params"]]


def _vocab_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The embedding tables and the output head (``lm_head``), each once."""
    out: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            out[id(m.weight)] = m.weight
    head_weight = getattr(getattr(model, "lm_head", None), "weight", None)
    if isinstance(head_weight, nn.Parameter):
        out[id(head_weight)] = head_weight
    return [p for p in out.values() if p.requires_grad]


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Silence import-time chatter (torchao's notes on CUDA kernels it cannot load on this machine)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _import(module: str):
    with _quiet("torchao", "torch.utils._pytree", "bitsandbytes"):
        return importlib.import_module(module)


# ---------------------------------------------------------------------------------------- hidden + AdamW
class HiddenAndAdamW(torch.optim.Optimizer):
    """One optimizer (``hidden_optimizer``: Muon, Adafactor, any ``torch.optim.Optimizer``) on the hidden
    matrices and ``torch.optim.AdamW`` (``adamw``, or None when there is nothing else) on everything
    else, as one optimizer: ``param_groups`` are the two optimizers' own group dicts (the hidden
    optimizer's first), so an LR scheduler drives both; ``state`` is their states merged (read it, do
    not write it); ``state_dict()`` is the ordinary format over all groups, and ``load_state_dict``
    hands each optimizer its part (a state dict with another number of groups, or of parameters in a
    group, is refused in one line)."""

    def __init__(self, hidden_optimizer: torch.optim.Optimizer, adamw: torch.optim.Optimizer | None) -> None:
        self.hidden_optimizer = hidden_optimizer
        self.adamw = adamw
        self.optimizers: list[torch.optim.Optimizer] = [hidden_optimizer] + ([adamw] if adamw is not None else [])
        self._ready = False
        super().__init__([g for o in self.optimizers for g in o.param_groups], {})
        self._ready = True
        self._relink()

    def _relink(self) -> None:
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @property  # type: ignore[override]
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        merged: dict[torch.Tensor, Any] = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:  # Optimizer.__init__ assigns an empty dict; the state lives below
        if value:
            raise AttributeError(f"{type(self).__name__}.state is the merged state of its two optimizers; it "
                                 "cannot be set")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._ready:
            raise NotImplementedError(f"add a group to one of {type(self).__name__}.optimizers, then rebuild")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups, state = state_dict["param_groups"], state_dict["state"]
        name = type(self).__name__
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, {name} has "
                             f"{len(self.param_groups)}")
        start = offset = 0
        for o in self.optimizers:
            mine = groups[start:start + len(o.param_groups)]
            for k, (g, own) in enumerate(zip(mine, o.param_groups)):
                if len(g["params"]) != len(own["params"]):
                    raise ValueError(f"loaded state dict's parameter group {start + k} has {len(g['params'])} "
                                     f"parameters, {name}'s has {len(own['params'])}")
            n = sum(len(g["params"]) for g in mine)
            ids = [i for g in mine for i in g["params"]]
            o.load_state_dict({
                "state": {i - offset: state[i] for i in ids if i in state},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            start += len(o.param_groups)
            offset += n
        self._relink()  # load_state_dict gives each optimizer new group dicts


def _rest_adamw(params: list[nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float],
                eps: float, plain: PlainRates | None) -> torch.optim.AdamW | None:
    """``torch.optim.AdamW`` on the parameters that are not hidden matrices (embedding, head, norms,
    biases): decay on matrices, none on 1-D parameters, at ``plain``'s rate when given. None if none."""
    if not params:
        return None
    return torch.optim.AdamW(_decay_groups(params, weight_decay, plain), lr=lr, betas=betas, eps=eps)


class MuonAdamW(HiddenAndAdamW):
    """``torch.optim.Muon`` (``muon``) on the hidden matrices and ``torch.optim.AdamW`` (``adamw``) on
    everything else (:class:`HiddenAndAdamW`). ``eps`` is AdamW's."""

    def __init__(self, muon_params: list[nn.Parameter], adamw_params: list[nn.Parameter], *, lr: float,
                 weight_decay: float, betas: tuple[float, float], momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, adjust_lr_fn: str | None = "match_rms_adamw", eps: float = 1e-8,
                 plain: PlainRates | None = None) -> None:
        if not muon_params:
            raise ValueError("ref-muon found no hidden 2-D matrices to give Muon")
        muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(muon, _rest_adamw(adamw_params, lr, weight_decay, betas, eps, plain))

    @property
    def muon(self) -> torch.optim.Optimizer:
        return self.hidden_optimizer


class AdafactorAdamW(HiddenAndAdamW):
    """``torch.optim.Adafactor`` (``adafactor``) on the hidden matrices and ``torch.optim.AdamW``
    (``adamw``) on everything else (:class:`HiddenAndAdamW`): ``ref-adafactor:rest=adamw``."""

    def __init__(self, adafactor_params: list[nn.Parameter], adamw_params: list[nn.Parameter], *, lr: float,
                 weight_decay: float, betas: tuple[float, float], beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, adamw_eps: float = 1e-8,
                 plain: PlainRates | None = None) -> None:
        if not adafactor_params:
            raise ValueError("ref-adafactor:rest=adamw found no hidden 2-D matrices to give Adafactor")
        adafactor = torch.optim.Adafactor(adafactor_params, lr=lr, weight_decay=weight_decay,
                                          beta2_decay=beta2_decay, eps=tuple(eps), d=d)  # type: ignore[arg-type]  # (a pair)
        super().__init__(adafactor, _rest_adamw(adamw_params, lr, weight_decay, betas, adamw_eps, plain))

    @property
    def adafactor(self) -> torch.optim.Optimizer:
        return self.hidden_optimizer


def _hidden_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the hidden matrices: every trainable 2-D parameter but the embedding tables and the head; the rest)."""
    vocab = {id(p) for p in _vocab_matrices(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if p.dim() == 2 and id(p) not in vocab]
    return hidden, [p for p in params if not (p.dim() == 2 and id(p) not in vocab)]


def _adamw_eps(name: str, s: dict[str, Any], given: dict[str, Any]) -> float:
    """The AdamW part's eps: ``adamw_eps`` (ref-muon also reads its older name ``eps``), checked."""
    if name == "ref-muon" and "eps" in given:
        if "adamw_eps" in given and given["adamw_eps"] != given["eps"]:
            raise ValueError(f"ref-muon: eps={given['eps']!r} and adamw_eps={given['adamw_eps']!r} are the same "
                             "setting (AdamW's eps); give it once")
        s["adamw_eps"] = given["eps"]
    v = s["adamw_eps"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: adamw_eps={v!r} must be a number >= 0 and finite (the eps of the AdamW part), "
                         "e.g. 1e-6 for grassopt's AdamW")
    return float(v)


def _muon(model, lr, weight_decay, betas, settings, plain=None):
    s = _settings("ref-muon", settings, momentum=0.95, nesterov=True, ns_steps=5,
                  adjust_lr_fn="match_rms_adamw", adamw_eps=1e-8, eps=1e-8)
    eps = _adamw_eps("ref-muon", s, settings)
    del s["adamw_eps"], s["eps"]
    hidden, other = _hidden_matrices(model)
    return MuonAdamW(hidden, other, lr=lr, weight_decay=weight_decay, betas=betas, plain=plain, eps=eps, **s)


# ---------------------------------------------------------------------------------------- the others
#: ``ref-adafactor``'s ``rest``: what trains the parameters that are not hidden matrices
ADAFACTOR_REST = ("adafactor", "adamw")


def _adafactor(model, lr, weight_decay, betas, settings, plain=None):
    s = _settings("ref-adafactor", settings, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, rest="adafactor",
                  adamw_eps=1e-8)
    if s["rest"] not in ADAFACTOR_REST:
        raise ValueError(f"ref-adafactor: rest={s['rest']!r} is not one of {list(ADAFACTOR_REST)} (what trains "
                         "the embedding, head, norms and biases: Adafactor, or AdamW as every other method)")
    if s["rest"] == "adamw":
        hidden, other = _hidden_matrices(model)
        return AdafactorAdamW(hidden, other, lr=lr, weight_decay=weight_decay, betas=betas,
                              beta2_decay=s["beta2_decay"], eps=s["eps"], d=s["d"],
                              adamw_eps=_adamw_eps("ref-adafactor", s, settings), plain=plain)
    if "adamw_eps" in settings:
        raise ValueError("ref-adafactor: adamw_eps is the eps of the AdamW part, which only rest=adamw has "
                         "(Adafactor's own is eps)")
    return torch.optim.Adafactor(_decay_groups(model.parameters(), weight_decay, plain), lr=lr,
                                 beta2_decay=s["beta2_decay"], eps=tuple(s["eps"]), d=s["d"])


def _adam_mini(model, lr, weight_decay, betas, settings, plain=None):
    s = _settings("ref-adam-mini", settings, eps=1e-8, single_value_lr=True)
    c = getattr(model, "config", None)
    if not all(hasattr(c, k) for k in ("hidden_size", "num_heads")):
        raise ValueError("ref-adam-mini partitions a transformer by its shape: the model needs a config with "
                         "hidden_size and num_heads (grassopt's Llama has them)")
    Adam_mini = _import("adam_mini").Adam_mini
    opt = Adam_mini(model.named_parameters(), lr=lr, betas=betas, eps=s["eps"], weight_decay=weight_decay,
                    dim=c.hidden_size, n_heads=c.num_heads, n_kv_heads=getattr(c, "kv_heads", c.num_heads),
                    verbose=False)
    if s["single_value_lr"]:
        opt.wv_names = set()
    if plain is not None:  # Adam-mini's groups are one per parameter, each read with its own lr at every step
        for g in opt.param_groups:
            if id(g["params"][0]) not in plain.hidden:
                g["lr"] = plain.lr
                g["weight_decay"] = 0.0 if _adam_mini_no_decay(g["name"]) else plain.weight_decay
        # the hidden matrices' groups first, as under every kind (a run logs the first group's lr)
        opt.param_groups.sort(key=lambda g: id(g["params"][0]) not in plain.hidden)
    return opt


def _adam_mini_no_decay(name: str) -> bool:
    """Adam-mini's own rule: no weight decay on a parameter whose (lower-case) name has norm, ln or bias."""
    return "norm" in name or "ln" in name or "bias" in name


def _adamw8bit(model, lr, weight_decay, betas, settings, plain=None):
    s = _settings("ref-adamw8bit", settings, eps=1e-8, min_8bit_size=4096, embedding_bits=32)
    bnb_optim = _import("bitsandbytes.optim")
    opt = bnb_optim.AdamW8bit(_decay_groups(model.parameters(), weight_decay, plain), lr=lr, betas=betas, eps=s["eps"],
                              weight_decay=weight_decay, min_8bit_size=s["min_8bit_size"])
    # bitsandbytes' per-parameter overrides live in a process-wide manager keyed by id(param); this
    # optimizer gets its own, so that other runs in the same process are not affected
    manager = bnb_optim.GlobalOptimManager.__new__(bnb_optim.GlobalOptimManager)
    manager.initialize()
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    if embeddings and s["embedding_bits"] != 8:
        manager.override_config(embeddings, "optim_bits", int(s["embedding_bits"]))
    opt.mng = manager
    return opt


def _torchao_adamw8bit(model, lr, weight_decay, betas, settings, plain=None):
    s = _settings("ref-torchao-adamw8bit", settings, eps=1e-8, block_size=256)
    AdamW8bit = _import("torchao.optim").AdamW8bit
    return AdamW8bit(_decay_groups(model.parameters(), weight_decay, plain), lr=lr, betas=betas, eps=s["eps"],
                     weight_decay=weight_decay, block_size=s["block_size"])


def _soap(model, lr, weight_decay, betas, settings, plain=None):
    s = _settings("ref-soap", settings, precondition_frequency=10, max_precondition_dim=10000, shampoo_beta=None,
                  eps=1e-8, precondition_vocab=False)
    SOAP = _import("pytorch_optimizer.optimizer.soap").SOAP
    max_dim = int(s["max_precondition_dim"])
    vocab = _vocab_matrices(model)
    vocab_ids = {id(p) for p in vocab}
    groups = _decay_groups([p for p in model.parameters() if id(p) not in vocab_ids], weight_decay, plain)
    if vocab:
        if s["precondition_vocab"]:
            groups += _decay_groups(vocab, weight_decay, plain)
        else:  # only the short (hidden) side of each vocabulary matrix is preconditioned
            short = max(min(p.shape) for p in vocab)
            groups += _decay_groups(vocab, weight_decay, plain, max_precondition_dim=min(max_dim, short))
    return SOAP(groups, lr=lr, betas=betas, shampoo_beta=s["shampoo_beta"], weight_decay=weight_decay,
                precondition_frequency=int(s["precondition_frequency"]), max_precondition_dim=max_dim,
                eps=s["eps"])


# ---------------------------------------------------------------------------------------- SCALE
class SCALE(torch.optim.Optimizer):
    """SCALE's update of matrices (arXiv 2506.16659; see the module docstring): for each matrix ``W``
    with gradient ``G``, ``M = G`` (or, with ``momentum`` > 0 in its group, ``M <- momentum M + (1 -
    momentum) G``), then ``W <- W (1 - lr wd) - lr M / rms(M)``, where ``rms`` is the root mean square
    of ``M`` along dimension ``dim`` of the group (1: each row of an ``out x in`` weight; 0: each column,
    for an embedding table), floored at ``eps``. Only 2-D parameters; a group without momentum holds no
    state."""

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.0, dim: int = 1,
                 weight_decay: float = 0.0, eps: float = 1e-8) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SCALE: momentum={momentum!r} must be in [0, 1)")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dim": dim, "weight_decay": weight_decay,
                                  "eps": eps})
        for group in self.param_groups:
            if group["dim"] not in (0, 1) or any(p.dim() != 2 for p in group["params"]):
                raise ValueError("SCALE normalizes matrices along dim 0 or 1: give it 2-D parameters only")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = p.grad
                if beta > 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    m = state["momentum_buffer"].lerp_(p.grad, 1 - beta)
                rms = m.square().mean(dim=group["dim"], keepdim=True).sqrt_().clamp_min_(group["eps"])
                if wd:
                    p.mul_(1 - lr * wd)
                p.addcdiv_(m, rms, value=-lr)
        return loss


#: ``ref-scale``'s ``rest``: what trains the embedding and the head (SCALE, as the paper; or AdamW)
SCALE_REST = ("scale", "adamw")


def _scale(model, lr, weight_decay, betas, settings, plain=None):
    s = _settings("ref-scale", settings, momentum=0.9, rest="scale", eps=1e-8, adamw_eps=1e-8)
    if s["rest"] not in SCALE_REST:
        raise ValueError(f"ref-scale: rest={s['rest']!r} is not one of {list(SCALE_REST)} (what trains the "
                         "embedding and the head: SCALE, as the paper, or AdamW as every other method)")
    hidden, other = _hidden_matrices(model)
    if not hidden:
        raise ValueError("ref-scale found no hidden 2-D matrices")
    groups: list[dict[str, Any]] = [{"params": hidden}]
    if s["rest"] == "scale":
        head = getattr(getattr(model, "lm_head", None), "weight", None)
        vocab = _vocab_matrices(model)
        own = {} if plain is None else {"lr": plain.lr, "weight_decay": plain.weight_decay}  # plain: not hidden
        groups += [{"params": [p for p in vocab if p is not head], "dim": 0, **own},
                   {"params": [p for p in vocab if p is head], "momentum": s["momentum"], **own}]
        other = [p for p in other if all(p is not v for v in vocab)]
    scale = SCALE([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay, eps=s["eps"])
    eps = _adamw_eps("ref-scale", s, settings)
    return HiddenAndAdamW(scale, _rest_adamw(other, lr, weight_decay, betas, eps, plain))


def _normuon(model, lr, weight_decay, betas, settings, plain=None):
    s = _settings("ref-normuon", settings, momentum=0.95, beta2=0.95, nesterov=True, ns_steps=5,
                  update_scale="match_rms", adamw_eps=1e-8)
    eps = _adamw_eps("ref-normuon", s, settings)
    del s["adamw_eps"]
    NorMuon = _import("pytorch_optimizer").NorMuon
    hidden, other = _hidden_matrices(model)
    normuon = NorMuon([{"params": hidden, "use_muon": True}], lr=lr, weight_decay=weight_decay, **s)
    return HiddenAndAdamW(normuon, _rest_adamw(other, lr, weight_decay, betas, eps, plain))


def _racs(model, lr, weight_decay, betas, settings, plain=None):
    s = _settings("ref-racs", settings, beta=0.9, alpha=0.05, gamma=1.01, eps=1e-8, adamw_eps=1e-8)
    eps = _adamw_eps("ref-racs", s, settings)
    del s["adamw_eps"]
    RACS = _import("pytorch_optimizer").RACS
    hidden, other = _hidden_matrices(model)
    return HiddenAndAdamW(RACS(hidden, lr=lr, weight_decay=weight_decay, **s),
                          _rest_adamw(other, lr, weight_decay, betas, eps, plain))


_BNB = ("bitsandbytes", "bitsandbytes", "0.50")  # 0.50: 8-bit optimizers run on the CPU too

#: name -> Reference(description, build, packages, betas)
REFERENCES: dict[str, Reference] = {
    "ref-muon": Reference(
        "torch.optim.Muon on the hidden matrices (attention, MLP) + torch.optim.AdamW on embeddings, head and "
        "norms (eps adamw_eps); adjust_lr_fn='match_rms_adamw' lets both share the AdamW learning rate and weight "
        "decay",
        _muon),
    "ref-adafactor": Reference(
        "torch.optim.Adafactor with the paper's settings (factored second moment, no first moment, beta2 decay "
        "-0.8, update clipping 1) on all parameters, or with rest=adamw on the hidden matrices + torch.optim.AdamW "
        "on embeddings, head and norms (at plain_lr; eps adamw_eps); lr caps the relative step (the paper's: 1e-2)",
        _adafactor),
    "ref-adam-mini": Reference(
        "Adam-mini from the package adam-mini (one second moment per head of q/k, per row of embedding, head, "
        "o and MLP, one for V: the authors' advice for runs under 10k steps); AdamW's hyperparameters",
        _adam_mini, (("adam-mini", "adam_mini", None),)),
    "ref-adamw8bit": Reference(
        "bitsandbytes.optim.AdamW8bit (block-wise 8-bit moments; embeddings keep 32-bit state, as transformers' "
        "Trainer does; tensors < 4096 elements too)",
        _adamw8bit, (_BNB,)),
    "ref-torchao-adamw8bit": Reference(
        "torchao.optim.AdamW8bit (block-wise 8-bit moments in tensor subclasses; torch.compile'd step: the first "
        "step of a run includes its compilation)",
        _torchao_adamw8bit, (("torchao", "torchao", None),)),
    "ref-soap": Reference(
        "SOAP from pytorch-optimizer (Adam in Shampoo's eigenbasis, refreshed every 10 steps) with the authors' "
        "betas (0.95, 0.95); the vocabulary side of embedding and head is not preconditioned",
        _soap, (("pytorch-optimizer", "pytorch_optimizer", None),), betas=(0.95, 0.95)),
    "ref-scale": Reference(
        "SCALE (arXiv 2506.16659, written here from the paper): row-RMS-normalized SGD on every matrix, momentum "
        "only on the head, AdamW on norms; rest=adamw: on the hidden matrices only, AdamW on the rest",
        _scale),
    "ref-normuon": Reference(
        "NorMuon from pytorch-optimizer (Muon with a row-wise second moment; update RMS 0.2) on the hidden "
        "matrices + torch.optim.AdamW on embeddings, head and norms",
        _normuon, (("pytorch-optimizer", "pytorch_optimizer", None),)),
    "ref-racs": Reference(
        "RACS from pytorch-optimizer (row and column scaled SGD: m + n + 1 numbers per matrix) on the hidden "
        "matrices + torch.optim.AdamW on embeddings, head and norms",
        _racs, (("pytorch-optimizer", "pytorch_optimizer", None),)),
}

#: the packages of the references whose builders live in grassopt.train.loop
_OTHER_PACKAGES: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "ref-galore": (("galore-torch", "galore_torch", None),),
    "ref-apollo": (("apollo-torch", "apollo_torch", None),),
    "ref-alice": (("pytorch-optimizer", "pytorch_optimizer", None),),
    "ref-galore-adafactor": (("galore-torch", "galore_torch", None),),
}


def _packages(name: str) -> tuple[tuple[str, str, str | None], ...]:
    ref = REFERENCES.get(name)
    return ref.packages if ref is not None else _OTHER_PACKAGES.get(name, ())


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():
            break
    return tuple(out)


def require(name: str) -> None:
    """Raise :class:`MissingPackageError` (one line naming the package and the pip extra) if a package
    that ``name`` needs is missing or too old. Cheap: nothing is imported."""
    for dist, module, minimum in _packages(name):
        if importlib.util.find_spec(module) is None:
            raise MissingPackageError(f"{name} needs the package {dist}: pip install {EXTRA}")
        if minimum is not None:
            have = importlib.metadata.version(dist)
            if _version_tuple(have) < _version_tuple(minimum):
                raise MissingPackageError(f"{name} needs {dist} >= {minimum} (installed: {have}): "
                                          f"pip install -U {EXTRA}")


def available(name: str) -> bool:
    """True if every package ``name`` needs is installed (always for grassopt's own presets)."""
    try:
        require(name)
    except MissingPackageError:
        return False
    return True


def build(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
          betas: tuple[float, float] = (0.9, 0.999), settings: dict[str, Any] | None = None,
          plain: PlainRates | None = None) -> torch.optim.Optimizer:
    """The reference optimizer ``name`` for ``model``. ``betas``: the harness's, unless the reference's
    authors recommend others (``Reference.betas``) or ``settings["betas"]`` is given. ``plain``: the
    plain parameters' own rate and decay (:func:`grassopt.targets.plain_rates`), or None for one rate."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; choose one of {sorted(REFERENCES)}")
    require(name)
    ref = REFERENCES[name]
    settings = dict(settings or {})
    betas = tuple(settings.pop("betas", ref.betas or betas))
    if len(betas) != 2:
        raise ValueError(f"betas={betas!r} must be two numbers")
    return ref.build(model, lr, weight_decay, betas, settings, plain)


def prepare_resume(name: str) -> None:
    """Import what loading ``name``'s checkpoint with ``weights_only=True`` needs (torchao registers its
    state tensor subclasses as safe globals when imported)."""
    if name == "ref-torchao-adamw8bit" and available(name):
        _import("torchao.optim")


def reference_versions(names: Iterable[str] | None = None) -> dict[str, str]:
    """``{package: version}`` of the installed packages behind the references ``names`` (all of them
    if None), always with torch (whose Muon, Adafactor and AdamW are references too)."""
    names = list(REFERENCES) + list(_OTHER_PACKAGES) if names is None else list(names)
    dists = ["torch"] + [d for n in names for d, _, _ in _packages(n)]
    out: dict[str, str] = {}
    for dist in dict.fromkeys(dists):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


# ---------------------------------------------------------------------------------------- counting
def tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of every tensor reachable in ``obj`` (dicts, lists, tuples) as allocated: each storage
    once and whole. A storage shared by several entries (bitsandbytes' quantization maps) counts
    once; a slice counts the storage it keeps alive (galore-torch's bases are slices of a full SVD
    factor); a tensor subclass (torchao's 8-bit states, DTensor) counts its inner tensors (codes,
    scales, maps), not the float size it shows to PyTorch."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if is_traceable_wrapper_subclass(obj):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        storage = obj.untyped_storage()
        key = (obj.device, storage.data_ptr())
        if storage.data_ptr() != 0:
            if key in seen:
                return 0
            seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0
