"""What a run's config dataclass shares: a JSON form, the settings a resumed run may change, and the
validation of the settings every run has.

Every field is declared once, with its command-line flag (:func:`setting`: help, choices, parsing, and
whether it is run control, i.e. may change when a run is resumed); the commands build their flags from
the fields (:mod:`grassopt.engine.cli`), and ``RUN_CONTROL`` is read from them.

Every value is checked where it enters: :meth:`RunConfig.validate` (which the applications' config
classes extend) refuses, with one line naming the setting, its command-line flag and what it must
be, a non-finite or out-of-range number, a count that is not an integer, a device this machine does
not have, and an output folder that cannot be created (a regular file in its path), before
anything is written. The helpers (:func:`check_count`, :func:`check_number`, :func:`check_device`,
:func:`check_folder`) are those checks, for the applications' own fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..options import preset_option_names

__all__ = ["RunConfig", "RUN_CONTROL", "check_count", "check_number", "check_device", "check_folder", "flag", "setting",
           "redeclare", "run_control", "state_dtype_choices"]


def flag(name: str) -> str:
    """The command-line flag of the config field ``name``."""
    return "--" + name.replace("_", "-")


def check_count(name: str, value: Any, minimum: int, *, none: str | None = None, meaning: str = "") -> None:
    """``value`` must be an integer >= ``minimum`` (or None, when ``none`` says what None means)."""
    if value is None and none is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        alt = f", or None ({none})" if none is not None else ""
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}{meaning}{alt} ({flag(name)})")


def check_number(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    """``value`` must be a finite real number for which ``ok`` holds (``requirement`` says which)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}={value!r} must be {requirement} ({flag(name)})")


def check_device(device: Any) -> None:
    """``device`` (None: the default) must name a device torch knows and this machine has."""
    if device is None:
        return
    import torch

    from .loop import default_device
    hint = f"use cpu, cuda, cuda:N, mps, ..., or leave --device unset for this machine's default ({default_device()})"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device={device!r} is not a device torch knows; {hint}") from None
    if dev.type == "meta":
        raise ValueError(f"device={device!r} holds no data (tensors on it have shapes only); {hint}")
    if dev.type == "cpu":
        return
    mod = getattr(torch, dev.type, None)
    available = getattr(mod, "is_available", None)
    try:
        has = bool(available()) if callable(available) else False
    except Exception:  # noqa: BLE001 - a backend that cannot even say
        has = False
    if not has:
        raise ValueError(f"device={device!r}: this machine (or this build of torch) has no {dev.type} device; {hint}")
    count = getattr(mod, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(f"device={device!r}: this machine has {count()} {dev.type} device(s), numbered from 0; {hint}")


def check_folder(path: Any, name: str, what: str = "folder") -> None:
    """``path`` must be a folder, or a path where one can be created: no regular file in the way, and the
    nearest existing folder above it writable. Nothing is created."""
    if path is None:
        return
    p = Path(os.fspath(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a file, not a {what}; choose another {flag(name)}")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != p and probe.exists() and not probe.is_dir():
        raise ValueError(f"{name}={str(path)!r} cannot be created: {probe} is a file, not a folder; choose another "
                         f"{flag(name)}")
    target = p if p.exists() else probe
    if target.exists() and not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"{name}={str(path)!r}: {target} is not writable; choose another {flag(name)}")

def setting(default: Any = dataclasses.MISSING, help: str = "", *, group: str = "run", run_control: bool = False,
            choices: Any = None, flag: str | None = None, aliases: tuple[str, ...] = (), parse: Callable | None = None,
            metavar: str | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field and its command-line flag, declared once (a ``dataclasses.field`` whose metadata the
    command lines read: :func:`grassopt.engine.cli.add_config_arguments`).

    ``help``: the flag's help (the default is shown beside it); ``group``: the help section (``data``,
    ``optimizer``, ``memory``, ``run``, ``output``: each command titles them); ``run_control``: the field may
    change when a run is resumed (it does not change the numbers; :attr:`RunConfig.RUN_CONTROL`); ``choices``:
    the values allowed (a sequence, or a function returning one when the parser is built); ``flag``: the flag
    when it is not ``--<name>`` (``--no-<name>`` for a bool that defaults to True); ``aliases``: more flags;
    ``parse``: reads the flag's text (a ``ValueError`` is the one-line usage error); ``metavar``: as argparse's.
    """
    meta = {"help": help, "group": group, "run_control": run_control, "choices": choices, "flag": flag,
            "aliases": tuple(aliases), "parse": parse, "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def redeclare(base: type, name: str, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
    """Field ``name`` of the config class ``base`` with another default (and/or other metadata: ``help``,
    ``group``, ...), for an application's config class that redeclares it; the rest of its declaration
    (its flag, whether it is run control) is kept."""
    f = next(f for f in dataclasses.fields(base) if f.name == name)
    meta = {**f.metadata, **changes}
    if default is dataclasses.MISSING:
        if f.default_factory is not dataclasses.MISSING:
            return field(default_factory=f.default_factory, metadata=meta)
        default = f.default
    return field(default=default, metadata=meta)


def run_control(cls: type) -> frozenset[str]:
    """The fields of the config class ``cls`` declared ``run_control``: those a resumed run may change."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("run_control"))


def state_dtype_choices() -> list[str]:
    """The dtypes the Adam moments of grassopt's presets may be kept in (``--state-dtype``): the one place
    that reads them from the library."""
    from ..codecs import CODECS
    return list(CODECS)


class _RunControl:
    """``cls.RUN_CONTROL``: :func:`run_control` of the class it is read from (so a subclass's own fields count)."""

    def __get__(self, obj: Any, cls: type) -> frozenset[str]:
        return run_control(cls)


@dataclass
class RunConfig:
    """Base of a run's config dataclass (``TrainConfig``, ``FinetuneConfig``): the settings every run
    has (the optimizer's hyperparameters, ``plain_lr`` and ``plain_weight_decay`` included, and
    schedule, clipping, seed, device, and the run control;
    an application redeclares a field to give it another default (:func:`redeclare`)), and their JSON form.

    Every field is a :func:`setting`: its flag, help, choices and whether it is run control are declared
    with it, and ``grassopt train`` / ``finetune`` / ``bench`` build their flags from them.

    ``to_dict()`` is the JSON form (``config.json``, and the ``config`` of every checkpoint: tuples
    become lists); ``from_dict(d)`` reads it back, ignoring keys the class no longer has;
    ``RUN_CONTROL`` names the fields that may change when a run is resumed (they do not change
    the numbers); :meth:`defaults` is the config of a run given no settings.
    """

    RUN_CONTROL = _RunControl()

    lr: float = setting(1e-3, "peak learning rate", group="optimizer")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of the peak, after the cosine decay",
                                  group="optimizer")
    warmup: int | None = setting(None, "linear warmup steps (default: 10%% of the steps)", group="optimizer")
    weight_decay: float = setting(0.0, "decoupled weight decay", group="optimizer")
    # the rate and decay of the parameters the method does not project or orthogonalize (embedding, head,
    # norms, biases); None: the same as lr / weight_decay. The schedule scales every group alike
    plain_lr: float | None = setting(
        None, "peak learning rate of the parameters the method does not project or orthogonalize (embedding, head, "
              "norms, biases); the schedule scales it as --lr (default: the same as --lr)", group="optimizer")
    plain_weight_decay: float | None = setting(
        None, "weight decay of those parameters; norms and biases stay undecayed (default: the same as "
              "--weight-decay)", group="optimizer")
    betas: tuple[float, float] = setting(
        (0.9, 0.999), "Adam's (beta1, beta2), e.g. --betas 0.9,0.95 or --betas 0.9 0.95 (ref-soap keeps its "
                      "authors' (0.95, 0.95) unless --opt betas=... is given)", group="optimizer", metavar="BETA")
    targets: list[str] = setting(help="modules the method covers (projects, adapts or sketches): 'all-linear', "
                                      "name substrings or regexes", group="optimizer",
                                 default_factory=lambda: ["all-linear"])
    options: dict[str, Any] = setting(
        help="any other option of the method, e.g. --opt alpha=0.25 --opt step_size=0.3 --opt transport=keep "
             "--opt recovery=False (repeatable; grassopt's projected presets take "
             f"{', '.join(preset_option_names())}: grassopt.options)", group="optimizer", flag="--opt",
        metavar="KEY=VALUE",
        default_factory=dict)
    clip: float = setting(1.0, "gradient-norm clipping, 0 = off", group="optimizer")
    bf16: bool = setting(False, "bf16 autocast for the forward (and backward) pass")
    seed: int = setting(0, "seed of everything random: the initialisation, the data order, the methods' draws")
    device: str | None = setting(None, "device (default: the accelerator if any, else cpu)")
    threads: int | None = setting(None, "torch CPU threads (default: torch's choice)", run_control=True)
    log_every: int = setting(10, "metrics line every N steps", run_control=True)
    checkpoint_every: int = setting(0, "also checkpoint every N steps (0: only at the end and on Ctrl-C)",
                                    group="output", run_control=True)
    out: str = setting("runs/run", "output folder", group="output", run_control=True)
    resume: bool = setting(False, "continue the run in --out from its checkpoint", group="output", run_control=True)
    overwrite: bool = setting(
        False, "start afresh even though --out holds another run's checkpoint (the old run is moved to "
               "--out/previous-<time>/ when the new one starts, and an older previous-* folder is then deleted: "
               "only the latest old run is kept); without it, such a folder is refused",
        group="output", run_control=True)
    stop_after: int | None = setting(None, "stop (with a checkpoint) after N steps of this invocation",
                                     group="output", run_control=True)
    progress: bool = setting(True, "no progress bar", run_control=True)
    plot: bool = setting(True, "do not write the plot of the run's curves", group="output", run_control=True)

    def validate(self) -> None:
        """Refuse, with one line naming the setting, what no run can use (see the module doc); the
        applications' ``validate`` extends this with their own fields."""
        check_number("lr", self.lr, lambda v: v > 0, "> 0 and finite (the peak learning rate, e.g. 1e-3)")
        check_number("min_lr_ratio", self.min_lr_ratio, lambda v: 0 <= v <= 1,
                     "in [0, 1] (the final learning rate as a fraction of the peak)")
        check_number("weight_decay", self.weight_decay, lambda v: v >= 0, ">= 0 and finite (e.g. 0.0 or 0.1)")
        if self.plain_lr is not None:
            check_number("plain_lr", self.plain_lr, lambda v: v > 0,
                         "> 0 and finite (the peak learning rate of the parameters the method does not project: "
                         "embedding, head, norms, biases), or None for the same as lr")
        if self.plain_weight_decay is not None:
            check_number("plain_weight_decay", self.plain_weight_decay, lambda v: v >= 0,
                         ">= 0 and finite (the weight decay of the parameters the method does not project), or "
                         "None for the same as weight_decay")
        b = self.betas
        if (not isinstance(b, (tuple, list)) or len(b) != 2 or
                any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < 1 for x in b)):
            raise ValueError(f"betas={b!r} must be a pair (beta1, beta2) of numbers in [0, 1), e.g. (0.9, 0.999)")
        check_number("clip", self.clip, lambda v: v >= 0,
                     ">= 0 and finite (the largest gradient norm; 0 switches clipping off)")
        check_count("warmup", self.warmup, 0, none="10% of the steps", meaning=" (linear warmup steps)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer (it seeds the initialisation, the data order "
                             "and the methods' draws), e.g. seed=0 (--seed)")
        check_count("threads", self.threads, 1, none="torch's choice", meaning=" (torch CPU threads)")
        check_count("log_every", self.log_every, 1, meaning=" (steps between metric lines)")
        check_count("checkpoint_every", self.checkpoint_every, 0, meaning=" (steps between checkpoints; 0: only at "
                                                                          "the end)")
        check_count("stop_after", self.stop_after, 1, none="run to the end", meaning=" (steps of this invocation)")
        if not isinstance(self.targets, (list, tuple)) or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"targets={self.targets!r} must be a list of strings ('all-linear', name substrings or "
                             "regexes) (--targets)")
        if not isinstance(self.options, dict):
            raise ValueError(f"options={self.options!r} must be a dict of the method's options (--opt KEY=VALUE)")
        check_device(self.device)
        check_folder(self.out, "out", "run folder")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        d = {k: v for k, v in d.items() if k in fields}
        for k, v in d.items():
            if isinstance(fields[k].default, tuple) and isinstance(v, list):
                d[k] = tuple(v)
        return cls(**d)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return cls().to_dict()


#: Config fields of every run that may change when it is resumed (they do not affect the numbers).
RUN_CONTROL = RunConfig.RUN_CONTROL
