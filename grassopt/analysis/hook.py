"""``SubspaceAnalyzer``: a training hook that records gradient-subspace diagnostics.

Pass it to :func:`grassopt.train.loop.train` (``hooks=[SubspaceAnalyzer(every=10, out=...)]``) or
call its methods from your own loop (``on_start`` once, ``after_backward`` when the gradients are
complete, ``after_step`` after ``optimizer.step()``, ``on_end`` at the end). For every projected
matrix (the optimizer's param groups with a ``rank``; for a full-rank optimizer, the matrices
``targets`` selects) it records, every ``every`` steps and at the last step:

- ``energy_svd``: the share of ``||G||_F^2`` captured by the best rank-``r`` subspace of ``G``;
- ``energy_basis``: the share captured by the optimizer's current basis ``Q`` (the one this step's
  gradient will be projected on, unless the step updates it);
- ``df_sv``: the top singular values of the derivative of the subspace estimation error,
  ``grad F = -2 E A^T`` (docs/algorithms.md#track), at the optimizer's basis (or, for a full-rank optimizer,
  at the rank-``r`` SVD basis of the previous recorded gradient: the basis GaLore would hold), and
  ``df_sv_rel = df_sv / ||G||_F^2`` (scale-free, in ``[0, 1]``: the ``normalized`` step of ``track``);
- ``svd_drift_max_deg`` / ``svd_drift_mean_deg``: principal angles between the rank-``r`` SVD
  subspaces of this gradient and of the previous recorded one;

and at every basis change of the optimizer (``kind="basis"``), the largest and mean principal
angles between the old and the new basis. Gradients are those the optimizer will see, before
gradient clipping (clipping is one global factor: it changes ``df_sv``, not the shares or angles).

A resumed run (``cfg.resume``) appends to ``analysis.jsonl`` after dropping what the interrupted
invocation wrote from the resumed step on; the first record after the resumption has no SVD drift
(the previous SVD basis is not checkpointed), and a basis update in the very first resumed step is
not seen as one.

The hook does not disturb the run: it reads gradients and optimizer state without changing them,
never touches the global RNG, and keeps only references to bases the optimizer has already
replaced (one ``d x r`` basis per matrix) and the previous rank-``r`` SVD basis (another).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..linalg import orient, orthonormality_error
from .metrics import (basis_energy_share, derivative_spectrum, layer_depth, layer_kind, principal_angles,
                      shares_from_singular_values)

__all__ = ["SubspaceAnalyzer", "Target", "read_records"]


@dataclass
class Target:
    """One matrix under analysis."""

    name: str
    param: Tensor
    rank: int
    kind: str
    depth: int | None


def _main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of an ``analysis.jsonl`` (unreadable lines, e.g. a torn last line, are skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class SubspaceAnalyzer:
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
        plot: write the PNGs and ``analysis.md`` in ``on_end`` (when ``out`` is set).
    """

    def __init__(self, every: int = 10, out: str | Path | None = None, *, rank: int | None = None, top: int = 20,
                 energy_ranks: list[int] | tuple[int, ...] = (), targets: Any = None, track_bases: bool = True,
                 plot: bool = True):
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        if rank is not None and rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        if top < 1:
            raise ValueError(f"top={top} must be >= 1")
        self.every, self.rank, self.top = int(every), rank, int(top)
        self.energy_ranks = tuple(int(r) for r in energy_ranks)
        self.out = None if out is None else Path(out)
        self.targets_spec, self.track_bases, self.plot = targets, track_bases, plot
        self.records: list[dict[str, Any]] = []
        self.targets: list[Target] = []
        self.total: int | None = None
        self._active = True
        self._resume = False
        self._prev_svd: dict[str, Tensor] = {}
        self._seen_basis: dict[str, tuple[Any, Tensor]] = {}  # name -> (identity key, basis)
        self._file = None

    # ------------------------------------------------------------------ setup
    def on_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any = None) -> None:
        self._active = _main_process()
        self.total = cfg.total_steps() if cfg is not None and hasattr(cfg, "total_steps") else None
        self._resume = bool(getattr(cfg, "resume", False))
        self.targets = self._find_targets(model, optimizer, cfg)
        self.records, self._prev_svd, self._seen_basis = [], {}, {}
        if self.out is not None and self._active:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self._resume:  # a fresh run starts a fresh file
                (self.out / "analysis.jsonl").unlink(missing_ok=True)

    def _find_targets(self, model: nn.Module, optimizer, cfg) -> list[Target]:
        names = {id(p): n for n, p in model.named_parameters()}
        found: list[tuple[str, Tensor, int]] = []
        for group in optimizer.param_groups:
            if group.get("rank") is None:
                continue
            gnames = group.get("param_names") or [names.get(id(p), f"param{i}") for i, p in enumerate(group["params"])]
            found += [(n, p, int(group["rank"])) for n, p in zip(gnames, group["params"]) if p.dim() == 2]
        if not found:  # a full-rank optimizer: analyse the matrices the targets select, at the run's rank
            from ..presets import select_targets

            spec = self.targets_spec or (getattr(cfg, "targets", None) or "all-linear")
            default_rank = self.rank or getattr(cfg, "rank", None) or 64
            for mname, mod in select_targets(model, spec):
                found.append((f"{mname}.weight", mod.weight, default_rank))
        out = []
        for name, p, r in found:
            r = self.rank or r
            if r >= min(p.shape):
                continue
            out.append(Target(name, p, r, layer_kind(name), layer_depth(name)))
        return out

    # ------------------------------------------------------------------ the hooks
    def _due(self, step: int) -> bool:
        return step % self.every == 0 or (self.total is not None and step == self.total - 1)

    @torch.no_grad()
    def after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self._active:
            return
        if self._resume:
            self._resume = False
            self._truncate_file(step)
        if not self._due(step):
            return
        new = []
        for t in self.targets:
            g = t.param.grad
            if g is None:
                continue
            new.append(self._measure(step, t, orient(g), self._optimizer_basis(optimizer, t.param)))
        self._emit(new)

    @torch.no_grad()
    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, record: Any = None) -> None:
        if not (self._active and self.track_bases):
            return
        events = []
        for t in self.targets:
            st = optimizer.state.get(t.param)  # .get: the optimizer's defaultdict must not grow an entry
            if not st:
                continue
            if "Q" in st:
                key = st["Q"]
            elif "seed" in st:
                key = st["seed"]
            else:
                continue
            seen = self._seen_basis.get(t.name)
            if seen is not None and (seen[0] is key or (not isinstance(key, Tensor) and seen[0] == key)):
                continue
            q = key if isinstance(key, Tensor) else self._optimizer_basis(optimizer, t.param)
            if q is None:
                continue
            if seen is not None and not torch.equal(seen[1], q):
                ang = principal_angles(seen[1], q)
                events.append({"type": "basis", "step": step - 1, "name": t.name, "kind": t.kind, "depth": t.depth,
                               "angle_max_deg": math.degrees(float(ang.max())),
                               "angle_mean_deg": math.degrees(float(ang.mean()))})
            self._seen_basis[t.name] = (key, q)
        self._emit(events)

    def on_end(self, model: nn.Module, optimizer: torch.optim.Optimizer, summary: dict[str, Any] | None = None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not (self._active and self.out is not None and self.plot):
            return
        from .report import write_outputs

        records = read_records(self.out / "analysis.jsonl") if (self.out / "analysis.jsonl").is_file() else self.records
        write_outputs(records, self.out)

    # ------------------------------------------------------------------ measurements
    @staticmethod
    def _optimizer_basis(optimizer, p: Tensor) -> Tensor | None:
        st = optimizer.state.get(p)
        if not st:
            return None
        q = st.get("Q")
        if q is None and "seed" in st and callable(getattr(optimizer, "basis", None)):
            q = optimizer.basis(p)  # a seeded rule regenerates its basis from its own generator
        return q

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
            basis, source = q.to(x.dtype), "optimizer"
            if float(orthonormality_error(basis)) > 1e-3:  # e.g. a Gaussian projection: measure its span
                basis = torch.linalg.qr(basis)[0]
            rec["energy_basis"] = basis_energy_share(x, basis)
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
        """On resume, drop what the interrupted invocation recorded at or after ``step``."""
        if self.out is None:
            return
        path = self.out / "analysis.jsonl"
        if path.is_file():
            keep = [r for r in read_records(path) if r.get("step", 0) < step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")

    def __del__(self):  # a run that raised: do not leak the file handle
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()
