"""Reference optimizers: what people pick today, each built as its authors recommend.

``grassopt train --preset ref-muon`` (and ``grassopt bench --presets ref-muon ...``) trains with one
of these on the same harness as grassopt's presets: the same model, data order, LR schedule (warmup
then cosine, applied to every param group), gradient clipping, checkpoints and state-byte counter.

``REFERENCES`` is the registry: name -> :class:`Reference` ``(description, build, packages,
betas)``, where ``build(model, lr, weight_decay, betas, settings) -> torch.optim.Optimizer``.
:func:`build` resolves the betas and checks the packages first. ``settings`` are the
reference's own knobs (``--opt key=value`` on the command line; an unknown key is an error that
lists the known ones); ``settings["betas"]`` overrides the betas for any reference.

The harness passes ``lr`` and ``weight_decay`` through to every reference, so a sweep tunes each
one's learning rate the same way. Weight decay goes on matrices and embeddings, not on norms (1-D
parameters), as for ``adamw-torch``; Adam-mini decides this itself (no decay on names with "norm").
Each optional package's absence is one line, :class:`MissingPackageError`, naming the pip extra.

Learning rates and settings, with their source:

- ``ref-muon``: ``torch.optim.Muon`` (momentum 0.95, Nesterov, 5 Newton-Schulz steps: Keller
  Jordan's defaults, torch's too) on the hidden matrices (attention and MLP weights);
  ``torch.optim.AdamW`` on embeddings, head and norms. ``adjust_lr_fn="match_rms_adamw"`` (Moonshot,
  "Muon is Scalable for LLM Training", arXiv 2502.16982; torch's Muon docs) scales each matrix's
  step to ``lr * 0.2 * sqrt(max(A, B))``, which gives Muon's update the RMS of AdamW's so that
  both share one learning rate and one weight decay: the AdamW rate.
- ``ref-adafactor``: ``torch.optim.Adafactor`` with torch's defaults, which are the paper's
  (Shazeer & Stern 2018): relative steps ``min(lr, 1/sqrt(t)) * max(1e-3, RMS(param))``,
  ``beta2_t = 1 - t^-0.8``, update clipping d = 1, no first moment. ``lr`` caps the relative step
  (the paper's constant is 1e-2, torch's default lr).
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
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn

__all__ = ["REFERENCES", "Reference", "MissingPackageError", "MuonAdamW", "build", "require", "available",
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


def _decay_groups(params: Iterable[nn.Parameter], weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings, none on 1-D parameters (norms), as adamw-torch."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, **extra},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def _vocab_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The embedding tables and the output head (``lm_head``), each once."""
    out: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            out[id(m.weight)] = m.weight
    head = getattr(model, "lm_head", None)
    if isinstance(getattr(head, "weight", None), nn.Parameter):
        out[id(head.weight)] = head.weight
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


# ---------------------------------------------------------------------------------------- Muon + AdamW
class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the hidden matrices and ``torch.optim.AdamW`` on everything else, as one
    optimizer: ``param_groups`` are the two optimizers' own group dicts (Muon's first), so an LR
    scheduler drives both; ``state`` is their states merged (read it, do not write it);
    ``state_dict()`` is the ordinary format over all groups, and ``load_state_dict`` hands each
    optimizer its part."""

    def __init__(self, muon_params: list[nn.Parameter], adamw_params: list[nn.Parameter], *, lr: float,
                 weight_decay: float, betas: tuple[float, float], momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, adjust_lr_fn: str | None = "match_rms_adamw", eps: float = 1e-8) -> None:
        if not muon_params:
            raise ValueError("ref-muon found no hidden 2-D matrices to give Muon")
        self.muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        self.optimizers: list[torch.optim.Optimizer] = [self.muon]
        self.adamw = None
        if adamw_params:
            self.adamw = torch.optim.AdamW(_decay_groups(adamw_params, weight_decay), lr=lr, betas=betas, eps=eps)
            self.optimizers.append(self.adamw)
        self._ready = False
        super().__init__([g for o in self.optimizers for g in o.param_groups], {})
        self._ready = True
        self._relink()

    def _relink(self) -> None:
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        merged: dict[torch.Tensor, Any] = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:  # Optimizer.__init__ assigns an empty dict; the state lives below
        if value:
            raise AttributeError("MuonAdamW.state is the merged state of its two optimizers; it cannot be set")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._ready:
            raise NotImplementedError("add a group to MuonAdamW.muon or MuonAdamW.adamw, then rebuild")
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
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, MuonAdamW has "
                             f"{len(self.param_groups)}")
        start = offset = 0
        for o in self.optimizers:
            mine = groups[start:start + len(o.param_groups)]
            n = sum(len(g["params"]) for g in mine)
            ids = [i for g in mine for i in g["params"]]
            o.load_state_dict({
                "state": {i - offset: state[i] for i in ids if i in state},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            start += len(o.param_groups)
            offset += n
        self._relink()  # load_state_dict gives each optimizer new group dicts


def _hidden_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    vocab = {id(p) for p in _vocab_matrices(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if p.dim() == 2 and id(p) not in vocab]
    return hidden, [p for p in params if not (p.dim() == 2 and id(p) not in vocab)]


def _muon(model, lr, weight_decay, betas, settings):
    s = _settings("ref-muon", settings, momentum=0.95, nesterov=True, ns_steps=5,
                  adjust_lr_fn="match_rms_adamw", eps=1e-8)
    hidden, other = _hidden_matrices(model)
    return MuonAdamW(hidden, other, lr=lr, weight_decay=weight_decay, betas=betas, **s)


# ---------------------------------------------------------------------------------------- the others
def _adafactor(model, lr, weight_decay, betas, settings):
    s = _settings("ref-adafactor", settings, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0)
    return torch.optim.Adafactor(_decay_groups(model.parameters(), weight_decay), lr=lr,
                                 beta2_decay=s["beta2_decay"], eps=tuple(s["eps"]), d=s["d"])


def _adam_mini(model, lr, weight_decay, betas, settings):
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
    return opt


def _adamw8bit(model, lr, weight_decay, betas, settings):
    s = _settings("ref-adamw8bit", settings, eps=1e-8, min_8bit_size=4096, embedding_bits=32)
    bnb_optim = _import("bitsandbytes.optim")
    opt = bnb_optim.AdamW8bit(_decay_groups(model.parameters(), weight_decay), lr=lr, betas=betas, eps=s["eps"],
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


def _torchao_adamw8bit(model, lr, weight_decay, betas, settings):
    s = _settings("ref-torchao-adamw8bit", settings, eps=1e-8, block_size=256)
    AdamW8bit = _import("torchao.optim").AdamW8bit
    return AdamW8bit(_decay_groups(model.parameters(), weight_decay), lr=lr, betas=betas, eps=s["eps"],
                     weight_decay=weight_decay, block_size=s["block_size"])


def _soap(model, lr, weight_decay, betas, settings):
    s = _settings("ref-soap", settings, precondition_frequency=10, max_precondition_dim=10000, shampoo_beta=None,
                  eps=1e-8, precondition_vocab=False)
    SOAP = _import("pytorch_optimizer.optimizer.soap").SOAP
    max_dim = int(s["max_precondition_dim"])
    vocab = _vocab_matrices(model)
    vocab_ids = {id(p) for p in vocab}
    groups = _decay_groups([p for p in model.parameters() if id(p) not in vocab_ids], weight_decay)
    if vocab:
        if s["precondition_vocab"]:
            groups += _decay_groups(vocab, weight_decay)
        else:  # only the short (hidden) side of each vocabulary matrix is preconditioned
            short = max(min(p.shape) for p in vocab)
            groups += _decay_groups(vocab, weight_decay, max_precondition_dim=min(max_dim, short))
    return SOAP(groups, lr=lr, betas=betas, shampoo_beta=s["shampoo_beta"], weight_decay=weight_decay,
                precondition_frequency=int(s["precondition_frequency"]), max_precondition_dim=max_dim,
                eps=s["eps"])


_BNB = ("bitsandbytes", "bitsandbytes", "0.50")  # 0.50: 8-bit optimizers run on the CPU too

#: name -> Reference(description, build, packages, betas)
REFERENCES: dict[str, Reference] = {
    "ref-muon": Reference(
        "torch.optim.Muon on the hidden matrices (attention, MLP) + torch.optim.AdamW on embeddings, head and "
        "norms; adjust_lr_fn='match_rms_adamw' lets both share the AdamW learning rate and weight decay",
        _muon),
    "ref-adafactor": Reference(
        "torch.optim.Adafactor on all parameters with the paper's settings (factored second moment, no first "
        "moment, beta2 decay -0.8, update clipping 1); lr caps the relative step (the paper's: 1e-2)",
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
}

#: the packages of the references whose builders live in grassopt.train.loop
_OTHER_PACKAGES: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "ref-galore": (("galore-torch", "galore_torch", None),),
    "ref-apollo": (("apollo-torch", "apollo_torch", None),),
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
          betas: tuple[float, float] = (0.9, 0.999), settings: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """The reference optimizer ``name`` for ``model``. ``betas``: the harness's, unless the reference's
    authors recommend others (``Reference.betas``) or ``settings["betas"]`` is given."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; choose one of {sorted(REFERENCES)}")
    require(name)
    ref = REFERENCES[name]
    settings = dict(settings or {})
    betas = tuple(settings.pop("betas", ref.betas or betas))
    if len(betas) != 2:
        raise ValueError(f"betas={betas!r} must be two numbers")
    return ref.build(model, lr, weight_decay, betas, settings)


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
