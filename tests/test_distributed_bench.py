"""benchmarks/distributed.py's counts, with real processes (2 gloo ranks, the nano model, a few steps).

What the benchmark reports must add up: the owners' projected states partition the replicated state (each
rank holds at most its share plus one matrix), the counted bytes are the analytic bytes of each mode's
collectives, the FLOPs of the owners' steps partition the replicated step's, and the memory figures agree
with ``grassopt memory``'s formula where it is exact (the optimizer state).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.distributed]

WORLD = 2
PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "distributed.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_distributed", PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw) -> argparse.Namespace:
    base = dict(model="nano", vocab=512, rank=8, update_interval=2, updates=2, batch=1, seq_len=16,
                presets=["subtrack++"], worlds=[WORLD], modes=["fsdp-replicated", "fsdp-owners"], argv=[])
    base.update(kw)
    return argparse.Namespace(**base)


def _sent(row: dict, phase: str, kind: str | None = None, key: str = "sent") -> int:
    kinds = row["counted"]["update"][phase]
    return sum(v[key] for k, v in kinds.items() if kind is None or k == kind)


@pytest.fixture(scope="module")
def fsdp_rows():
    """The rows of both FSDP modes at 2 ranks (about 5 s each on an idle 2-core machine)."""
    bench, args = _bench(), _args()
    return bench, args, {mode: bench.run_case(args, "subtrack++", mode, WORLD) for mode in args.modes}


def _nano(vocab: int):
    from grassopt.train.model import Llama, config

    model = Llama(config("nano", vocab_size=vocab))
    mats = [m.weight for n, m in model.named_modules() if n.startswith("layers.") and hasattr(m, "weight")
            and m.weight.dim() == 2]
    return model, mats


def _check_rows(rows: dict) -> None:
    for rs in rows.values():
        assert [r["rank"] for r in rs] == [0, 1]
        for r in rs:  # 5 steps: the first untimed, 2 and 3 timed (3 a basis update), 4 and 5 counted
            assert len(r["step_s"]["normal"]) == 1 and len(r["step_s"]["update"]) == 1
            assert all(t > 0 for t in r["step_s"]["normal"] + r["step_s"]["update"])
            assert r["counted"]["update"]["train_step_peak"] > r["counted"]["update"]["live_before"] > 0


def test_owners_partition_the_replicated_state_flops_and_bytes(fsdp_rows):
    from grassopt import resolve_preset
    from grassopt.memory import param_state_bytes

    bench, args, rows = fsdp_rows
    _check_rows(rows)
    rep, own = rows["fsdp-replicated"], rows["fsdp-owners"]
    model, mats = _nano(args.vocab)

    # -- state: the replicated step holds the whole projected state on each rank; the owners partition it,
    # each rank at most its share plus one matrix's
    projected = rep[0]["state_projected"]
    group = {**resolve_preset("subtrack++"), "rank": args.rank, "params": []}
    assert projected == sum(sum(param_state_bytes(w.shape, group).values()) for w in mats)
    assert all(r["state_projected"] == projected for r in rep)
    assert sum(r["state_projected"] for r in own) == projected
    largest = max(sum(param_state_bytes(w.shape, group).values()) for w in mats)
    for r in own:
        assert r["state_projected"] <= projected / WORLD + largest, (r["state_projected"], projected)
    # the plain groups' moments are this rank's rows (nano's dimensions are even: an exact split)
    plain = sum(sum(param_state_bytes(p.shape, {"params": []}).values()) for p in model.parameters()
                if all(p is not w for w in mats))
    assert all(r["state_plain"] * WORLD == plain for r in rep + own)
    for mode, rs in rows.items():  # grassopt memory --fsdp's formula for the fullest rank, exactly
        assert max(r["state_bytes"] for r in rs) == bench.estimated(args, "subtrack++", mode, WORLD)["states"], mode

    # -- bytes: ring accounting of each mode's collectives
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    projected_bytes = sum(w.numel() * 4 for w in mats)
    for r in rep:  # the gradient and the weight of every projected matrix all-gathered: (N-1)/N of 2 B
        assert _sent(r, "comm_step") == _sent(r, "comm_step", "all_gather") == projected_bytes
    owned = [r["owned"]["elements"] * 4 for r in own]
    assert sum(owned) == projected_bytes and all(0 < b < projected_bytes for b in owned)
    for r, mine in zip(own, owned):  # a non-owner sends its two shards; the owner scatters the other's rows
        others = projected_bytes - mine
        assert _sent(r, "comm_step", "gather") == 2 * others // WORLD
        assert _sent(r, "comm_step", "gather", "received") == 2 * mine // WORLD
        assert _sent(r, "comm_step", "scatter") == mine // WORLD
        assert _sent(r, "comm_step") == _sent(r, "comm_step", "gather") + _sent(r, "comm_step", "scatter")
    for r in rep + own:  # FSDP2: every gradient reduce-scattered once, every weight all-gathered at least once
        assert _sent(r, "comm_fwd_bwd", "reduce_scatter", "payload") == weight_bytes
        assert _sent(r, "comm_fwd_bwd", "all_gather", "payload") >= weight_bytes

    # -- FLOPs: the owners' steps partition the replicated step's; the balancing costs as assigned
    for phase in ("normal", "update"):
        whole = rep[0]["counted"][phase]["flops"]
        assert whole > 0 and all(r["counted"][phase]["flops"] == whole for r in rep)
        assert sum(r["counted"][phase]["flops"] for r in own) == whole
    assert rep[0]["counted"]["update"]["flops"] > rep[0]["counted"]["normal"]["flops"]
    assert math.isclose(sum(r["owned"]["cost"] for r in own), rep[0]["owned"]["cost"])


def test_the_report_keeps_its_analysis_block(fsdp_rows, tmp_path):
    bench, args, rows = fsdp_rows
    flat = [r for rs in rows.values() for r in rs]
    (tmp_path / "distributed.md").write_text("old\n<!-- analysis -->\nkept\n<!-- /analysis -->\n")
    text = bench.report(flat, args, tmp_path, wall=1.0)
    assert "| fsdp-owners | 2 |" in text and "## Targets" not in text  # (no world 1 to compare with)
    assert (tmp_path / "distributed.md").read_text().endswith("<!-- analysis -->\nkept\n<!-- /analysis -->\n")
    assert (tmp_path / "distributed.png").stat().st_size > 10_000
    assert (tmp_path / "distributed.json").stat().st_size > 1000


@pytest.mark.slow
def test_ddp_all_reduces_every_gradient_and_holds_the_whole_state():
    bench, args = _bench(), _args(modes=["ddp"])
    rows = {"ddp": bench.run_case(args, "subtrack++", "ddp", WORLD)}
    _check_rows(rows)
    model, _ = _nano(args.vocab)
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    for r in rows["ddp"]:  # the gradients all-reduced in the backward: 2 (N-1)/N of them sent; nothing in the step
        assert _sent(r, "comm_fwd_bwd") == _sent(r, "comm_fwd_bwd", "all_reduce") == weight_bytes
        assert _sent(r, "comm_step") == 0
        assert r["state_bytes"] == bench.estimated(args, "subtrack++", "ddp", WORLD)["states"]
    assert rows["ddp"][0]["counted"]["update"]["flops"] == rows["ddp"][1]["counted"]["update"]["flops"] > 0
