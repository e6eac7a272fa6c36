"""``SubspaceAdamW(compile=True)`` (grassopt.optim._compiled): equal to the eager step, no recompilation
after warm-up (a moving rate, basis updates, a resume), and the one-line fallback.

The default cases trace the kernels with torch.compile's ``aot_eager`` backend (dynamo and AOT autograd,
no C++ compile: seconds); the inductor cases (a C++ compile per kernel, about a minute here) are slow.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from grassopt import SubspaceAdamW
from grassopt.optim import _compiled

SHAPES = [(32, 64), (64, 32), (256,), (2, 256)]  # two projected (k r a whole number of int8 blocks), two plain


def _params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((0.1 * torch.randn(s, generator=g)).to(dtype)) for s in SHAPES]


def _optimizer(ps, compile: bool, **kw) -> SubspaceAdamW:
    groups = [{"params": ps[:2], "rank": 8, "update_interval": 3}, {"params": ps[2:]}]
    return SubspaceAdamW(groups, lr=1e-2, weight_decay=0.1, compile=compile, **kw)


def _run(compile: bool, steps: int, dtype=torch.float32, resume_at: int | None = None, graphs: list | None = None,
         **kw) -> list[list[torch.Tensor]]:
    """The weights after each step, the rate moved by a schedule every step (and a resume at ``resume_at``);
    ``graphs``: gets the number of graphs dynamo has compiled so far after each step."""
    ps = _params(dtype)
    opt = _optimizer(ps, compile, **kw)
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(steps):
        if i == resume_at:
            sd = opt.state_dict()
            opt = _optimizer(ps, compile, **kw)
            opt.load_state_dict(sd)
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 - i / (2 * steps))
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
        out.append([p.detach().float().clone() for p in ps])
        if graphs is not None:
            graphs.append(counters["stats"]["unique_graphs"])
    return out


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(a, b))


CASES = [dict(state_dtype="int8"), dict(state_dtype="int8", dtype=torch.bfloat16, stochastic_rounding=True),
         dict(dtype=torch.bfloat16, stochastic_rounding=True)]


@pytest.fixture
def traced(monkeypatch):
    """The kernels traced by dynamo and AOT autograd, run eagerly (no C++ compile)."""
    monkeypatch.setattr(_compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()


def _per_step(steps: int, dtype=torch.float32, **kw) -> tuple[list[float], list[int]]:
    """The relative difference of the compiled step from the eager one at each step, both started from the
    eager run's weights and state (loaded into the compiled optimizer before every step: a resume each
    step), with a moving rate; and the graphs dynamo has compiled after each step."""
    ps_e, ps_c = _params(dtype), _params(dtype)
    opt_e, opt_c = _optimizer(ps_e, False, **kw), _optimizer(ps_c, True, **kw)
    g = torch.Generator().manual_seed(1)
    rel, graphs = [], []
    for i in range(steps):
        for opt in (opt_e, opt_c):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (1 - i / (2 * steps))
        for pe, pc in zip(ps_e, ps_c):
            pe.grad = torch.randn(pe.shape, generator=g).to(dtype)
            pc.grad = pe.grad.clone()
        opt_e.step()
        opt_c.step()
        rel.append(_rel([p.float() for p in ps_e], [p.float() for p in ps_c]))
        graphs.append(counters["stats"]["unique_graphs"])
        with torch.no_grad():
            for pe, pc in zip(ps_e, ps_c):
                pc.copy_(pe)
        opt_c.load_state_dict(opt_e.state_dict())
    return rel, graphs


@pytest.mark.parametrize("case", CASES, ids=["int8", "int8-bf16-sr", "bf16-sr"])
def test_the_traced_step_equals_the_eager_step_without_recompiling(traced, case):
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        rel, graphs = _per_step(7, **case)
    assert max(rel) <= (1e-6 if case.get("dtype") is None else 2 ** -7), rel  # bf16: its ulp at most
    # the plain and the projected kernels were traced (the compiled path ran), all at the first step: no
    # recompilation after it, through a moving rate, basis updates (every 3 steps) and a resume at every step
    assert graphs[0] >= 2 and graphs[-1] == graphs[0], graphs


def test_compile_is_checked():
    with pytest.raises(ValueError, match=r"^compile=1 must be True or False$"):
        SubspaceAdamW([torch.nn.Parameter(torch.zeros(2))], compile=1)


def test_without_a_compiler_one_warning_and_the_eager_step(monkeypatch):
    monkeypatch.setattr(_compiled, "unavailable", lambda device: "no C++ compiler found (inductor's CPU backend "
                                                                 "needs one; set CXX)")
    eager = _run(False, 4, state_dtype="int8")
    with pytest.warns(RuntimeWarning) as caught:
        compiled = _run(True, 4, state_dtype="int8")
    messages = [str(w.message) for w in caught if "compile=True" in str(w.message)]
    assert messages == ["compile=True: no C++ compiler found (inductor's CPU backend needs one; set CXX); running "
                        "the eager step"]
    assert all(torch.equal(a, b) for e, c in zip(eager, compiled) for a, b in zip(e, c))


@pytest.mark.parametrize("case", CASES[:2], ids=["int8", "int8-bf16-sr"])
def test_a_compiler_failure_warns_once_and_runs_the_eager_step(monkeypatch, case):
    def broken(gm, inputs):
        raise RuntimeError("inductor crashed\nsecond line")

    monkeypatch.setattr(_compiled, "BACKEND", broken)
    torch._dynamo.reset()
    eager = _run(False, 3, **case)
    with pytest.warns(RuntimeWarning) as caught:
        compiled = _run(True, 3, **case)  # bit for bit: the rounding generator is rewound after the failure
    messages = [str(w.message) for w in caught if "compile=True" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("compile=True: torch.compile failed (")
    assert "\n" not in messages[0] and messages[0].endswith("; running the eager step")
    assert all(torch.equal(a, b) for e, c in zip(eager, compiled) for a, b in zip(e, c))


@pytest.mark.slow
def test_inductor_equals_eager_at_every_step_and_never_recompiles():
    """The inductor kernels: within 1e-6 relative of the eager step at every step (from the same state),
    with a moving rate, basis updates and a resume at every step; nothing compiled after the first step;
    and the drift of a 100-step run from the eager run (printed)."""
    torch._dynamo.reset()
    counters.clear()
    rel, graphs = _per_step(10, state_dtype="int8")
    assert max(rel) <= 1e-6, rel
    assert graphs[0] >= 3 and graphs[-1] == graphs[0], graphs
    eager = _run(False, 100, resume_at=50, state_dtype="int8")
    compiled = _run(True, 100, resume_at=50, state_dtype="int8")
    assert counters["stats"]["unique_graphs"] == graphs[0]
    foreach = _run(False, 100, resume_at=50, state_dtype="int8", fused=False)  # the eager step's own rounding
    drift, own = ([_rel(e, c) for e, c in zip(eager, run)] for run in (compiled, foreach))
    print(f"per step: max {max(rel):.2e}; drift of the compiled run: step 1 {drift[0]:.2e}, step 10 {drift[9]:.2e}, "
          f"step 100 {drift[-1]:.2e}, max {max(drift):.2e}; of the eager foreach run: step 10 {own[9]:.2e}, "
          f"step 100 {own[-1]:.2e}, max {max(own):.2e}")
    assert max(drift) <= 1e-3  # int8 codes flip on 1-ulp differences: the runs drift apart, as fused and foreach do


@pytest.mark.slow
def test_training_with_compile_matches_eager_and_resumes_without_recompiling(tmp_path, sotu_1k, monkeypatch):
    """`grassopt train --compile` end to end (nano, int8 moments, rank 16: projected and plain groups), stopped
    and resumed: nothing compiled after the resume, and the final weights as far from the eager run's as the eager
    step on foreach ops ends from it (its float32 rounding)."""
    import os

    from grassopt import functional
    from grassopt.train.loop import TrainConfig, train

    def cfg(out, **kw):
        return TrainConfig(model="nano", vocab_size=1024, seq_len=64, batch_size=4, steps=16, lr=3e-3, rank=16,
                           update_interval=5, eval_every=1000, log_every=4, progress=False, plot=False, threads=1,
                           state_dtype="int8", out=str(tmp_path / out), **kw)

    train(cfg("eager"), dataset=sotu_1k)
    torch._dynamo.reset()
    train(cfg("compiled", compile=True, stop_after=8), dataset=sotu_1k)
    counters.clear()
    train(cfg("compiled", compile=True, resume=True), dataset=sotu_1k)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])  # compiled at step 1, before the resume

    def weights(out):
        return torch.load(os.path.join(tmp_path, out, "checkpoint.pt"), weights_only=True)["model"]

    monkeypatch.setattr(functional, "fused_available", lambda tensors: False)  # the eager step on foreach ops
    train(cfg("foreach"), dataset=sotu_1k)

    def rel(a, b):
        return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)

    e = weights("eager")
    drift, own = rel(e, weights("compiled")), rel(e, weights("foreach"))
    print(f"after 16 steps: compiled {drift:.2e}, eager foreach {own:.2e} (relative to the eager run, largest tensor)")
    # an int8 code that flips on a 1-ulp difference moves one element by about lr: both drift alike
    assert drift <= 10 * own + 1e-6
