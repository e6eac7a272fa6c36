"""Training hooks that record gradient-subspace diagnostics into ``analysis.jsonl``.

Pass one to :func:`grassopt.train.loop.train` (``hooks=[SubspaceAnalyzer(every=10, out=...)]``) or
call its methods from your own loop (``on_start`` once, ``after_backward`` when the gradients are
complete, ``after_step`` after ``optimizer.step()``, ``on_end`` at the end).

:class:`SubspaceAnalyzer`: for every projected matrix (the optimizer's param groups with a
``rank``; for a full-rank optimizer, the matrices ``targets`` selects) it records, every ``every``
steps and at the last step (``type="grad"``):

- ``energy_svd``: the share of ``||G||_F^2`` captured by the best rank-``r`` subspace of ``G``;
- ``energy_basis``: the share captured by the optimizer's current basis ``Q`` (the one this step's
  gradient will be projected on, unless the step updates it);
- ``df_sv``: the top singular values of the derivative of the subspace estimation error,
  ``grad F = -2 E A^T`` (docs/algorithms.md#track), at the optimizer's basis (or, for a full-rank optimizer,
  at the rank-``r`` SVD basis of the previous recorded gradient: the basis GaLore would hold), and
  ``df_sv_rel = df_sv / ||G||_F^2`` (scale-free, in ``[0, 1]``: the ``normalized`` step of ``track``);
- ``svd_drift_max_deg`` / ``svd_drift_mean_deg``: principal angles between the rank-``r`` SVD
  subspaces of this gradient and of the previous recorded one;

and at every basis change of the optimizer (``type="basis"``), the largest and mean principal
angles between the old and the new basis. With ``quality=True`` it also records the subspace quality
below.

:class:`SubspaceQuality` records only the subspace quality (``type="quality"``), cheaply enough for
any run: at every step, for every projected matrix, the share of the gradient's energy that the
optimizer's current basis captures, ``||Q^T X||^2 / ||X||^2`` (``X``: the gradient oriented to the
short side, ``grassopt.linalg.orient``; one ``d x k x r`` product, no SVD), averaged over each basis
interval. The interval of the basis built at step ``t`` holds the gradients of steps ``t + 1`` to
``t'``, ``t'`` the step that replaces it: every gradient that arrives while it is the optimizer's
basis, the one of ``t'`` included (measured before that step's update, so it is the gradient the
old basis faced when replaced), and never the gradient of ``t`` itself (in-sample for ``svd`` and
``track``, which build the basis from it; at step 0 the basis is built from the first gradient). One
record per interval and matrix::

    {"type": "quality", "step": t', "name", "kind" (layer type), "depth", "rule", "rank",
     "interval_start": t, "steps": n, "capture_next": mean, "capture_min", "capture_last",
     "angle_max_deg", "angle_mean_deg", "complete": true}

``angle_*_deg``: the principal angles between this interval's basis and the one that replaced it
(the move of the update at ``t'``). Every scheduled update (each ``update_interval`` steps of the
matrix's param group) ends the interval, also one that returns the same basis: a ``frozen`` basis gives
one record per interval like every other rule, with angles 0, so its capture can be followed over
training. The interval still open at the end of the run is written by ``on_end`` with
``complete: false``, ``step`` its last measured step and no angles. Records share ``analysis.jsonl``
with the analyzer's (``type`` tells them apart; ``kind`` is the layer type in every record). The
gradient measured is the one the optimizer receives (``X = G``, not LDAdam's ``G + E``), before
clipping; a non-finite gradient makes its interval's values NaN (the report's means skip them).

A resumed run (``cfg.resume``) appends to ``analysis.jsonl`` after dropping what the interrupted
invocation wrote from the resumed step on (and its still-open quality intervals); the first record
after the resumption has no SVD drift (the previous SVD basis is not checkpointed), and the first
quality interval after it starts at an unknown step (``interval_start: null``).

The hooks do not disturb the run: they read gradients and optimizer state without changing them,
never touch the global RNG, and keep only references to bases the optimizer has already replaced
(one ``d x r`` basis per matrix; another, the previous rank-``r`` SVD basis, for the analyzer; for a
seeded rule such as ``gaussian``, its regenerated basis and, if not orthonormal, an orthonormal
one). The quality costs one ``Q^T X`` product and one norm of ``X`` per matrix and step (measured:
about 1.15 times the product alone), principal angles at basis updates, and a host sync only there. The
quality measurement needs the gradients after backward, so it is not available with ``layerwise``
updates (whose gradients are freed inside backward).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

from .. import bases
from ..distributed import rank_and_world
from ..linalg import orient, orthonormality_error
from .metrics import (captured_share, derivative_spectrum, layer_depth, layer_kind, principal_angles,
                      shares_from_singular_values)

__all__ = ["SubspaceAnalyzer", "SubspaceQuality", "Target", "BasisWatch", "QualityTracker", "find_targets",
           "read_records"]


@dataclass
class Target:
    """One matrix under analysis."""

    name: str
    param: Tensor
    rank: int
    kind: str
    depth: int | None
    rule: str | None = None  # the update rule of its param group (None outside projected groups)
    interval: int | None = None  # the group's update_interval T (its basis updates: every T steps)


def _main_process() -> bool:
    return rank_and_world()[0] == 0


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of an ``analysis.jsonl`` (unreadable lines, e.g. a torn last line, are skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def find_targets(model: nn.Module, optimizer: torch.optim.Optimizer, *, rank: int | None = None, spec: Any = None,
                 cfg: Any = None, fallback: bool = True) -> list[Target]:
    """The matrices under analysis: the 2-D parameters of the optimizer's projected param groups (those
    with a ``rank``), at ``rank`` if given (else the group's); with ``fallback`` and no projected group
    (a full-rank optimizer), the weights of the modules ``spec`` selects (default ``cfg.targets``, then
    ``"all-linear"``) at ``rank``, ``cfg.rank`` or 64. Matrices whose rank reaches their short side are
    skipped (their subspace is everything)."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: list[tuple[str, Tensor, int, str | None, int | None]] = []
    for group in optimizer.param_groups:
        if group.get("rank") is None:
            continue
        gnames = group.get("param_names") or [names.get(id(p), f"param{i}") for i, p in enumerate(group["params"])]
        found += [(n, p, int(group["rank"]), group.get("rule"), group.get("update_interval"))
                  for n, p in zip(gnames, group["params"]) if p.dim() == 2]
    if not found and fallback:
        from ..targets import select_targets

        spec = spec or (getattr(cfg, "targets", None) or "all-linear")
        default_rank = rank or getattr(cfg, "rank", None) or 64
        for mname, mod in select_targets(model, spec):
            found.append((f"{mname}.weight", mod.weight, default_rank, None, None))
    out = []
    for name, p, r, rule, interval in found:
        r = rank or r
        if r >= min(p.shape):
            continue
        out.append(Target(name, p, r, layer_kind(name), layer_depth(name), rule, interval))
    return out


def optimizer_basis(optimizer: torch.optim.Optimizer, p: Tensor) -> Tensor | None:
    """The optimizer's current basis of ``p`` (``optimizer.basis(p)`` when it has one, which regenerates a
    seeded rule's basis from its own generator; else ``state["Q"]``), or None before its first step."""
    basis = getattr(optimizer, "basis", None)
    if callable(basis):
        return basis(p)
    st = optimizer.state.get(p)  # .get: the optimizer's defaultdict must not grow an entry
    return bases.load(st) if st and "Q" in st else None


def span_basis(q: Tensor) -> Tensor:
    """``q`` itself when its columns are orthonormal (to 1e-3), else an orthonormal basis of its span
    (e.g. a Gaussian projection's), so that ``||Q^T X||^2 / ||X||^2`` is a share."""
    q = q if q.dtype == torch.float32 else q.float()
    if float(orthonormality_error(q)) > 1e-3:
        return torch.linalg.qr(q)[0]
    return q


@dataclass
class _Seen:
    key: Any  # the state's Q tensor itself, or a seeded rule's seed
    raw: Tensor  # the optimizer's basis
    span: Tensor  # an orthonormal basis of its span (raw itself unless raw is not orthonormal)


class BasisWatch:
    """The basis the optimizer holds for each target, and its changes.

    The optimizer replaces ``state["Q"]`` by a new tensor at a basis update (a seeded rule replaces
    ``state["seed"]``) and never writes into it, so whether a basis changed is an identity test: no
    copy and no comparison of values except at an update. The orthonormal span is formed once per basis.
    """

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}

    def reset(self) -> None:
        self._seen = {}

    @staticmethod
    def _key(optimizer, p: Tensor) -> Any:
        st = optimizer.state.get(p)
        if not st:
            return None
        return st["Q"] if "Q" in st else st.get("seed")

    def current(self, name: str) -> Tensor | None:
        """The (orthonormal) basis last seen for ``name``."""
        seen = self._seen.get(name)
        return None if seen is None else seen.span

    def _fetch(self, optimizer, t: Target, key: Any) -> _Seen | None:
        q = key if isinstance(key, Tensor) else optimizer_basis(optimizer, t.param)
        if q is None or q.dim() != 2:
            return None
        return _Seen(key, q, span_basis(q))

    def adopt(self, optimizer, targets: list[Target]) -> list[Target]:
        """Take the optimizer's basis of the targets not seen yet (a resumed run, a hook attached mid-run)
        without reporting it as a change; returns those adopted."""
        adopted = []
        for t in targets:
            if t.name in self._seen:
                continue
            key = self._key(optimizer, t.param)
            seen = None if key is None else self._fetch(optimizer, t, key)
            if seen is not None:
                self._seen[t.name] = seen
                adopted.append(t)
        return adopted

    def changes(self, optimizer, targets: list[Target]) -> list[tuple[Target, Tensor | None, Tensor]]:
        """``(target, old, new)`` (the optimizer's bases as it holds them, e.g. not orthonormal for a Gaussian
        projection; ``old`` None for a first basis) for every target whose basis changed since the last
        call. A new key holding the same values is not a change."""
        out = []
        for t in targets:
            key = self._key(optimizer, t.param)
            if key is None:
                continue
            seen = self._seen.get(t.name)
            if seen is not None and (seen.key is key or (not isinstance(key, Tensor) and seen.key == key)):
                continue
            new = self._fetch(optimizer, t, key)
            if new is None:
                continue
            if seen is not None and torch.equal(seen.raw, new.raw):
                seen.key = key
                continue
            self._seen[t.name] = new
            out.append((t, None if seen is None else seen.raw, new.raw))
        return out


@dataclass
class _Interval:
    start: int | None  # the step whose update built the basis (None: unknown, e.g. after a resumption)
    n: int = 0
    total: Tensor | None = None
    low: Tensor | None = None
    last: Tensor | None = None
    last_step: int | None = None


class QualityTracker:
    """The per-interval capture of the next gradients by the optimizer's basis (the module docstring):
    no I/O, no host sync between basis updates (the sums stay on the device)."""

    def __init__(self) -> None:
        self._open: dict[str, _Interval] = {}

    def reset(self) -> None:
        self._open = {}

    @torch.no_grad()
    def measure(self, step: int, targets: list[Target], watch: BasisWatch) -> None:
        """Add this step's share for every target with a gradient and a basis (call before the step)."""
        for t in targets:
            q, g = watch.current(t.name), t.param.grad
            if q is None or g is None:
                continue
            x = orient(g.detach())
            if q.shape[0] != x.shape[0]:
                continue
            share = captured_share(x, q)
            share = share.to(torch.float32 if share.device.type == "mps" else torch.float64)
            iv = self._open.get(t.name)
            if iv is None:  # a basis adopted mid-run
                iv = self._open[t.name] = _Interval(start=None)
            if iv.n == 0:
                iv.total, iv.low = share.clone(), share.clone()
            else:
                iv.total.add_(share)  # type: ignore[union-attr]  # (set at the first measurement, n == 0)
                torch.minimum(iv.low, share, out=iv.low)  # type: ignore[arg-type]
            iv.n, iv.last, iv.last_step = iv.n + 1, share, step

    def switch(self, t: Target, step: int, angles: Tensor | None) -> dict[str, Any] | None:
        """The basis of ``t`` was replaced by the update of ``step``: close its interval (the record, or
        None if nothing was measured in it) and open the next."""
        iv = self._open.get(t.name)
        self._open[t.name] = _Interval(start=step)
        return None if iv is None or iv.n == 0 else self._record(t, iv, step, angles, complete=True)

    def flush(self, targets: list[Target]) -> list[dict[str, Any]]:
        """The records of the intervals still open (``complete: false``), which are then closed."""
        out = []
        for t in targets:
            iv = self._open.pop(t.name, None)
            if iv is not None and iv.n:
                out.append(self._record(t, iv, iv.last_step, None, complete=False))  # type: ignore[arg-type]  # (n > 0)
        return out

    @staticmethod
    def _record(t: Target, iv: _Interval, step: int, angles: Tensor | None, complete: bool) -> dict[str, Any]:
        return {"type": "quality", "step": step, "name": t.name, "kind": t.kind, "depth": t.depth, "rule": t.rule,
                "rank": t.rank, "interval_start": iv.start, "steps": iv.n,
                "capture_next": float(iv.total) / iv.n,  # type: ignore[arg-type]  # (n > 0)
                "capture_min": float(iv.low), "capture_last": float(iv.last),  # type: ignore[arg-type]  # (n > 0)
                "angle_max_deg": None if angles is None else math.degrees(float(angles.max())),
                "angle_mean_deg": None if angles is None else math.degrees(float(angles.mean())),
                "complete": complete}


class _RecordingHook:
    """What both hooks share: the projected targets, the basis watch (basis records and quality
    intervals), the optional quality tracker, and ``analysis.jsonl`` (fresh or resumed, appended)."""

    def __init__(self, out: str | Path | None, *, plot: bool, quality: bool, basis_records: bool,
                 strict: bool = True):
        self.out = None if out is None else Path(out)
        self.plot, self.quality, self.basis_records, self.strict = plot, quality, basis_records, strict
        self.records: list[dict[str, Any]] = []
        self.projected: list[Target] = []
        self.total: int | None = None
        self._active = True
        self._resume = False
        self._watch = BasisWatch()
        self._tracker = QualityTracker() if quality else None
        self._file: IO[str] | None = None

    def on_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any = None) -> None:
        self.projected = find_targets(model, optimizer, fallback=False)
        if self.quality and self.strict and not self.projected:
            what = type(optimizer).__name__ + ("" if cfg is None else f", preset {getattr(cfg, 'preset', None)!r}")
            raise ValueError("the subspace-quality diagnostic needs an optimizer with projected param groups (a rank "
                             f"below the matrices' short side); this optimizer projects none ({what})")
        self._active = _main_process()
        self.total = cfg.total_steps() if cfg is not None and hasattr(cfg, "total_steps") else None
        self._resume = bool(getattr(cfg, "resume", False))
        self.records = []
        self._watch.reset()
        if self._tracker is not None:
            self._tracker.reset()
        self._setup(model, optimizer, cfg)
        if self.out is not None and self._active:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self._resume:  # a fresh run starts a fresh file
                (self.out / "analysis.jsonl").unlink(missing_ok=True)

    def _setup(self, model, optimizer, cfg) -> None:
        """Subclasses: their own state at the start of a run."""

    @torch.no_grad()
    def after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self._active:
            return
        if self._resume:
            self._resume = False
            self._truncate_file(step)
        if self.basis_records or self._tracker is not None:
            self._watch.adopt(optimizer, self.projected)  # no-op but on a run's first step or a resumption
        if self._tracker is not None:
            self._tracker.measure(step, self.projected, self._watch)
        self._measure_step(step, model, optimizer)

    def _measure_step(self, step, model, optimizer) -> None:
        """Subclasses: their own measurements of this step's gradients."""

    @torch.no_grad()
    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, record: Any = None) -> None:
        if not self._active or not (self.basis_records or self._tracker is not None):
            return
        recs, moved = [], set()
        update = step - 1  # ``step`` steps are done: an update happened in step ``step - 1`` (from 0)
        for t, old, new in self._watch.changes(optimizer, self.projected):
            if old is not None and old.device.type == "mps":  # no float64 there: the angles on the host
                old, new = old.cpu(), new.cpu()
            ang = None if old is None else principal_angles(old, new)  # (re-orthonormalised in float64)
            if ang is not None and self.basis_records:
                recs.append({"type": "basis", "step": update, "name": t.name, "kind": t.kind, "depth": t.depth,
                             "angle_max_deg": math.degrees(float(ang.max())),
                             "angle_mean_deg": math.degrees(float(ang.mean()))})
            if self._tracker is not None:
                rec = self._tracker.switch(t, update, ang)
                if rec is not None:
                    recs.append(rec)
                moved.add(t.name)
        if self._tracker is not None:  # a scheduled update that kept the basis (frozen) ends its interval too
            for t in self.projected:
                if t.interval and update > 0 and update % t.interval == 0 and t.name not in moved:
                    rec = self._tracker.switch(t, update, torch.zeros(1, dtype=torch.float64))
                    if rec is not None:
                        recs.append(rec)
        self._emit(recs)

    def on_end(self, model: nn.Module, optimizer: torch.optim.Optimizer, summary: dict[str, Any] | None = None) -> None:
        if self._active and self._tracker is not None:
            self._emit(self._tracker.flush(self.projected))
        if self._file is not None:
            self._file.close()
            self._file = None
        if not (self._active and self.out is not None and self.plot):
            return
        from .report import write_outputs

        records = read_records(self.out / "analysis.jsonl") if (self.out / "analysis.jsonl").is_file() else self.records
        write_outputs(records, self.out)

    # ------------------------------------------------------------------ output
    def _emit(self, recs: list[dict[str, Any]]) -> None:
        if not recs:
            return
        self.records.extend(recs)
        if self.out is None:
            return
        if self._file is None:
            self._file = open(self.out / "analysis.jsonl", "a", encoding="utf-8")
        self._file.write("".join(json.dumps(r) + "\n" for r in recs))
        self._file.flush()

    def _truncate_file(self, step: int) -> None:
        """On resume, drop what the interrupted invocation recorded at or after ``step``, and the quality
        intervals its end left open (they continue now)."""
        if self.out is None:
            return
        path = self.out / "analysis.jsonl"
        if path.is_file():
            keep = [r for r in read_records(path)
                    if r.get("step", 0) < step and not (r.get("type") == "quality" and not r.get("complete", True))]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")

    def __del__(self):  # a run that raised: do not leak the file handle
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()


class SubspaceQuality(_RecordingHook):
    """Records, at every step and for every projected matrix, the share of the gradient's energy that
    the optimizer's current basis captures, averaged per basis interval (``type="quality"`` records;
    the module docstring). Costs one ``Q^T X`` product per projected matrix per step, and principal
    angles at basis updates.

    Args:
        out: folder for ``analysis.jsonl`` and, at the end, the plot and ``analysis.md``; None keeps
            the records in memory only (``self.records``).
        plot: write ``capture_next.png`` and ``analysis.md`` in ``on_end`` (when ``out`` is set).
        strict: raise (in ``on_start``) for an optimizer without projected param groups; False records
            nothing for it instead.
    """

    def __init__(self, out: str | Path | None = None, *, plot: bool = True, strict: bool = True):
        super().__init__(out, plot=plot, quality=True, basis_records=False, strict=strict)

    @property
    def targets(self) -> list[Target]:
        return self.projected


class SubspaceAnalyzer(_RecordingHook):
    """Records gradient-subspace diagnostics during training (see the module docstring).

    Args:
        every: record every this many steps (step 0, ``every``, ``2 every``, ... and the last one).
        out: folder for ``analysis.jsonl`` (one JSON object per line) and, at the end, the plots and
            ``analysis.md``; None keeps the records in memory only (``self.records``).
        rank: the rank ``r`` of the SVD subspace; default: each matrix's optimizer rank (or the run's
            ``cfg.rank`` for a full-rank optimizer).
        top: how many singular values of ``grad F`` to keep.
        energy_ranks: further ranks at which to record the SVD energy share (``energy_svd_at``).
        targets: matrices to analyse when the optimizer projects none (default: ``cfg.targets``).
        track_bases: record the principal angles of every basis change of the optimizer.
        quality: also record the subspace quality at every step (:class:`SubspaceQuality`'s records);
            an optimizer without projected groups is then an error.
        plot: write the PNGs and ``analysis.md`` in ``on_end`` (when ``out`` is set).
    """

    def __init__(self, every: int = 10, out: str | Path | None = None, *, rank: int | None = None, top: int = 20,
                 energy_ranks: list[int] | tuple[int, ...] = (), targets: Any = None, track_bases: bool = True,
                 quality: bool = False, plot: bool = True):
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        if rank is not None and rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        if top < 1:
            raise ValueError(f"top={top} must be >= 1")
        super().__init__(out, plot=plot, quality=quality, basis_records=track_bases)
        self.every, self.rank, self.top = int(every), rank, int(top)
        self.energy_ranks = tuple(int(r) for r in energy_ranks)
        self.targets_spec, self.track_bases = targets, track_bases
        self.targets: list[Target] = []
        self._prev_svd: dict[str, Tensor] = {}

    def _setup(self, model, optimizer, cfg) -> None:
        self.targets = find_targets(model, optimizer, rank=self.rank, spec=self.targets_spec, cfg=cfg)
        self._prev_svd = {}

    def _due(self, step: int) -> bool:
        return step % self.every == 0 or (self.total is not None and step == self.total - 1)

    def _measure_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self._due(step):
            return
        new = []
        for t in self.targets:
            g = t.param.grad
            if g is None:
                continue
            new.append(self._measure(step, t, orient(g), optimizer_basis(optimizer, t.param)))
        self._emit(new)

    def _measure(self, step: int, t: Target, x: Tensor, q: Tensor | None) -> dict[str, Any]:
        x = x.detach()
        ranks = [t.rank, *self.energy_ranks]
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        total = float(s.square().sum())
        shares = shares_from_singular_values(s, ranks).tolist()
        u_r = u[:, :t.rank]
        rec: dict[str, Any] = {"type": "grad", "step": step, "name": t.name, "kind": t.kind, "depth": t.depth,
                               "shape": list(t.param.shape), "rank": t.rank, "grad_norm": math.sqrt(total),
                               "energy_svd": shares[0]}
        if self.energy_ranks:
            rec["energy_svd_at"] = {str(r): v for r, v in zip(self.energy_ranks, shares[1:])}
        basis, source = None, None
        if q is not None and q.dim() == 2 and q.shape[0] == x.shape[0]:
            basis, source = span_basis(q.to(x.dtype)), "optimizer"
            rec["energy_basis"] = float(captured_share(x, basis))
        else:
            rec["energy_basis"] = None
            if t.name in self._prev_svd:
                basis, source = self._prev_svd[t.name], "previous_svd"
        rec["basis_source"] = source
        if basis is not None:
            sv = derivative_spectrum(x, basis, self.top)
            rec["df_sv"] = sv.tolist()
            rec["df_sv_rel"] = (sv / total).tolist() if total > 0 else [0.0] * sv.numel()
        else:
            rec["df_sv"] = rec["df_sv_rel"] = None
        prev = self._prev_svd.get(t.name)
        if prev is not None:
            ang = principal_angles(prev, u_r)
            rec["svd_drift_max_deg"] = math.degrees(float(ang.max()))
            rec["svd_drift_mean_deg"] = math.degrees(float(ang.mean()))
        else:
            rec["svd_drift_max_deg"] = rec["svd_drift_mean_deg"] = None
        self._prev_svd[t.name] = u_r.clone()
        return rec
