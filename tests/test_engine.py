"""grassopt.engine's safety, each on real runs: the folder lock, no silent overwrite, the last good
checkpoint on a non-finite loss, the checkpoint digest, stale temporary files, every random state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from grassopt.engine import CheckpointError, NonFiniteLossError, RunFolder, RunFolderError, rng_state, set_rng_state
from grassopt.engine.checkpoint import digest_path, file_sha256
from grassopt.train.loop import TrainConfig, train


def cfg(out, **kw):
    base = dict(model="nano", vocab_size=1024, seq_len=32, batch_size=2, steps=8, lr=3e-3, rank=8, update_interval=3,
                eval_every=1000, eval_tokens=256, log_every=1, progress=False, plot=False, threads=1, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def ckpt(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def lines(out):
    return [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert torch.equal(v, sb[i][k]) if torch.is_tensor(v) else v == sb[i][k], (i, k)


def test_a_locked_folder_is_refused_until_the_lock_is_released(tmp_path, sotu_1k):
    out = tmp_path / "run"
    other = RunFolder(out)  # another run holding the folder (flock: a second open file conflicts, even in-process)
    other.acquire()
    with pytest.raises(RunFolderError, match="in use by another run .*pid"):
        train(cfg(out, steps=4, stop_after=2), dataset=sotu_1k)
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()  # nothing written
    other.close()
    assert train(cfg(out, steps=4, stop_after=2), dataset=sotu_1k)["steps"] == 2
    # the run released its lock when it ended, also when it ended with an error
    with pytest.raises(CheckpointError, match="other settings"):
        train(cfg(out, steps=4, lr=1e-2, resume=True), dataset=sotu_1k)
    assert train(cfg(out, steps=4, resume=True), dataset=sotu_1k)["steps"] == 4


def test_a_fresh_run_over_another_runs_checkpoint_needs_overwrite(tmp_path, sotu_1k):
    out = tmp_path / "run"
    train(cfg(out, steps=3), dataset=sotu_1k)
    before = {f: (out / f).read_bytes() for f in ("checkpoint.pt", "metrics.jsonl", "config.json", "summary.json")}
    with pytest.raises(RunFolderError, match="holds the checkpoint of another run.*--resume.*--overwrite"):
        train(cfg(out, steps=5, seed=1), dataset=sotu_1k)
    assert {f: (out / f).read_bytes() for f in before} == before  # nothing lost
    s = train(cfg(out, steps=6, seed=1, stop_after=5, overwrite=True), dataset=sotu_1k)
    assert s["steps"] == 5 and ckpt(out)["step"] == 5 and len(lines(out)) == 5
    assert train(cfg(out, steps=6, seed=1, resume=True), dataset=sotu_1k)["steps"] == 6  # resuming needs no flag


def _overwrite(out, tag):
    """One --overwrite start in ``out`` (the RunFolder steps a run takes), leaving a run tagged ``tag``."""
    with RunFolder(out) as folder:
        assert folder.open(False, {"tag": tag}, overwrite=True) is None
        folder.start({"tag": tag}, [])
        (out / "checkpoint.pt").write_text(tag)
        return folder.previous


def test_repeated_overwrites_keep_only_the_latest_previous_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_text("run0")
    kept = [_overwrite(out, f"run{i}") for i in range(1, 5)]
    previous = sorted(p.name for p in out.iterdir() if p.name.startswith("previous-"))
    assert previous == [kept[-1].name]  # one folder, however often the run was overwritten: the latest old run
    assert (kept[-1] / "checkpoint.pt").read_text() == "run3" and (out / "checkpoint.pt").read_text() == "run4"
    # a set-aside that fails (the move of the old run) deletes nothing: the earlier old run stays
    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    (out / "unrelated-previous-notes").mkdir()  # not a previous-* folder: never touched
    with RunFolder(out) as folder:
        folder.open(False, {"tag": "run5"}, overwrite=True)
        monkeypatch.setattr("grassopt.engine.run.os.replace", failing_replace)
        with pytest.raises(OSError, match="No space"):
            folder.start({"tag": "run5"}, [])
        monkeypatch.undo()
    assert (kept[-1] / "checkpoint.pt").read_text() == "run3"  # still there
    assert (out / "unrelated-previous-notes").is_dir()


class NaNAt:
    """A hook that makes the loss of the ``k``-th training forward pass NaN (an injected fault)."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def on_start(self, model, opt, cfg):
        def forward_hook(module, inputs, output):
            if not module.training:  # evaluation passes do not count
                return None
            self.calls += 1
            return (output[0], output[1] * float("nan")) if self.calls == self.k else None

        model.register_forward_hook(forward_hook)


@pytest.mark.parametrize("kw", [{"preset": "adamw-torch", "grad_accum": 2},
                                {"preset": "subtrack++", "layerwise": True, "clip_mode": "per-parameter"}],
                         ids=["adamw-torch-accumulating", "subtrack++-layerwise"])
def test_a_non_finite_loss_keeps_the_last_good_checkpoint_and_loses_nothing(kw, tmp_path, sotu_1k):
    accum = kw.get("grad_accum", 1)
    bad = tmp_path / "bad"
    # the NaN comes in the last micro-batch of step 6: earlier micro-batches of that step already ran backward
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 6; nothing was updated.*step 5"):
        train(cfg(bad, steps=8, **kw), dataset=sotu_1k, hooks=[NaNAt(5 * accum + accum)])
    summary = json.loads((bad / "summary.json").read_text())
    assert summary["steps"] == 5 and not summary["finished"] and "non-finite loss" in summary["error"]
    assert [r["step"] for r in lines(bad)] == [1, 2, 3, 4, 5]
    # the checkpoint is the state after step 5, bit for bit that of a clean run stopped there
    clean = tmp_path / "clean"
    train(cfg(clean, steps=8, stop_after=5, **kw), dataset=sotu_1k)
    assert_same_state(ckpt(bad), ckpt(clean))
    assert ckpt(bad)["sampler"]["batches_drawn"] == ckpt(clean)["sampler"]["batches_drawn"]
    # and resuming it (the fault gone) finishes exactly as an uninterrupted run
    train(cfg(bad, steps=8, resume=True, **kw), dataset=sotu_1k)
    full = tmp_path / "full"
    train(cfg(full, steps=8, **kw), dataset=sotu_1k)
    assert_same_state(ckpt(bad), ckpt(full))
    assert [r["loss"] for r in lines(bad)] == [r["loss"] for r in lines(full)]


def test_a_checkpoint_damaged_or_replaced_after_writing_is_refused_by_its_digest(tmp_path, sotu_1k):
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg(a, steps=4, stop_after=2), dataset=sotu_1k)
    train(cfg(b, steps=4, stop_after=3), dataset=sotu_1k)
    path = a / "checkpoint.pt"
    assert json.loads(digest_path(path).read_text()) == {"sha256": [file_sha256(path)]}
    good = path.read_bytes()
    # one flipped bit in the weights: torch.load reads it without complaint, the digest does not match
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 1
    path.write_bytes(bytes(damaged))
    torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match="does not match its digest"):
        train(cfg(a, steps=4, resume=True), dataset=sotu_1k)
    # another run's intact checkpoint copied over it (without its digest): refused too
    path.write_bytes((b / "checkpoint.pt").read_bytes())
    with pytest.raises(CheckpointError, match="damaged or replaced"):
        train(cfg(a, steps=4, resume=True), dataset=sotu_1k)
    # a crash between the two renames of a save leaves the digest file listing new and old: both load
    path.write_bytes(good)
    digest_path(path).write_text(json.dumps({"sha256": ["0" * 64, file_sha256(path)]}))
    assert train(cfg(a, steps=4, resume=True), dataset=sotu_1k)["steps"] == 4
    # a checkpoint with no digest file (written before digests) loads unverified
    digest_path(b / "checkpoint.pt").unlink()
    assert train(cfg(b, steps=4, resume=True), dataset=sotu_1k)["steps"] == 4


def test_stale_temporary_files_of_a_killed_writer_are_removed_on_start(tmp_path, sotu_1k):
    out = tmp_path / "run"
    train(cfg(out, steps=4, stop_after=2), dataset=sotu_1k)
    stale = out / ".ckpt-killed.tmp"
    stale.write_bytes(b"half a checkpoint")
    keep = out / "notes.tmp"  # not ours: left alone
    keep.write_text("mine")
    assert train(cfg(out, steps=4, resume=True), dataset=sotu_1k)["steps"] == 4
    assert not stale.exists() and keep.exists()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.pt", "checkpoint.pt.sha256",
                                                     "config.json", "metrics.jsonl", "notes.tmp", "summary.json"]


def test_every_random_state_is_saved_and_restored(tmp_path, sotu_1k):
    state = rng_state("cpu")
    assert set(state) == {"cpu", "numpy", "python"}
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(state, "cpu")
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]
    out = tmp_path / "run"
    train(cfg(out, steps=2), dataset=sotu_1k)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["rng"]  # plain tensors and values
    assert {"cpu", "numpy", "python"} <= set(saved)
