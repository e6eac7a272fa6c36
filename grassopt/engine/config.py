"""What a run's config dataclass shares: a JSON form, the settings a resumed run may change, and the
validation of the settings every run has.

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
from typing import Any, Callable, ClassVar

__all__ = ["RunConfig", "RUN_CONTROL", "check_count", "check_number", "check_device", "check_folder", "flag"]


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

#: Config fields of every run that may change when it is resumed (they do not affect the numbers).
RUN_CONTROL = frozenset({"out", "resume", "overwrite", "stop_after", "checkpoint_every", "log_every", "progress",
                         "threads", "plot"})


@dataclass
class RunConfig:
    """Base of a run's config dataclass (``TrainConfig``, ``FinetuneConfig``): the settings every run
    has (the optimizer's hyperparameters, ``plain_lr`` and ``plain_weight_decay`` included, and
    schedule, clipping, seed, device, and the run control;
    an application redeclares a field to give it another default), and their JSON form.

    ``to_dict()`` is the JSON form (``config.json``, and the ``config`` of every checkpoint: tuples
    become lists); ``from_dict(d)`` reads it back, ignoring keys the class no longer has;
    :data:`RUN_CONTROL` names the fields that may change when a run is resumed (they do not change
    the numbers); :meth:`defaults` is the config of a run given no settings.
    """

    RUN_CONTROL: ClassVar[frozenset[str]] = RUN_CONTROL

    lr: float = 1e-3  # the peak learning rate
    min_lr_ratio: float = 0.1  # the final one, a fraction of the peak (cosine decay)
    warmup: int | None = None  # linear warmup steps; default: 10% of the steps
    weight_decay: float = 0.0
    # the rate and decay of the parameters the method does not project or orthogonalize (embedding, head,
    # norms, biases); None: the same as lr / weight_decay. The schedule scales every group alike
    plain_lr: float | None = None
    plain_weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # the layers a method covers
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options (alpha, step_size, ...)
    clip: float = 1.0  # gradient-norm clipping; 0 disables it
    bf16: bool = False  # bf16 autocast for the forward pass
    seed: int = 0  # everything random: the initialisation, the data order, the methods' draws
    device: str | None = None  # None: the accelerator if there is one, else the CPU
    threads: int | None = None
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end and on Ctrl-C
    out: str = "runs/run"
    resume: bool = False
    overwrite: bool = False  # start afresh in a folder that holds another run's checkpoint (replacing it)
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this invocation
    progress: bool = True
    plot: bool = True

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
