"""The run folder: what a training run writes beside its checkpoint, and the resume check.

``<out>/config.json`` (the settings), ``<out>/metrics.jsonl`` (one JSON line per logged or
evaluated step, appended as the run goes), ``<out>/summary.json`` (written at the end),
``<out>/checkpoint.pt`` (:class:`grassopt.engine.checkpoint.Checkpointer`) and whatever the
application adds (``loss.png``, ``task.md``). Under DDP only the main process writes.

:func:`config_differences` compares a saved config with the one of a resumed run, counting a key
the saved one lacks (a field added since) as that field's default, and ignoring the fields that
only control the run (``out``, ``stop_after``, ``progress``, ...); :meth:`RunFolder.check_resume`
turns a difference into a :class:`CheckpointError`.

Safety of the folder: :meth:`RunFolder.open`, which every loop calls first, takes an exclusive
lock on ``<out>/.lock`` for as long as the run uses the folder (a second run in the same folder,
in this process or another, is refused at once instead of interleaving its files with the first),
removes the temporary files a killed checkpoint writer left behind (``.ckpt-*.tmp``), and refuses
to start a fresh run over the checkpoint of another run unless told to ``overwrite`` it (the
choice is then ``--resume`` or ``--overwrite``, never a silent loss). With ``overwrite``, the old
run is kept aside, not deleted: when the new run starts writing (:meth:`RunFolder.start`, so a run
that fails while it is being set up moves nothing), everything the folder holds but the lock and
earlier ``previous-*`` folders is moved into ``<out>/previous-<YYYYmmdd-HHMMSS>/``; once that move
succeeded, older ``previous-*`` folders are deleted, so that at most :data:`KEEP_PREVIOUS` (the latest
old run) stay however often the folder is overwritten.
:meth:`RunFolder.close` releases the lock (``with RunFolder(...) as folder:`` does both); a folder
that the run created and never wrote to is removed again, so a refused run leaves nothing behind.
A folder that cannot be created (a regular file in its path, no permission) is a
:class:`RunFolderError` naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .checkpoint import Checkpointer, CheckpointError

__all__ = ["RunFolder", "RunFolderError", "KEEP_PREVIOUS", "config_differences", "append_metric", "read_metrics",
           "write_metrics"]

#: How many ``previous-*`` folders (old runs set aside by ``--overwrite``) a run folder keeps: the latest.
KEEP_PREVIOUS = 1


class RunFolderError(ValueError):
    """The run folder cannot be used: another run holds it, or it holds another run's checkpoint."""


def config_differences(saved: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any] | None = None,
                       ignore: Iterable[str] = ()) -> list[str]:
    """The settings in which ``now`` differs from a ``saved`` config (a key missing from ``saved``,
    written before the field existed, counts as that field's value in ``defaults``)."""
    defaults, ignore = defaults or {}, set(ignore)
    return [f"{k}: checkpoint {saved.get(k, defaults.get(k))!r} vs now {v!r}" for k, v in now.items()
            if k not in ignore and saved.get(k, defaults.get(k)) != v]


def append_metric(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """The metric lines of steps ``<= upto`` (those a resumed run keeps); unreadable lines are skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if rec.get("step", 0) <= upto:
                out.append(rec)
    return out


class RunFolder:
    """One run's folder (``path``) and the files in it.

    ``main_process``: False on the other ranks of a DDP run, which write nothing. ``kind`` names the
    run's checkpoints (see :class:`~grassopt.engine.checkpoint.Checkpointer`). ``ignore`` are the
    config fields a resumed run may change, ``defaults`` the config of a run with no settings given.
    """

    def __init__(self, path: str | os.PathLike, *, main_process: bool = True, kind: str | None = None,
                 device: Any = None, ignore: Iterable[str] = (), defaults: dict[str, Any] | None = None,
                 sharded: bool = False):
        self.path = Path(path)
        self.main_process = main_process
        self.ignore = frozenset(ignore)
        self.defaults = dict(defaults or {})
        self.checkpointer: Checkpointer
        if sharded:  # FSDP2: torch.distributed.checkpoint, every rank writing its shards
            from .sharded import ShardedCheckpointer
            self.checkpointer = ShardedCheckpointer(self.path, kind=kind, device=device, main_process=main_process)
        else:
            self.checkpointer = Checkpointer(self.path / "checkpoint.pt", kind=kind, device=device,
                                             main_process=main_process)
        self._lock: Any = None
        self._created: Path | None = None  # the topmost folder acquire() created (removed again if left empty)
        self._replace = False  # overwrite: move the old run aside when this one starts writing
        self.previous: Path | None = None  # where the old run was moved

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    # -------------------------------------------------------------- starting and resuming
    def open(self, resume: bool, config: dict[str, Any], overwrite: bool = False,
             saved_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """Start using the folder (see the module doc): lock it, clean stale temporary files, then with
        ``resume`` load the checkpoint and check that ``config`` matches the one it was written with
        (``saved_config(checkpoint)``, when given, is that config as this run reads it, e.g. a per-process
        setting of a run resumed by another number of processes; returns the checkpoint); without, refuse
        a folder that holds a checkpoint unless ``overwrite`` (returns None). On an error the lock is
        released again."""
        self.acquire()
        try:
            self.clean_stale_files()
            if resume:
                other = None if self.checkpointer.exists() else self.held_checkpoint()
                if other is not None:  # the other layout: a run with (or without) --fsdp
                    sharded = other == "checkpoint.dcp"
                    raise CheckpointError(
                        f"{self.path} holds {other}, the checkpoint of a run {'with' if sharded else 'without'} "
                        f"--fsdp; resume it {'with' if sharded else 'without'} --fsdp (the other settings as they were)")
                ckpt = self.checkpointer.load()
                self.check_resume(saved_config(ckpt) if saved_config else ckpt["config"], config)
                return ckpt
            held = self.held_checkpoint()
            if held is not None and self.main_process:
                if not overwrite:
                    raise RunFolderError(
                        f"{self.path} holds the checkpoint of another run ({held}); continue "
                        "it with --resume, start over with --overwrite (the old run is then moved to "
                        f"{self.path}/previous-<time>/), or choose another --out folder")
                self._replace = True
            return None
        except BaseException:
            self.close()
            raise

    def held_checkpoint(self) -> str | None:
        """The name of the checkpoint the folder holds, of either layout (``checkpoint.pt``, or an FSDP2 run's
        ``checkpoint.dcp``), or None: a run of one layout never starts over the other's."""
        if self.checkpointer.exists():
            return self.checkpointer.path.name
        for name in ("checkpoint.pt", "checkpoint.dcp"):
            if (self.path / name).is_file() or (self.path / name).is_symlink():
                return name
        return None

    def acquire(self) -> None:
        """Take the folder's exclusive lock (main process only; a no-op where ``fcntl`` is missing)."""
        if not self.main_process or self._lock is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            return
        created = next((p for p in reversed([self.path, *self.path.parents]) if not p.exists()), None)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            f = open(self.path / ".lock", "a+", encoding="utf-8")
        except OSError as e:
            self._created = created
            self._remove_if_unused()
            raise RunFolderError(f"cannot use {self.path} as the run folder ({e.strerror or e}); choose another "
                                 "--out folder") from None
        self._created = created
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            self._created = None  # the other run's folder
            raise RunFolderError(f"{self.path} is in use by another run ({holder}); wait for it to finish, or "
                                 "choose another --out folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} ({' '.join(sys.argv[:1])})\n")
        f.flush()
        self._lock = f

    def close(self) -> None:
        """Release the lock (the lock file stays; it holds nothing once released). A folder this run
        created and never wrote to (a run refused while it was being set up) is removed."""
        if self._lock is not None:
            self._remove_if_unused(locked=True)
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    def _remove_if_unused(self, locked: bool = False) -> None:
        """Remove the folders :meth:`acquire` created if nothing but the lock file was put in them."""
        top, self._created = self._created, None
        if top is None or not self.path.is_dir():
            return
        if any(p.name != ".lock" for p in self.path.iterdir()):
            return
        if locked:
            with contextlib.suppress(FileNotFoundError):
                (self.path / ".lock").unlink()  # while still holding it: no other run can be using it
        for d in [self.path, *self.path.parents]:
            try:
                d.rmdir()
            except OSError:
                return
            if d == top:
                return

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def clean_stale_files(self) -> list[Path]:
        """Remove the temporary files of checkpoint writes that never finished (a killed process). Only
        safe while holding the lock: nobody else is writing then. Returns what was removed."""
        if not self.main_process or not self.path.is_dir():
            return []
        from .sharded import stale_paths
        stale = sorted([*self.path.glob(".ckpt-*.tmp"), *stale_paths(self.path)])
        for p in stale:
            if p.is_dir() and not p.is_symlink():  # a sharded checkpoint's folder
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return stale

    def check_resume(self, saved: dict[str, Any], config: dict[str, Any]) -> None:
        diffs = config_differences(saved, config, self.defaults, self.ignore)
        if diffs:
            raise CheckpointError(f"{self.checkpointer.path} was written by a run with other settings "
                                  f"({'; '.join(diffs)}); resume with the same settings, or start a new run in "
                                  "another --out folder")

    def start(self, config: dict[str, Any], history: list[dict[str, Any]], files: dict[str, str] | None = None) -> None:
        """Create the folder and write ``config.json``, the metric lines kept so far (``history``, on
        resume) and any other ``files`` (name -> text)."""
        if not self.main_process:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._created = None  # the run writes here from now on: the folder stays
        if self._replace:
            self.previous = self.keep_aside()
            self._replace = False
        (self.path / "config.json").write_text(json.dumps(config, indent=2))
        for name, text in (files or {}).items():
            (self.path / name).write_text(text)
        write_metrics(self.metrics_path, history)

    def keep_aside(self) -> Path | None:
        """Move the old run (everything in the folder but the lock and earlier ``previous-*`` folders) into a
        new ``previous-<YYYYmmdd-HHMMSS>`` folder inside it, then delete the earlier ones beyond
        :data:`KEEP_PREVIOUS` (:meth:`prune_previous`); returns that folder (None if there was nothing,
        and then nothing is deleted)."""
        old = [p for p in self.path.iterdir() if p.name != ".lock" and not p.name.startswith("previous-")]
        if not old:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = self.path / f"previous-{stamp}", 1
        while dest.exists():
            dest, n = self.path / f"previous-{stamp}-{n}", n + 1
        dest.mkdir()
        for p in sorted(old, key=lambda q: q.name.startswith(("checkpoint.pt", "checkpoint.dcp"))):  # the checkpoint last
            os.replace(p, dest / p.name)
        print(f"{self.path}: the previous run (checkpoint, metrics, ...) was moved to {dest}", file=sys.stderr)
        self.prune_previous(keep=dest)
        return dest

    def prune_previous(self, keep: Path) -> list[Path]:
        """Delete the ``previous-*`` folders older than the latest :data:`KEEP_PREVIOUS` (``keep``, the
        one just set aside, always stays); called only once the new set-aside succeeded. A folder that
        cannot be deleted is left with a warning (the run goes on). Returns what was deleted."""
        def age(p: Path) -> tuple[str, int]:  # previous-<stamp>[-<n>]: by stamp, then n (newest last)
            m = re.fullmatch(r"previous-(\d{8}-\d{6})(?:-(\d+))?", p.name)
            return (m.group(1), int(m.group(2) or 0)) if m else ("", 0)

        others = sorted((p for p in self.path.iterdir()
                         if p.name.startswith("previous-") and p.is_dir() and not p.is_symlink() and p != keep),
                        key=age)
        doomed = others[:max(0, len(others) - (KEEP_PREVIOUS - 1))]
        removed = []
        for p in doomed:
            try:
                shutil.rmtree(p)
            except OSError as e:
                print(f"{self.path}: could not delete the older run {p} ({e.strerror or e}); delete it by hand",
                      file=sys.stderr)
            else:
                removed.append(p)
        if removed:
            print(f"{self.path}: deleted {len(removed)} older previous-* folder(s) (only the latest "
                  f"{KEEP_PREVIOUS} is kept): {', '.join(p.name for p in removed)}", file=sys.stderr)
        return removed

    def history(self, upto: int) -> list[dict[str, Any]]:
        """The metric lines a run resumed at step ``upto`` keeps."""
        return read_metrics(self.metrics_path, upto)

    # -------------------------------------------------------------- while running and at the end
    def log(self, record: dict[str, Any]) -> None:
        if self.main_process:
            append_metric(self.metrics_path, record)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.main_process:
            (self.path / "summary.json").write_text(json.dumps(summary, indent=2))
