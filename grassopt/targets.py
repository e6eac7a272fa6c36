"""Which layers a method covers, and at what rank: one module for target selection and rank specs.

Used by :mod:`grassopt.presets` (projected groups), :mod:`grassopt.sketch` (sketched layers),
:mod:`grassopt.zo` (perturbed layers), :mod:`grassopt.hf` (Hugging Face's rule), the optimizer
registry and the memory estimates, so every place selects the same layers and reads a rank the
same way.

Targets. ``"all-linear"`` is every ``nn.Linear`` but the output layer (as Hugging Face's
``optim_target_modules`` and PEFT); any other string is a pattern that matches a module when it is
a substring of its qualified name or a regular expression matching the whole name
(:func:`name_matches`). Hugging Face's own rule, where a lone string must match as a full regex,
is :func:`hf_target_names`.

Ranks. A *subspace rank* (of a projected matrix) is an int, or ``"d/N"``: a fraction of the
matrix's short side, ``max(1, d // N)`` (:func:`resolve_rank`). A *sketch rank* (of an
activation-saving layer) is an int, or a float in (0, 1): that fraction of the layer's
``in_features``, rounded (:func:`resolve_sketch_rank`); a config may write the int as a float
(``2.0``), which :func:`sketch_rank_spec` normalises.

Hidden matrices and plain parameters. The *hidden matrices* are the trainable 2-D weights of the
linear layers that :func:`select_targets` picks (:func:`hidden_matrices`): what grassopt's presets
project. Every other trainable parameter (embedding, head, norms, biases, layers outside the targets)
is *plain*; ``plain_lr`` and ``plain_weight_decay`` (:class:`PlainRates`) give the plain parameters
their own rate and decay under every optimizer kind, the same split for each.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from torch import nn

__all__ = ["select_targets", "name_matches", "matching_modules", "hf_name_matches", "hf_target_names",
           "resolve_rank", "resolve_sketch_rank", "sketch_rank_spec", "parse_rank", "parse_rank_or_fraction", "OUTPUT_NAMES", "hidden_matrices",
           "PlainRates", "plain_rates", "check_plain_rates"]

#: Names of linear layers that ``"all-linear"`` leaves out (the output layer, as Hugging Face does).
OUTPUT_NAMES = ("lm_head", "output", "classifier", "score", "head")
_FRACTION = re.compile(r"\s*d\s*/\s*(\d+)\s*")


# ---------------------------------------------------------------------------------------- targets
def name_matches(pattern: str, name: str) -> bool:
    """True when ``pattern`` is a substring of ``name`` or a regular expression matching all of it."""
    if pattern in name:
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _output_modules(model: nn.Module) -> set[int]:
    out = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            m = get()
        except Exception:  # noqa: BLE001 - some models raise NotImplementedError
            m = None
        if m is not None:
            out.add(id(m))
    return out


def select_targets(model: nn.Module, targets: str | Iterable[str] = "all-linear") -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules whose weights are projected.

    ``targets`` is ``"all-linear"`` (every linear layer but the output layer), or one or more
    patterns; a module matches a pattern when the pattern is a substring of its qualified name
    or a regular expression matching the whole name (as Hugging Face's ``optim_target_modules``).
    """
    outputs = _output_modules(model)
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty; pass 'all-linear' or module-name patterns such as ['attn', 'mlp']")
    all_linear = "all-linear" in targets
    patterns = [t for t in targets if t != "all-linear"]
    chosen = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or id(mod.weight) in emb_weights:
            continue
        if all_linear and id(mod) not in outputs and name.split(".")[-1] not in OUTPUT_NAMES:
            chosen.append((name, mod))
        elif any(name_matches(t, name) for t in patterns):
            chosen.append((name, mod))
    return chosen


def hidden_matrices(model: nn.Module, targets: str | Iterable[str] = "all-linear") -> list[tuple[str, nn.Parameter]]:
    """The hidden matrices of ``model``, with their modules' names: the trainable 2-D weights of the
    linear layers :func:`select_targets` picks. The presets project these (those the rank allows);
    under ``plain_lr`` they keep ``lr`` for every kind, and everything else is plain."""
    return [(name, m.weight) for name, m in select_targets(model, targets)  # type: ignore[misc]  # (nn.Parameter)
            if m.weight.requires_grad and m.weight.dim() == 2]


class PlainRates(NamedTuple):
    """The split of ``plain_lr`` / ``plain_weight_decay``: the hidden matrices (``hidden``, ids) keep the
    main ``lr`` and ``weight_decay``; every other trainable parameter gets ``lr`` and ``weight_decay`` here."""

    hidden: frozenset[int]
    lr: float
    weight_decay: float


def check_plain_rates(plain_lr: Any = None, plain_weight_decay: Any = None) -> None:
    """Refuse, with one line, a ``plain_lr`` that is not > 0 and finite or a ``plain_weight_decay`` that is not
    >= 0 and finite (None, the default, means the same as ``lr`` / ``weight_decay``)."""
    def bad(v: Any, low_ok: bool) -> bool:
        return (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or not (v >= 0 if low_ok else v > 0))

    if plain_lr is not None and bad(plain_lr, False):
        raise ValueError(f"plain_lr={plain_lr!r} must be > 0 and finite (the learning rate of the parameters the "
                         "method does not project: embedding, head, norms, biases), e.g. 3e-3; or None for the "
                         "same as lr")
    if plain_weight_decay is not None and bad(plain_weight_decay, True):
        raise ValueError(f"plain_weight_decay={plain_weight_decay!r} must be >= 0 and finite (the weight decay of "
                         "the parameters the method does not project), e.g. 0.0; or None for the same as "
                         "weight_decay")


def plain_rates(model: nn.Module, targets: str | Iterable[str], lr: float, weight_decay: float,
                plain_lr: float | None = None, plain_weight_decay: float | None = None) -> PlainRates | None:
    """The :class:`PlainRates` of ``model`` (None when both are None: one rate, the groups of before)."""
    check_plain_rates(plain_lr, plain_weight_decay)
    if plain_lr is None and plain_weight_decay is None:
        return None
    return PlainRates(frozenset(id(w) for _, w in hidden_matrices(model, targets)),
                      lr if plain_lr is None else plain_lr,
                      weight_decay if plain_weight_decay is None else plain_weight_decay)


def matching_modules(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """Every named module (of any type) that ``pattern`` matches (as :func:`select_targets` matches)."""
    return [(name, mod) for name, mod in model.named_modules() if name and name_matches(pattern, name)]


def hf_name_matches(targets: str | Iterable[str], name: str) -> bool:
    """Hugging Face's ``check_target_module_exists``: a string is a full-match regex; a list entry
    matches when it equals the name, is contained in it, or fully matches it as a regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    targets = list(targets)
    if name in targets or any(t in name for t in targets):
        return True
    return any(re.fullmatch(t, name) is not None for t in targets)


def hf_target_names(model: nn.Module, targets: str | Iterable[str] | None) -> list[str] | str:
    """The names of the ``nn.Linear`` modules that ``optim_target_modules``-style ``targets`` select.

    Returns ``"all-linear"`` unchanged (``None`` means ``"all-linear"``), otherwise the list of
    matching linear-module names; raises ``ValueError`` if nothing matches (as the Trainer does).
    """
    if targets is None or (isinstance(targets, str) and targets.replace("_", "-") == "all-linear"):
        return "all-linear"
    if not isinstance(targets, (str, list, tuple)):
        raise TypeError(f"optim_target_modules must be a regex string, a list of strings or 'all-linear', "
                        f"got {type(targets).__name__}")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and hf_name_matches(targets, n)]
    if not names:
        raise ValueError(f"no linear module of the model matches optim_target_modules={targets!r}")
    return names


# ---------------------------------------------------------------------------------------- ranks
def resolve_rank(rank: int | str, shape) -> int:
    """The int rank of an ``m x n`` matrix for a rank spec: an int, or ``"d/N"`` (``max(1, d // N)``,
    ``d = min(m, n)``)."""
    if isinstance(rank, str):
        match = _FRACTION.fullmatch(rank)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"rank={rank!r}: a rank is an integer >= 1 or a fraction of the short side "
                             "such as 'd/4'")
        return max(1, min(shape[-2], shape[-1]) // int(match.group(1)))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be an integer >= 1 (or a fraction of the short side such as 'd/4')")
    return rank


def parse_rank(text: str) -> int | str:
    """A rank as written on a command line (``--rank``): an integer (``"8"``), or a fraction of each
    matrix's short side (``"d/4"``) kept as the string; anything else is a ``ValueError`` (one line)."""
    value: int | str = int(text) if text.strip().lstrip("-").isdigit() else text
    resolve_rank(value, (1 << 62, 1 << 62))
    return value


def parse_rank_or_fraction(text: str | float | int) -> int | float:
    """A sketch rank as written on a command line (``--sketch-rank``): a fraction in (0, 1) (``"0.125"``, a
    float) or a whole number >= 1 (``"8"`` or ``"8.0"``, an int); anything else is a ``ValueError``. The one
    reading of such a value: :func:`sketch_rank_spec` gives the same for a number."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (0 < value < 1 or (1 <= value < math.inf and value.is_integer())):
        raise ValueError(f"expected a fraction in (0, 1) or an integer >= 1, got {text!r}")
    return sketch_rank_spec(value)


def sketch_rank_spec(value: float | int) -> float | int:
    """A config's sketch rank as :func:`resolve_sketch_rank` takes it: a fraction stays a float, a
    whole number (``8`` or ``8.0``) becomes an int."""
    return int(value) if value >= 1 else float(value)


def resolve_sketch_rank(rank: int | float | Callable[[str, nn.Linear], int], name: str, mod: Any) -> int:
    """The int sketch rank of the linear layer ``mod`` (called ``name``) for a spec: an int, a float in
    (0, 1) (that fraction of ``in_features``, rounded, at least 1) or ``callable(name, linear)``.
    Must satisfy ``1 <= r < in_features``."""
    n = mod.in_features
    r: int | float
    if callable(rank):
        r = rank(name, mod)
    elif isinstance(rank, float) and 0 < rank < 1:
        r = max(1, round(rank * n))
    else:
        r = rank
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"{name}: rank={r!r} must be an integer >= 1 or a fraction of in_features in (0, 1)")
    if r < 1:
        raise ValueError(f"{name}: rank={r} must be >= 1; use a rank between 1 and in_features - 1 = {n - 1}")
    if r >= n:
        raise ValueError(f"{name}: rank={r} must be < in_features={n} (a sketch of rank >= n stores at least as "
                         f"much as the input itself); lower the rank below {n}, pass a fraction such as 0.25, "
                         "or leave this layer out of targets")
    return r
