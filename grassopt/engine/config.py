"""What a run's config dataclass shares: a JSON form and the settings a resumed run may change."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["RunConfig", "RUN_CONTROL"]

#: Config fields of every run that may change when it is resumed (they do not affect the numbers).
RUN_CONTROL = frozenset({"out", "resume", "overwrite", "stop_after", "checkpoint_every", "log_every", "progress",
                         "threads", "plot"})


@dataclass
class RunConfig:
    """Base of a run's config dataclass (``TrainConfig``, ``FinetuneConfig``): the settings every run
    has (the optimizer's hyperparameters and schedule, clipping, seed, device, and the run control;
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
