"""Gradient-subspace diagnostics (``grassopt analyze``) and the Ackley demo (``grassopt ackley``).

Python API::

    from grassopt.analysis import SubspaceAnalyzer, analyze
    from grassopt.train.loop import TrainConfig

    summary, records = analyze(TrainConfig(model="tiny", preset="subtrack++", steps=300, out="runs/an"), every=10)

or, in your own training loop, ``SubspaceAnalyzer`` as a hook object (see :mod:`.hook`);
``SubspaceQuality`` is the light hook for any run with a projecting optimizer (``train(cfg,
hooks=[SubspaceQuality(out=cfg.out)])``): the share of the next gradients' energy captured by the
optimizer's basis at every step, per basis interval, for one ``Q^T X`` product per matrix and step
(``analyze(..., quality=True)`` adds it to the analyzer). The measurements themselves are pure
functions in :mod:`.metrics`.
"""

from __future__ import annotations

from typing import Any

from .hook import SubspaceAnalyzer, SubspaceQuality, read_records
from .metrics import (LAYER_KINDS, basis_energy_share, captured_share, derivative_spectrum, energy_profile,
                      estimation_error_derivative, layer_depth, layer_kind, principal_angles, svd_energy_share)
from .report import summarize, summarize_quality, write_outputs

__all__ = [
    "SubspaceAnalyzer",
    "SubspaceQuality",
    "analyze",
    "read_records",
    "summarize",
    "summarize_quality",
    "write_outputs",
    "svd_energy_share",
    "energy_profile",
    "basis_energy_share",
    "captured_share",
    "estimation_error_derivative",
    "derivative_spectrum",
    "principal_angles",
    "layer_kind",
    "layer_depth",
    "LAYER_KINDS",
]


def analyze(cfg, dataset=None, *, every: int = 10, out: str | None = None, **kwargs: Any):
    """Train ``cfg`` (a :class:`grassopt.train.loop.TrainConfig`) with a :class:`SubspaceAnalyzer`
    recording every ``every`` steps into ``out`` (default: ``cfg.out``); returns ``(summary, records)``
    where ``summary`` is the training summary. Other keyword arguments go to the analyzer."""
    from ..train.loop import train

    hook = SubspaceAnalyzer(every=every, out=cfg.out if out is None else out, **kwargs)
    summary = train(cfg, dataset, hooks=[hook])
    return summary, hook.records
