"""Sharded checkpoints of FSDP2 runs (``grassopt train --fsdp``): ``torch.distributed.checkpoint`` (DCP)
under the run folder's rules.

Layout: ``<out>/checkpoint.dcp`` is a relative symbolic link to the folder of the latest complete
checkpoint, ``<out>/checkpoint-step<N>.dcp/``, which holds

* DCP's files: ``__<rank>_0.distcp``, one per rank, each written by its rank (the model's and the AdamW
  state's shards of that rank, the rank's own generators; a replicated tensor, such as a projected
  matrix's basis and low-rank moments, is written once, by one rank) and ``.metadata``;
* ``meta.pt`` (rank 0, ``torch.save``, loadable with ``weights_only=True``): the config, step, counters,
  scheduler, data position (the sampler, the same on every rank), the optimizer's step counts and param
  groups, the world size, and every rank's random states (gathered);
* ``SHA256SUMS.json``: the SHA-256 of every file above.

Atomic completion: everything is written into ``<out>/.ckpt-step<N>.tmp/``, synced, digested, then
renamed to ``checkpoint-step<N>.dcp`` and the link is replaced by an atomic rename; older checkpoint
folders are deleted after that. A crash leaves the previous link and its folder intact, and the leftovers
(``.ckpt-*.tmp``, unlinked ``checkpoint-*.dcp``) are removed when the folder is next opened
(:meth:`grassopt.engine.run.RunFolder.clean_stale_files`).

Loading verifies every file against ``SHA256SUMS.json`` (rank 0 reads them; every rank gets the verdict,
as every rank gets any rank's failure to write)
and refuses a damaged or missing shard with one line naming the file. A run resumed by another number of
processes re-shards the model and the AdamW state (DCP reads the pieces each new shard needs); the
random states of rank ``r`` go to rank ``r`` (rank 0's to ranks the old run did not have).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._dtensor import is_dtensor
from ..distributed import rank_and_world
from .checkpoint import FORMAT, REQUIRED_KEYS, Checkpointer, CheckpointError, file_sha256, rng_state, set_rng_state

__all__ = ["ShardedCheckpointer", "LINK", "DIGESTS", "META", "stale_paths"]

#: The link to the latest complete sharded checkpoint, in the run folder.
LINK = "checkpoint.dcp"
#: The digest file and the replicated part, in a checkpoint's folder.
DIGESTS = "SHA256SUMS.json"
META = "meta.pt"
_FOLDER = re.compile(r"checkpoint-step\d+(-\d+)?\.dcp")


def stale_paths(folder: Path) -> list[Path]:
    """The leftovers of sharded checkpoint writes that never completed in the run ``folder``: checkpoint
    folders the link does not point to (a crash between the rename and the link)."""
    link = folder / LINK
    target = (folder / os.readlink(link)).name if link.is_symlink() else None
    return [p for p in folder.iterdir() if _FOLDER.fullmatch(p.name) and p.is_dir() and p.name != target]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # (not every filesystem lets a folder be opened)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _agree(error: str | None) -> None:
    """Every rank's verdict (an error message, or None) on every rank: the first error (by rank) is raised
    everywhere as a CheckpointError, so all ranks go on, or stop, together."""
    _, world = rank_and_world()
    if world > 1:
        verdicts: list[str | None] = [None] * world
        dist.all_gather_object(verdicts, error)
        error = next((v for v in verdicts if v is not None), None)
    if error is not None:
        raise CheckpointError(error)


def _cause(e: BaseException) -> BaseException:
    """The error of the first failing rank inside DCP's ``CheckpointException`` (an ``OSError`` of a full
    disk, ...), or ``e``."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        first = first[0] if isinstance(first, tuple) else first
        if isinstance(first, BaseException):
            return first
    return e


# ---------------------------------------------------------------------------------------- optimizer state
def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, rest)`` of any optimizer: FSDPSubspaceAdamW's own sharded form, else (torch's AdamW on
    DTensors) its state's tensors, DTensors and replicated ones, by ``state/<index>/<key>``."""
    sharded = getattr(opt, "sharded_state_dict", None)
    if callable(sharded):
        return sharded()
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    rest: dict[int, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        rest[i] = {k: v for k, v in st.items() if not isinstance(v, Tensor)}
        tensors.update({f"state/{i}/{k}": v for k, v in st.items() if isinstance(v, Tensor)})
    return tensors, {"state": rest, "param_groups": sd["param_groups"]}


def _optimizer_template(opt: torch.optim.Optimizer, saved: dict[str, tuple[tuple[int, ...], torch.dtype]],
                        saved_world: int) -> dict[str, Tensor]:
    template = getattr(opt, "sharded_template", None)
    if callable(template):
        return template(saved, saved_world)
    from torch.distributed.tensor import empty as dt_empty

    params = [p for g in opt.param_groups for p in g["params"]]
    out: dict[str, Tensor] = {}
    for key, (shape, dtype) in saved.items():
        p = params[int(key.split("/")[1])]
        if is_dtensor(p) and tuple(shape) == tuple(p.shape):
            out[key] = dt_empty(*shape, dtype=dtype, device_mesh=p.device_mesh, placements=p.placements)
        else:
            device = p.to_local().device if is_dtensor(p) else p.device
            out[key] = torch.empty(shape, dtype=dtype, device=device if shape else torch.device("cpu"))
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], rest: dict[str, Any],
                    saved_world: int) -> None:
    load = getattr(opt, "load_sharded_state_dict", None)
    if callable(load):
        load(tensors, rest, saved_world)
        return
    state: dict[int, dict[str, Any]] = {int(i): dict(st) for i, st in rest["state"].items()}
    for key, v in tensors.items():
        _, i, k = key.split("/")
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


# ---------------------------------------------------------------------------------------- the checkpointer
class ShardedCheckpointer(Checkpointer):
    """The sharded checkpoint of an FSDP2 run in ``folder`` (see the module doc): the interface of
    :class:`~grassopt.engine.checkpoint.Checkpointer`, every method a collective (call it on every rank)."""

    def __init__(self, folder: str | os.PathLike, kind: str | None = None, device: torch.device | str | None = None,
                 main_process: bool = True):
        super().__init__(Path(folder) / LINK, kind=kind, device=device, main_process=main_process)
        self.folder = Path(folder)
        self._loaded: Path | None = None  # the checkpoint folder load() read

    def exists(self) -> bool:
        return self.path.is_symlink() or self.path.exists()

    # -------------------------------------------------------------- what is saved
    def model_state(self, model: nn.Module) -> dict[str, Any]:
        return model.state_dict()  # FSDP2: DTensors, each rank's shards

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> Any:
        return _optimizer_state(optimizer)

    # -------------------------------------------------------------- saving
    def save(self, state: dict[str, Any], rng: dict[str, Any] | None = None) -> None:
        import torch.distributed.checkpoint as dcp

        rank, world = rank_and_world()
        rngs: list[Any] = [None] * world
        mine = rng_state(self.device) if rng is None else rng
        if world > 1:
            dist.all_gather_object(rngs, mine)
        else:
            rngs = [mine]
        opt_tensors, opt_rest = state["optimizer"]
        tensors = {**{f"model/{k}": v for k, v in state["model"].items()},
                   **{f"optimizer/{k}": v for k, v in opt_tensors.items()}}
        meta: dict[str, Any] = {"format": FORMAT, "sharded": True, "world_size": world}
        if self.kind is not None:
            meta["kind"] = self.kind
        meta.update({k: v for k, v in state.items() if k not in ("model", "optimizer")})
        meta.update({"model": None, "optimizer": opt_rest, "rng": rngs})
        step = int(state["step"])
        tmp = self.folder / f".ckpt-step{step}.tmp"
        error = None
        if rank == 0:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = self._write_error(e)
        _agree(error)
        from torch.distributed.checkpoint.api import CheckpointException
        try:
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - (DCP's is a BaseException)
            error = self._write_error(_cause(e))
        try:
            _agree(error)
        except CheckpointError:
            if rank == 0:  # every rank is past dcp.save: nothing writes into it any more
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if rank == 0:
            try:
                self._complete(tmp, meta, step)
            except OSError as e:
                error = self._write_error(e)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        _agree(error)

    def _write_error(self, e: BaseException) -> str:
        had = self.exists()
        what = getattr(e, "strerror", None) or (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        kept = ("the previous checkpoint is intact: free space (or raise the limit), then continue with --resume"
                if had else "no checkpoint was written: free space (or raise the limit) and run again")
        return f"could not write the sharded checkpoint in {self.folder} ({what}); {kept}"

    def _complete(self, tmp: Path, meta: dict[str, Any], step: int) -> None:
        """Rank 0, once every rank's shards are on disk: meta.pt, the digests, the rename, the link."""
        with open(tmp / META, "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        digests = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        with open(tmp / DIGESTS, "w") as f:
            json.dump({"sha256": digests}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        name, n = f"checkpoint-step{step}.dcp", 1
        while (self.folder / name).exists():  # (the checkpoint of this step again, after a resume)
            name, n = f"checkpoint-step{step}-{n}.dcp", n + 1
        os.replace(tmp, self.folder / name)
        link = self.folder / f".ckpt-link-step{step}.tmp"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.symlink(name, link)
        os.replace(link, self.path)  # the switch: atomic
        _fsync_dir(self.folder)
        for old in stale_paths(self.folder):
            shutil.rmtree(old, ignore_errors=True)

    # -------------------------------------------------------------- loading
    def load(self) -> dict[str, Any]:
        """Verify the latest checkpoint's files and read its replicated part (``meta.pt``); the shards are
        read by :meth:`load_model` and :meth:`load_optimizer`."""
        rank, _ = rank_and_world()
        error = None
        if rank == 0:
            error = self._verify()
        _agree(error)
        target = self.path.resolve()
        meta = torch.load(target / META, map_location="cpu", weights_only=True)
        if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_KEYS) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{target / META} is not a grassopt sharded checkpoint (missing fields); was it "
                                  "written by `grassopt train --fsdp`?")
        if meta.get("kind") != self.kind:
            what = f"`grassopt {self.kind}`" if self.kind else "`grassopt train`"
            raise CheckpointError(f"{self.path} is not a {what} checkpoint")
        self._loaded = target
        return meta

    def _verify(self) -> str | None:
        if not self.exists():
            return (f"no checkpoint at {self.path}; start without --resume, or point --out at the run to resume "
                    "(an --fsdp run's checkpoint is the folder checkpoint.dcp)")
        target = self.path.resolve()
        fix = "resume from an intact copy of the run folder, or start over with --overwrite"
        try:
            listed = json.loads((target / DIGESTS).read_text())["sha256"]
        except FileNotFoundError:
            return f"{target / DIGESTS} is missing: the checkpoint cannot be verified; {fix}"
        except (ValueError, KeyError, TypeError) as e:
            return f"{target / DIGESTS} is not a readable digest file ({e}); {fix}"
        for name, digest in sorted(listed.items()):
            path = target / name
            if not path.is_file():
                return f"{path} is missing from the sharded checkpoint; {fix}"
            if file_sha256(path) != digest:
                return (f"{path} does not match its digest in {DIGESTS}: it was damaged or replaced after it was "
                        f"written; {fix}")
        return None

    def load_model(self, model: nn.Module, ckpt: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        template = {f"model/{k}": v for k, v in model.state_dict().items()}
        dcp.load(template, storage_reader=dcp.FileSystemReader(self._dir()))
        model.load_state_dict({k[len("model/"):]: v for k, v in template.items()})

    def load_optimizer(self, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        reader = dcp.FileSystemReader(self._dir())
        saved = {k[len("optimizer/"):]: (tuple(m.size), m.properties.dtype)
                 for k, m in reader.read_metadata().state_dict_metadata.items()
                 if k.startswith("optimizer/") and isinstance(m, TensorStorageMetadata)}
        try:
            template = _optimizer_template(optimizer, saved, int(ckpt["world_size"]))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        full = {f"optimizer/{k}": v for k, v in template.items()}
        dcp.load(full, storage_reader=dcp.FileSystemReader(self._dir()))
        _load_optimizer(optimizer, {k[len("optimizer/"):]: v for k, v in full.items()}, ckpt["optimizer"],
                        int(ckpt["world_size"]))

    def restore_rng(self, ckpt: dict[str, Any]) -> None:
        rank, _ = rank_and_world()
        rngs = ckpt["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0], self.device)

    def _dir(self) -> Path:
        if self._loaded is None:
            raise RuntimeError("ShardedCheckpointer.load() must run before the shards are read")
        return self._loaded
