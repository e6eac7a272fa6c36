"""Checkpoints: written atomically, loaded with ``weights_only=True``, with every random state.

A checkpoint is one ``torch.save`` of a dict of tensors and plain values (model, optimizer,
scheduler, sampler, counters, config, RNG states). :func:`save_checkpoint` writes it to a temporary
file in the same folder (``.ckpt-*.tmp``), flushes it to disk and renames it over the target, so a
crash never leaves a half-written checkpoint; :func:`load_checkpoint` turns every way a file can be
unusable into a :class:`CheckpointError` that says what to do.

Digest. The SHA-256 of the bytes written (hashed while writing) goes to ``<checkpoint>.sha256``
beside it, and :func:`load_checkpoint` verifies it, so a checkpoint damaged on disk after it was
written (a bad sector, a partial copy) is refused instead of loaded. The digest file lists the new
digest and the previous one while the checkpoint is being replaced, so a crash between the two
renames leaves a pair that still verifies. A checkpoint without a digest file (written before
digests existed, or copied alone) loads unverified.

:func:`rng_state` / :func:`set_rng_state` capture and restore every generator a step may draw
from: torch's CPU generator, the accelerator's (CUDA, XPU, MPS, ... of the run's device), numpy's
global one and Python's ``random``, as plain tensors and values.

:class:`Checkpointer` is what a loop holds: the path, the run kind, and ``save``/``load``. Checks
that belong to a checkpoint file (a digest verified on load, cleaning stale temporary files) go
here; those that belong to the run folder (a lock, refusing to overwrite another run) go in
:class:`grassopt.engine.run.RunFolder`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "Checkpointer", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state",
           "digest_path", "file_sha256", "FORMAT", "REQUIRED_KEYS"]

#: The checkpoint format this code writes (and the only one it reads).
FORMAT = 1
#: Fields every training checkpoint holds.
REQUIRED_KEYS = ("format", "config", "step", "model", "optimizer", "scheduler", "sampler", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or from another run."""


class _HashingWriter:
    """A file wrapper that hashes what is written through it."""

    def __init__(self, f: Any):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None  # a failed write (torch.save reports it as "unexpected pos")

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def digest_path(path: str | os.PathLike) -> Path:
    """Where the digest of the checkpoint ``path`` is kept."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _read_digests(path: Path) -> list[str] | None:
    try:
        return list(json.loads(digest_path(path).read_text())["sha256"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{digest_path(path)} is not a readable digest file ({e}); delete it to load "
                              f"{path} unverified") from e


def _write_json_atomically(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` with ``torch.save`` atomically: a temporary file in the same folder,
    flushed to disk, then renamed over ``path``; a crash never leaves a half-written checkpoint.
    Its SHA-256 goes to ``<path>.sha256`` (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            try:
                torch.save(payload, writer)  # type: ignore[arg-type]  # (a binary file-like object)
            except RuntimeError:
                if writer.error is not None:  # torch's writer swallows the OSError of a full disk
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        new = writer.sha256.hexdigest()
        try:
            old = (_read_digests(path) or [])[:1] if path.is_file() else []
        except CheckpointError:
            old = []
        _write_json_atomically(digest_path(path), {"sha256": [new, *old]})  # both verify during the swap
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _write_json_atomically(digest_path(path), {"sha256": [new]})


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True``; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; start without --resume, or point --out at the run to resume")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt: {type(e).__name__}: {str(e)[:200]}); "
            "delete it to start over, or resume from an intact copy") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a grassopt training checkpoint (missing fields); "
                              "was it written by `grassopt train`?")
    digests = _read_digests(path)
    if digests is not None and file_sha256(path) not in digests:
        raise CheckpointError(f"{path} does not match its digest ({digest_path(path).name}): it was damaged or "
                              "replaced after it was written; resume from an intact copy, or delete both files to "
                              "start over")
    return ckpt


# ---------------------------------------------------------------------------------------- random states
def _accelerator(device: torch.device | str | None):
    """The torch module of ``device``'s generator (``torch.cuda``, ``torch.xpu``, ``torch.mps``...), or None."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return None
    mod = getattr(torch, device.type, None)
    return mod if callable(getattr(mod, "get_rng_state", None)) else None


def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Every random state a training step may draw from, as tensors and plain values (loadable with
    ``weights_only=True``): ``cpu`` (torch), the accelerator of ``device`` under its type
    (``cuda``, ...), ``numpy`` and ``python``."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    acc = _accelerator(device)
    if acc is not None:
        dev = torch.device(device)  # type: ignore[arg-type]  # (not None: it has an accelerator)
        state[dev.type] = acc.get_rng_state(dev) if dev.type == "cuda" else acc.get_rng_state()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        pass
    else:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # (get_state() gives its legacy tuple form by default)
        state["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")),  # type: ignore[attr-defined]
                          "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    version, internal, gauss_next = random.getstate()
    state["python"] = {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Restore what :func:`rng_state` captured (a state it does not hold is left as it is, so older
    checkpoints, which saved only some generators, still load)."""
    torch.set_rng_state(state["cpu"])
    acc = _accelerator(device)
    if acc is not None and torch.device(device).type in state:  # type: ignore[arg-type]  # (acc: device is set)
        dev = torch.device(device)  # type: ignore[arg-type]
        if dev.type == "cuda":
            acc.set_rng_state(state[dev.type], dev)
        else:
            acc.set_rng_state(state[dev.type])
    if "numpy" in state:
        import numpy as np
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype("uint32"), int(s["pos"]), int(s["has_gauss"]),
                             float(s["gauss"])))
    if "python" in state:
        s = state["python"]
        random.setstate((int(s["version"]), tuple(int(x) for x in s["state"].tolist()), s["gauss_next"]))


# ---------------------------------------------------------------------------------------- a run's checkpoint
class Checkpointer:
    """The checkpoint of one run: ``path`` (``<run folder>/checkpoint.pt``), the run ``kind``
    (``"finetune"``, or None for ``grassopt train``, whose checkpoints carry no kind), and the
    ``device`` whose generator is saved with the others.

    ``save(state)`` adds the format, the kind and the random states and writes atomically (a write
    that fails, e.g. on a full disk, leaves the previous checkpoint as it was and raises a
    :class:`CheckpointError` saying so);
    ``load()`` reads it back, refusing a checkpoint of another kind; ``restore_rng(ckpt)`` puts the
    random states back (call it last, after everything that builds the run has drawn its numbers).
    """

    def __init__(self, path: str | os.PathLike, kind: str | None = None, device: torch.device | str | None = None,
                 main_process: bool = True):
        self.path = Path(path)
        self.kind = kind
        self.device = device
        self.main_process = main_process

    def exists(self) -> bool:
        return self.path.is_file()

    def model_state(self, model: torch.nn.Module) -> dict[str, Any]:
        """What a checkpoint holds of ``model`` (its ``state_dict``; the sharded checkpointer's: the shards)."""
        return model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> Any:
        return optimizer.state_dict()

    def load_model(self, model: torch.nn.Module, ckpt: dict[str, Any]) -> None:
        model.load_state_dict(ckpt["model"])

    def load_optimizer(self, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any]) -> None:
        optimizer.load_state_dict(ckpt["optimizer"])

    def save(self, state: dict[str, Any], rng: dict[str, Any] | None = None) -> None:
        """Write ``state`` (model, optimizer, ... and counters) with the format, kind and random states
        (``rng``: states captured earlier with :func:`rng_state`; default: the current ones). Only the
        main process writes (under DDP every rank holds the same numbers)."""
        if not self.main_process:
            return
        payload: dict[str, Any] = {"format": FORMAT}
        if self.kind is not None:
            payload["kind"] = self.kind
        payload.update(state)
        payload["rng"] = rng_state(self.device) if rng is None else rng
        had = self.path.is_file()
        try:
            save_checkpoint(self.path, payload)
        except OSError as e:  # a full disk, a file-size limit, a folder removed under the run
            kept = ("the previous checkpoint is intact: free space (or raise the limit), then continue with --resume"
                    if had else "no checkpoint was written: free space (or raise the limit) and run again")
            raise CheckpointError(f"could not write the checkpoint {self.path} ({e.strerror or e}); {kept}") from None

    def load(self) -> dict[str, Any]:
        ckpt = load_checkpoint(self.path)
        if ckpt.get("kind") != self.kind:
            what = f"`grassopt {self.kind}`" if self.kind else "`grassopt train`"
            raise CheckpointError(f"{self.path} is not a {what} checkpoint")
        return ckpt

    def restore_rng(self, ckpt: dict[str, Any]) -> None:
        set_rng_state(ckpt["rng"], self.device)
