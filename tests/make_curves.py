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


def run_case(name: str, out: str | os.PathLike, dataset=None, task=None) -> dict[str, Any]:
    """Run case ``name`` in the folder ``out``: its curve (metric lines) and summary numbers."""
    loop, extra = CASES[name]
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


def main(argv: list[str]) -> int:
    names = argv or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    stored = json.loads(DATA.read_text()) if DATA.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = sotu_1k(Path(tmp) / "cache") if any(CASES[n][0] == "train" for n in names) else None
        task = smoke_task() if any(CASES[n][0] == "finetune" for n in names) else None
        for n in names:
            stored[n] = run_case(n, Path(tmp) / n.replace(" ", "_"), dataset, task)
            print(f"{n}: {len(stored[n]['curve'])} lines, final loss {stored[n]['curve'][-1].get('loss')}")
    DATA.parent.mkdir(parents=True, exist_ok=True)
    ordered = {n: stored[n] for n in CASES if n in stored}
    DATA.write_text(json.dumps(ordered, indent=1) + "\n")
    print(f"wrote {DATA}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
