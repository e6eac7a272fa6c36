"""Runs of ``grassopt train`` / ``grassopt finetune`` each in a process of its own (its peak resident
memory is its own), reused when a finished run with the same arguments is already in its folder.

The benchmarks under ``benchmarks/`` call :func:`run_process` instead of each keeping a copy.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["run_process", "ROOT"]

#: The checkout (the runs' working directory).
ROOT = Path(__file__).resolve().parent.parent.parent
_MODULES = {"train": "grassopt.train", "finetune": "grassopt.finetune"}


def run_process(out: Path, cli: list[str], *, command: str = "finetune", reuse: bool = True,
                keep_checkpoint: bool = False, torchrun: int = 0) -> dict[str, Any]:
    """``grassopt <command> <cli> --out <out>`` in its own process (``torchrun`` with that many ranks
    when ``torchrun > 0``); returns its summary, with ``process_wall_s`` and ``command`` added.

    A finished run in ``out`` made with the same arguments (``out/args.json``) is reused (``reuse``).
    The checkpoint is deleted afterwards unless ``keep_checkpoint`` (reuse needs only
    ``summary.json`` and ``args.json``). A failed run raises ``SystemExit`` naming its log.
    """
    out = Path(out)
    cli = [*cli, "--out", str(out)]
    stamp, summary = out / "args.json", out / "summary.json"
    if reuse and stamp.is_file() and summary.is_file() and json.loads(stamp.read_text()) == cli:
        s = json.loads(summary.read_text())
        if s.get("finished"):
            return s
    out.mkdir(parents=True, exist_ok=True)
    module = _MODULES[command]
    cmd = [sys.executable, "-m", module, *cli]
    shown = f"grassopt {command} " + shlex.join(cli)
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", module, *cli]
        shown = f"torchrun --nproc_per_node={torchrun} -m {module} " + shlex.join(cli)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"run failed (exit {rc}): {shlex.join(cmd)}\nsee {out / 'log.txt'}")
    s = json.loads(summary.read_text())
    s["process_wall_s"] = time.perf_counter() - t0
    s["command"] = shown
    summary.write_text(json.dumps(s, indent=2))
    stamp.write_text(json.dumps(cli))
    if not keep_checkpoint:
        (out / "checkpoint.pt").unlink(missing_ok=True)
    return s
