"""Measuring memory while code runs: peak tensor bytes of a block and the process's resident memory.

``with TensorPeak() as tp: ...`` records the largest number of bytes that tensors allocated inside
the block held at once (``tp.peak``), counted from the storages that PyTorch's operators return, on
any device, whatever the operating system reports (``ru_maxrss`` is not available in every sandbox,
and it includes the allocator's and the interpreter's own memory).

The process probes: :func:`peak_rss_bytes` (the high-water mark so far), :func:`current_rss_bytes`,
and :func:`reset_peak_rss` with :func:`peak_rss_since_reset` to measure one phase of a run (Linux).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["TensorPeak", "peak_rss_bytes", "current_rss_bytes", "reset_peak_rss", "peak_rss_since_reset"]


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensors allocated inside a ``with`` block, live at the same time.

    Every storage an operator returns that none of its inputs owned is a new allocation; it counts
    until it is freed (a weak reference on the storage tells when). Views and in-place results share
    an input's storage and count nothing, and tensors that existed before the block (weights,
    optimizer state) are not counted, so ``peak`` is what the block adds at its worst moment and
    ``live`` what it leaves allocated at the end. Autograd's backward is seen too (its ops run
    through the dispatcher with this mode active). Not seen: memory outside tensors (BLAS
    workspaces, the allocator's caches).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._finalizers: dict[int, Any] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self._finalizers.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, Tensor) and t.layout == torch.strided}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.layout != torch.strided or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in inputs or key in self._finalizers:
                continue
            nbytes = st.nbytes()
            self._finalizers[key] = weakref.finalize(st, self._free, key, nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out

    def __exit__(self, *exc):
        for fin in list(self._finalizers.values()):
            fin.detach()  # storages that outlive the block stay counted in ``live``, not tracked further
        self._finalizers.clear()
        return super().__exit__(*exc)


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far (``getrusage``), or None where the system does
    not report it (some sandboxes give 0)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024) or None


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (Linux ``/proc/self/statm``), or None."""
    try:
        import resource
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (ImportError, OSError, ValueError, IndexError):
        return None


def reset_peak_rss() -> bool:
    """Give freed heap memory back to the system (glibc ``malloc_trim``) and reset this process's
    peak-RSS mark (Linux: ``/proc/self/clear_refs``), so that :func:`peak_rss_since_reset` measures
    a phase of the run. False where this is not possible (other systems)."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int | None:
    """Peak resident memory since :func:`reset_peak_rss` (``VmHWM``), or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 or None
    except (OSError, ValueError, IndexError):
        pass
    return None
