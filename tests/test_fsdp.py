"""``grassopt train --fsdp``: FSDP2 with real processes (2 gloo ranks on the CPU) and sharded checkpoints.

* an FSDP2 run of 2 ranks equals a one-process run (no FSDP) on the same global batches, to a measured bound;
* stopped and resumed at the same world size, it is bit-identical to the uninterrupted run (model and every
  optimizer state: bases, moments, generators), also with int8 states, bf16 weights with stochastic
  rounding and activation checkpointing;
* resumed by another number of processes (2 -> 1 and 1 -> 2, the same global batch), it continues and ends
  within the bound of the first point; a per-shard state (int8 block scales) is refused at another size;
* the run-folder rules hold for the sharded layout: no clobbering, ``--overwrite``, a damaged shard refused
  with one line naming the file, atomic completion (no temporary folder left), and ``--layerwise`` refused;
* the owner-sharded projected step (``FSDPSubspaceAdamW(owners=True)``, what ``--fsdp`` uses): each matrix
  stepped by one rank, which alone holds its low-rank state, equals the replicated step bit for bit.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import distributed_helpers as H  # noqa: E402

from grassopt.engine.checkpoint import CheckpointError  # noqa: E402
from grassopt.engine.run import RunFolderError  # noqa: E402
from grassopt.train.loop import TrainConfig, train  # noqa: E402

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.distributed]

WORLD = 2
STEPS = 6
#: FSDP2 (2 ranks) against one process, after 6 steps of subtrack++ (a basis update every 2 steps): the gradients
#: differ only in the order of float sums (a reduce-scatter of two halves against one batch); measured
#: max |weight difference| 5.9e-7 (weights of size ~0.02 .. 1); the bound is about 3x that. A resume at
#: another world size measured 1.2e-7 (2 -> 1) and 6e-8 (1 -> 2) against the uninterrupted run.
BOUND = 2e-6
#: the low-bit case: bf16 weights move in steps of a bf16 ulp, so rounding differences show at that scale
#: (with 2 micro-batches per step: the first skips FSDP2's reduce-scatter; and each gradient clipped alone)
LOW_BIT = dict(param_dtype="bfloat16", stochastic_rounding=True, state_dtype="int8", checkpoint_activations=True,
               grad_accum=2, clip_mode="per-parameter")


def _cfg(out, **kw) -> TrainConfig:
    base = dict(model="nano", vocab_size=1024, seq_len=32, batch_size=1, steps=STEPS, lr=3e-3, rank=8,
                update_interval=2, eval_every=1000, eval_tokens=1000, log_every=1, progress=False, plot=False,
                threads=1, out=str(out), fsdp=True)
    base.update(kw)
    return TrainConfig(**base)


def _state(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's checkpoint, sharded or not, as full tensors (model/..., optimizer/...)."""
    if (run / "checkpoint.pt").is_file():
        ck = torch.load(run / "checkpoint.pt", weights_only=True)
        return {f"model/{k}": v for k, v in ck["model"].items()}
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dest = run.parent / f"{run.name}-full.pt"
    dcp_to_torch_save((run / "checkpoint.dcp").resolve(), dest)
    return torch.load(dest, weights_only=True)


def _max_diff(a: dict, b: dict, prefix: str = "model/") -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _worker(rank: int, world: int, ds, root: str) -> None:
    root_p = Path(root)
    train(_cfg(root_p / "w2-full"), dataset=ds)
    train(_cfg(root_p / "w2-part", stop_after=3), dataset=ds)
    dist.barrier()
    if rank == 0:  # the step-3 checkpoint, continued below by 2 ranks and, in the test, by one process
        shutil.copytree(root_p / "w2-part", root_p / "w2-to-1", symlinks=True)
    dist.barrier()
    train(_cfg(root_p / "w2-part", resume=True), dataset=ds)
    train(_cfg(root_p / "w1-to-2", resume=True), dataset=ds)  # written by one process (batch_size 2)
    train(_cfg(root_p / "low-full", **LOW_BIT), dataset=ds)
    train(_cfg(root_p / "low-part", stop_after=4, **LOW_BIT), dataset=ds)
    dist.barrier()
    if rank == 0:
        shutil.copytree(root_p / "low-part", root_p / "low-to-1", symlinks=True)
    dist.barrier()
    train(_cfg(root_p / "low-part", resume=True, **LOW_BIT), dataset=ds)


def test_fsdp_run_matches_one_process_and_resumes_at_any_world_size(sotu_1k, tmp_path):
    single = tmp_path / "single"
    train(_cfg(single, fsdp=False, batch_size=2), dataset=sotu_1k)  # the same global batches, no FSDP
    train(_cfg(tmp_path / "w1-to-2", batch_size=2, stop_after=3), dataset=sotu_1k)  # FSDP2 in one process
    H.spawn(_worker, WORLD, sotu_1k, str(tmp_path))
    train(_cfg(tmp_path / "w2-to-1", batch_size=2, resume=True), dataset=sotu_1k)

    ref, full = _state(single), _state(tmp_path / "w2-full")
    d_single = _max_diff(full, ref)
    assert 0 < d_single < BOUND, f"FSDP2 (2 ranks) vs one process: {d_single:.2e}"
    # the evaluation (the ranks share the batches, in lockstep: rank 1 has none of the one batch here)
    e_single, e_full = (json.loads((r / "summary.json").read_text())["final_eval_loss"]
                        for r in (single, tmp_path / "w2-full"))
    assert abs(e_single - e_full) < 1e-5, (e_single, e_full)
    losses = _losses(tmp_path / "w2-full")
    assert losses[-1] < losses[0] and len(losses) == STEPS
    # the same world size: bit for bit, model and optimizer (bases, moments, generators, counts)
    _assert_equal(full, _state(tmp_path / "w2-part"))
    assert _losses(tmp_path / "w2-part") == losses
    # another world size (same global batch): continues, as close to the uninterrupted run as one process is
    d_2to1 = _max_diff(_state(tmp_path / "w2-to-1"), full)
    d_1to2 = _max_diff(_state(tmp_path / "w1-to-2"), ref)
    assert d_2to1 < BOUND and d_1to2 < BOUND, (d_2to1, d_1to2)
    print(f"max |weight diff|: FSDP2 x2 vs one process {d_single:.1e}; 2->1 resume vs uninterrupted x2 "
          f"{d_2to1:.1e}; 1->2 resume vs one process {d_1to2:.1e}")

    # int8 states, bf16 weights with stochastic rounding, activation checkpointing: bit-identical resume
    low = _state(tmp_path / "low-full")
    assert low["model/layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert any(k.startswith("optimizer/rank1/") for k in low), "rank 1 wrote no state of its own"
    _assert_equal(low, _state(tmp_path / "low-part"))
    # ... whose int8 block scales are per shard: another world size is refused, naming the fix
    with pytest.raises(CheckpointError, match=r"per shard by 2 processes.*nproc_per_node=2"):
        train(_cfg(tmp_path / "low-to-1", batch_size=2, resume=True, **LOW_BIT), dataset=sotu_1k)


def test_sharded_run_folder_rules(sotu_1k, tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, steps=2), dataset=sotu_1k)
    assert (run / "checkpoint.dcp").is_symlink()
    assert not list(run.glob(".ckpt-*")), "a temporary file or folder was left behind"
    shards = sorted(p.name for p in (run / "checkpoint.dcp").iterdir())
    assert shards == [".metadata", "SHA256SUMS.json", "__0_0.distcp", "meta.pt"], shards
    # no clobbering, by an FSDP run or by a run of the single-file layout
    for fsdp in (True, False):
        with pytest.raises(RunFolderError, match=r"checkpoint\.dcp.*--resume.*--overwrite"):
            train(_cfg(run, steps=2, fsdp=fsdp), dataset=sotu_1k)
    # resumed without --fsdp: the layout is named
    with pytest.raises(CheckpointError, match=r"holds checkpoint\.dcp, the checkpoint of a run with --fsdp; resume it "
                                              r"with --fsdp"):
        train(_cfg(run, steps=2, fsdp=False, resume=True), dataset=sotu_1k)
    # a damaged shard: refused with one line naming the file and the fix
    shard = (run / "checkpoint.dcp" / "__0_0.distcp").resolve()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp does not match its digest.*intact copy.*--overwrite") as e:
        train(_cfg(run, steps=2, resume=True), dataset=sotu_1k)
    assert "\n" not in str(e.value)
    # --overwrite: the old run is set aside, the new one completes
    train(_cfg(run, steps=2, overwrite=True), dataset=sotu_1k)
    (previous,) = run.glob("previous-*")
    assert (previous / "checkpoint.dcp").is_symlink() and (run / "checkpoint.dcp").resolve().is_dir()
    # leftovers of a write killed before the link switched are removed on the next open
    (run / ".ckpt-step9.tmp").mkdir()
    (run / "checkpoint-step9.dcp").mkdir()
    train(_cfg(run, steps=2, resume=True), dataset=sotu_1k)
    assert not (run / ".ckpt-step9.tmp").exists() and not (run / "checkpoint-step9.dcp").exists()


def test_layerwise_and_other_kinds_are_refused_with_fsdp_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"layerwise=True does not run with fsdp=True: FSDP2 reduce-scatters") as e:
        _cfg(tmp_path / "a", layerwise=True, clip_mode="per-parameter").validate()
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"fsdp=True steps grassopt's presets and adamw-torch"):
        _cfg(tmp_path / "b", preset="rso").validate()
    with pytest.raises(ValueError, match=r"'factored' moments keep row and column statistics of whole matrices"):
        _cfg(tmp_path / "c", plain_state_dtype="factored").validate()
    with pytest.raises(ValueError, match=r"param_dtype='int8' keeps int8 codes in grassopt.qlinear layers"):
        _cfg(tmp_path / "d", param_dtype="int8", stochastic_rounding=True).validate()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _owners_worker(rank: int, world: int, vocab: int, out: str) -> None:
    import grassopt
    from grassopt.distributed import FSDPSubspaceAdamW

    batches = torch.load(Path(out) / "batches.pt")
    for preset in ("subtrack++", "grassjump", "galore"):
        runs = {}
        for owners in (False, True):
            model = H._fsdp_model(vocab)
            opt = FSDPSubspaceAdamW(grassopt.param_groups(model, preset, rank=H.RANK, update_interval=2), lr=H.LR,
                                    seed=0, owners=owners)
            H.train(model, opt, batches, rank, world)
            runs[owners] = (H._full(model.state_dict()), opt)
        (rep, rep_opt), (own, own_opt) = runs[False], runs[True]
        for k in rep:  # the weights, on every rank, bit for bit
            assert torch.equal(rep[k], own[k]), (preset, k)
        projected = [proxy for proxy, _ in own_opt._sharded]
        mine = [p for p in projected if own_opt.owner(p) == rank]
        assert set(own_opt.state) & set(projected) == set(mine), "a rank holds the state of a matrix it does not own"
        held = sum(v.numel() * v.element_size() for p in mine for v in own_opt.state[p].values() if torch.is_tensor(v))
        total = sum(v.numel() * v.element_size() for p, _ in rep_opt._sharded for v in rep_opt.state[p].values()
                    if torch.is_tensor(v))
        assert 0.3 * total < held < 0.7 * total, (preset, held, total)  # owners balanced: about half each
        print(f"{preset}: rank {rank} holds {held / total:.2f} of the projected state")
        a, b = rep_opt.state_dict(), own_opt.state_dict()  # (full form: the owners' states gathered)
        assert a["state"].keys() == b["state"].keys()
        for i in a["state"]:  # bases, moments, generators, counts: equal to the replicated ones
            for k, v in a["state"][i].items():
                w = b["state"][i][k]
                assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (preset, i, k)
    # shards of unequal rows (7 -> 4 + 3, 9 -> 5 + 4, 5 -> 3 + 2): the gather pads them, the scatter trims
    from grassopt.distributed import shard_model

    final = {}
    for owners in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(*(torch.nn.Linear(a, b, bias=False) for a, b in ((12, 7), (7, 9), (9, 5), (5, 3))))
        shard_model(net, list(net)[:3], "cpu")
        opt = FSDPSubspaceAdamW([{"params": [net[i].weight for i in range(3)], "rank": 2, "update_interval": 2},
                                 {"params": [net[3].weight]}], lr=1e-2, seed=0, owners=owners)
        assert owners is False or {opt.owner(net[i].weight) for i in range(3)} == {0, 1}
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            net(torch.randn(4, 12, generator=gen)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        final[owners] = [p.full_tensor() for p in net.parameters()]
    assert [tuple(p.to_local().shape) for p in net.parameters()][1:3] == [(5 - rank, 7), (3 - rank, 9)]
    assert all(torch.equal(a, b) for a, b in zip(final[False], final[True]))


def test_owner_sharded_projected_step_equals_the_replicated_step(sotu_1k, tmp_path):
    batches = []
    sampler = sotu_1k.sampler(4, H.SEQ_LEN, seed=3)
    for _ in range(6):
        x, y = sampler.next()
        batches.append(torch.cat([x, y[:, -1:]], dim=1))
    torch.save(torch.stack(batches), tmp_path / "batches.pt")
    H.spawn(_owners_worker, WORLD, sotu_1k.vocab_size, str(tmp_path))


def test_owners_are_balanced_by_cost():
    from grassopt.distributed import assign_owners

    costs = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    owners = assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert loads == [18.0, 18.0], (owners, loads)
    assert assign_owners(costs, 3) == assign_owners(list(costs), 3)  # the same answer on every rank
    assert sorted(set(assign_owners([1.0] * 4, 4))) == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_restarts_from_the_last_checkpoint():
    """benchmarks/faults.py's case, real processes end to end (about a minute): ``torchrun --max-restarts=1``
    of ``grassopt train --fsdp``, rank 1 SIGKILLed mid-run; the restarted job continues from the last
    checkpoint and ends bit for bit as an uninterrupted run with the same checkpoint steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import faults

    assert faults.main(["-k", "rank SIGKILLed under torchrun"]) == 0
