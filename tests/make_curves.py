"""Stored loss curves: the regression reference of the training and fine-tuning loops.

Each case is a short, cheap run (``nano`` on SOTU with a 1024-token BPE, 30 steps; the fine-tuning
smoke task) logged at every step. ``tests/test_curves.py`` reruns every case and compares its curve
with the one stored in ``tests/data/loss_curves.json``, exactly (float ``repr`` round-trips through
JSON), so any change of the numbers a loop computes shows up, however it comes about.

Regenerate only when a change of the numbers is intended and explained in its commit::

    python tests/make_curves.py            # writes tests/data/loss_curves.json
    python tests/make_curves.py adamw zo   # only these cases (the others are kept)

The curves of the first version were generated from the loops as they were before the engine
refactor (grassopt/engine), which had to reproduce them bit for bit.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parent / "data" / "loss_curves.json"

#: The common settings of the pre-training cases (a nano LLaMA, cheap enough for the default suite).
TRAIN_BASE: dict[str, Any] = dict(model="nano", vocab_size=1024, seq_len=64, batch_size=4, steps=30, lr=3e-3,
                                  rank=16, update_interval=7, eval_every=15, eval_tokens=2048, log_every=1,
                                  progress=False, plot=False, threads=1)
#: The common settings of the fine-tuning cases (the smoke task of tests/test_finetune.py).
FINETUNE_BASE: dict[str, Any] = dict(lr=2e-3, rank=4, update_interval=2, seq_len=32, batch_size=4, steps=6,
                                     eval_every=3, log_every=1, progress=False, plot=False, threads=1)

#: name -> (loop, settings beside the base ones). The three stepping modes (backward, layer-wise,
#: forward-only), gradient accumulation, the sketched estimator and RSO are all covered.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("train", {"preset": "adamw"}),
    "galore": ("train", {"preset": "galore"}),
    "subtrack++": ("train", {"preset": "subtrack++", "grad_accum": 2}),
    "grassjump": ("train", {"preset": "grassjump"}),
    "rso": ("train", {"preset": "rso", "sketch_rank": 0.25}),
    "zo": ("train", {"preset": "zo", "lr": 1e-3, "rank": 4}),
    "adamw-torch+sketch": ("train", {"preset": "adamw-torch", "sketch": "haar", "sketch_rank": 0.25}),
    "subtrack++ layerwise": ("train", {"preset": "subtrack++", "layerwise": True, "clip_mode": "per-parameter"}),
    "finetune": ("finetune", {"method": "subtrack++"}),
    "finetune sketch": ("finetune", {"method": "adamw-torch", "sketch": "haar"}),
    "finetune zo": ("finetune", {"method": "zo", "batch_size": 16, "lr": 2e-3, "options": {"lazy": 3}}),
}

#: Fields of the metric lines that are numbers of the run (not timings).
TRAIN_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "eval_loss", "eval_tokens")
FINETUNE_FIELDS = ("step", "examples", "forward_passes", "loss", "lr", "grad_norm", "val_loss", "val_acc",
                   "val_balanced_acc")
TRAIN_SUMMARY = ("steps", "tokens", "final_eval_loss", "final_train_loss", "optimizer_state_bytes",
                 "saved_activation_bytes", "parameters")
FINETUNE_SUMMARY = ("steps", "examples", "forward_passes", "backward_passes", "test_acc", "test_loss", "val_loss",
                    "optimizer_state_bytes", "saved_activation_bytes", "trainable_parameters")


def sotu_1k(cache_dir: str | os.PathLike):
    """The corpus of the ``sotu_1k`` fixture (tests/conftest.py)."""
    from grassopt.train.data import prepare
    return prepare(vocab_size=1024, cache_dir=cache_dir, progress=False)


def smoke_task():
    """The ``tiny_task`` fixture of tests/test_finetune.py."""
    from grassopt.finetune.task import load_task
    return load_task("sotu-era", per_class={"train": 4, "val": 2, "test": 2})


def _lines(out: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in fields if k in r} for r in rows]


def run_case(name: str, out: str | os.PathLike, dataset=None, task=None,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run case ``name`` in the folder ``out``: its curve (metric lines) and summary numbers.
    ``overrides``: settings over the case's own (the perturbation tests change one)."""
    loop, extra = CASES[name]
    extra = {**extra, **(overrides or {})}
    out = Path(out)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # (as the tests' autouse fixture)
    if loop == "train":
        from grassopt.train.loop import TrainConfig, train
        summary = train(TrainConfig(**{**TRAIN_BASE, **extra, "out": str(out)}), dataset=dataset)
        fields, keep = TRAIN_FIELDS, TRAIN_SUMMARY
    else:
        from grassopt.finetune.loop import FinetuneConfig, finetune
        summary = finetune(FinetuneConfig(**{**FINETUNE_BASE, **extra, "out": str(out)}), task=task)
        fields, keep = FINETUNE_FIELDS, FINETUNE_SUMMARY
    return {"curve": _lines(out, fields), "summary": {k: summary[k] for k in keep}}


# ---------------------------------------------------------------------------------------------------
# Where the curves were made, and how far honest platforms drift apart
#
# A float32 run is bit-exact only on the kernel path that made it: the BLAS (MKL here) and torch's own
# vectorised kernels choose their code by CPU, and a sum in another order rounds differently in the
# last bits, which training then amplifies. So the stored file records its platform: the CPU, torch,
# the BLAS, the instruction set torch dispatches to, the settings that force a path, and a digest of
# a probe computation (a forward and backward of a small LLaMA, a QR and an SVD) that changes whenever
# the kernels do. Where the platform matches, curves must match bit for bit; elsewhere each field
# must lie within the tolerance stored beside the curves, which was set from the drift measured
# between kernel paths of one machine (``--measure-drift``; see :data:`KERNEL_PATHS`).

#: Settings that force another kernel path on an x86 machine with MKL: the BLAS's conditional
#: numerical reproducibility mode, its instruction-set cap, torch's own kernels' dispatch and oneDNN's
#: (the fine-tuning encoder's products). "avx2" is a real other machine: the AVX2-only AMD EPYC that
#: recorded the first version of the curves reproduces them bit for bit under it on an AVX-512 one.
KERNEL_PATHS: dict[str, dict[str, str]] = {
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "sse4.2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
#: The environment variables that change the kernel path (recorded in the platform when set).
PATH_VARS = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "ATEN_CPU_CAPABILITY",
             "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OPENBLAS_CORETYPE")
#: Fields compared exactly everywhere: counts, positions and byte sizes (no floating point in them).
EXACT = ("step", "tokens", "examples", "forward_passes", "backward_passes", "eval_tokens", "steps",
         "optimizer_state_bytes", "saved_activation_bytes", "parameters", "trainable_parameters")
#: The measured drift is multiplied by this to give the tolerance: room for platforms further apart
#: than the forced paths here, while each perturbation of tests/test_curves.py still fails.
SAFETY = 10.0


def _cpu_model() -> str:
    import platform as pf
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Processor", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return pf.processor() or pf.machine()


def _blas() -> str:
    import re
    m = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return m.group(1) if m else "unknown"


def probe_digest() -> str:
    """A digest of computations that run on the same kernels as the curves: a forward and backward of
    a small LLaMA on a fixed batch (products, softmax, norms, embedding gradients), a QR and an SVD.
    Another kernel path changes it (tests/test_curves.py checks that each of :data:`KERNEL_PATHS` does)."""
    import hashlib
    from grassopt.train.model import Llama, config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Llama(config("nano", vocab_size=1024))
        x = torch.randint(0, 1024, (4, 65), generator=g)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        a = torch.randn(256, 96, generator=g)
        q, r = torch.linalg.qr(a)
        s = torch.linalg.svdvals(a)
        h = hashlib.sha256()
        for t in [loss.detach(), q, r, s, *(p.grad for p in model.parameters())]:
            h.update(t.detach().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
    finally:
        torch.set_num_threads(threads)


def platform() -> dict[str, Any]:
    """Where this process computes: CPU, torch, BLAS, torch's instruction set, forcing settings, probe."""
    return {"cpu": _cpu_model(), "torch": torch.__version__, "blas": _blas(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "settings": {k: os.environ[k] for k in PATH_VARS if k in os.environ},
            "probe": probe_digest()}


def _pairs(got: dict[str, Any], want: dict[str, Any]):
    """(where, field, got value, stored value) for every number of a case: the metric lines in order
    (``"missing"`` where a run lacks a field), then the summary."""
    for i, w in enumerate(want["curve"]):
        g = got["curve"][i] if i < len(got["curve"]) else {}
        for k in dict.fromkeys([*w, *g]):
            yield f"line {i + 1} (step {w.get('step')})", k, g.get(k, "missing"), w.get(k, "missing")
    for k in dict.fromkeys([*want["summary"], *got["summary"]]):
        yield "summary", k, got["summary"].get(k, "missing"), want["summary"].get(k, "missing")


def _relative(o: Any, v: Any, k: str) -> float:
    """``|o - v| / max(|v|, 1e-12)`` for two floats of field ``k``; 0 or inf for anything else."""
    if k in EXACT or not isinstance(o, float) or not isinstance(v, float):
        return 0.0 if o == v else float("inf")
    return abs(o - v) / max(abs(v), 1e-12)


def relative_drift(got: dict[str, Any], want: dict[str, Any]) -> dict[str, float]:
    """The largest relative difference of each field between two runs of one case (``inf`` where the
    lines, a count or a size differ)."""
    out: dict[str, float] = {}
    if len(got["curve"]) != len(want["curve"]):
        out["(lines)"] = float("inf")
    for _, k, o, v in _pairs(got, want):
        out[k] = max(out.get(k, 0.0), _relative(o, v, k))
    return out


def mismatches(name: str, got: dict[str, Any], want: dict[str, Any],
               tolerance: dict[str, float] | None) -> list[str]:
    """What differs between two runs of case ``name``: bit for bit when ``tolerance`` is None, else
    each float within its field's relative tolerance (counts and sizes exactly). Empty when they agree."""
    if len(got["curve"]) != len(want["curve"]):
        return [f"{name}: {len(got['curve'])} metric lines, stored {len(want['curve'])}"]
    out = []
    for where, k, o, v in _pairs(got, want):
        d = _relative(o, v, k)
        tol = 0.0 if tolerance is None or k in EXACT else tolerance.get(k, tolerance["default"])
        if (tolerance is None and o != v) or d > tol:
            out.append(f"{name}, {where}, {k}: {o!r} against the stored {v!r}"
                       + (f" (relative {d:.2e} > {tol:.1e})" if tolerance is not None and d < float("inf") else ""))
    return out


def run_all(names: list[str]) -> dict[str, Any]:
    """Run the cases ``names`` in a temporary folder: ``{name: run}``."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = sotu_1k(Path(tmp) / "cache") if any(CASES[n][0] == "train" for n in names) else None
        task = smoke_task() if any(CASES[n][0] == "finetune" for n in names) else None
        for n in names:
            out[n] = run_case(n, Path(tmp) / n.replace(" ", "_"), dataset, task)
            print(f"{n}: {len(out[n]['curve'])} lines, final loss {out[n]['curve'][-1].get('loss')}", file=sys.stderr)
    return out


def _run_elsewhere(settings: dict[str, str], names: list[str]) -> dict[str, Any]:
    """Run the cases in a fresh process with ``settings`` in its environment (the kernel path is chosen
    when the libraries load, so it cannot change inside this process)."""
    import subprocess
    env = {**{k: v for k, v in os.environ.items() if k not in PATH_VARS}, **settings}
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "runs.json"
        subprocess.run([sys.executable, __file__, "--dump", str(dst), *names], env=env, check=True)
        return json.loads(dst.read_text())


def measure_drift(names: list[str], stored: dict[str, Any]) -> dict[str, Any]:
    """Run the cases under every forced kernel path and measure each field's largest relative drift
    from the runs of this platform (``stored``), per loop (training and fine-tuning drift apart at
    different rates). The tolerance of a field is :data:`SAFETY` times its worst drift; a field seen
    not to drift (the learning rate, an accuracy) gets its loop's largest tolerance."""
    per_path: dict[str, dict[str, dict[str, float]]] = {}
    for label, settings in KERNEL_PATHS.items():
        print(f"[drift] {label}: {settings}", file=sys.stderr)
        runs = _run_elsewhere(settings, names)
        per_path[label] = {}
        for n in names:
            into = per_path[label].setdefault(CASES[n][0], {})
            for k, d in relative_drift(runs[n], stored[n]).items():
                into[k] = max(into.get(k, 0.0), d)
    worst: dict[str, dict[str, float]] = {}
    for loops in per_path.values():
        for loop, fields in loops.items():
            for k, d in fields.items():
                worst.setdefault(loop, {})[k] = max(worst.get(loop, {}).get(k, 0.0), d)
    tolerance = {}
    for loop, fields in worst.items():
        tol = {k: float(f"{SAFETY * d:.1e}") for k, d in fields.items() if k not in EXACT and d > 0}
        tolerance[loop] = {"default": max(tol.values()), **tol}
    return {"paths": KERNEL_PATHS, "drift": per_path, "worst": worst, "safety": SAFETY, "tolerance": tolerance}


def main(argv: list[str]) -> int:
    """``make_curves.py [NAME ...]``: record the cases (all by default) with this platform and the
    drift measured between kernel paths; ``--dump FILE NAME ...``: only run them into FILE;
    ``--measure-drift``: only measure and print the drift against the stored curves."""
    if argv[:1] == ["--dump"]:
        Path(argv[1]).write_text(json.dumps(run_all(argv[2:] or list(CASES))))
        return 0
    measure_only = argv[:1] == ["--measure-drift"]
    names = (argv[1:] if measure_only else argv) or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    stored = json.loads(DATA.read_text()) if DATA.is_file() else {}
    if measure_only:
        print(json.dumps(measure_drift(names, stored["cases"]), indent=1))
        return 0
    here = platform()
    if stored and stored.get("platform") != here:
        print(f"the stored curves were made on {stored.get('platform')}; this platform is {here}: recording all "
              "cases here", file=sys.stderr)
        names = list(CASES)
    cases = {**stored.get("cases", {}), **run_all(names)}
    cases = {n: cases[n] for n in CASES if n in cases}
    drift = measure_drift(list(CASES), cases)
    DATA.parent.mkdir(parents=True, exist_ok=True)
    DATA.write_text(json.dumps({"platform": here, **drift, "cases": cases}, indent=1) + "\n")
    print(f"wrote {DATA}: tolerance {json.dumps(drift['tolerance'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
