"""Layer-wise updates in one process: the same results as ``optimizer.step()``, with accumulation,
schedulers, resume and per-parameter clipping; gradients freed as they are used; clear errors."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import distributed_helpers as H  # noqa: E402

import grassopt  # noqa: E402
from grassopt.layerwise import LayerwiseError, LayerwiseUpdater, clip_grad_norm_per_parameter_  # noqa: E402

GLOBAL_BATCH = 2


@pytest.fixture(scope="module")
def batches(sotu_1k):
    sampler = sotu_1k.sampler(GLOBAL_BATCH, H.SEQ_LEN, seed=3)
    out = []
    for _ in range(32):
        x, y = sampler.next()
        out.append(torch.cat([x, y[:, -1:]], dim=1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def vocab(sotu_1k):
    return sotu_1k.vocab_size


def _schedule(step: int) -> float:
    return 1.0 / (1 + 0.3 * step)


def _run(vocab, batches, preset, *, layerwise, grad_accum, sched_first=True, clip=None):
    """Train ``len(batches) // grad_accum`` steps; return (model, optimizer, learning rates used)."""
    model = H.build_model(vocab)
    opt = H.build_optimizer(model, preset)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule) if sched_first else None
    lw = LayerwiseUpdater(opt, clip_norm=clip) if layerwise else None
    if sched is None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
    lrs = []
    for s in range(len(batches) // grad_accum):
        lrs.append(opt.param_groups[0]["lr"])
        chunk = batches[s * grad_accum:(s + 1) * grad_accum]
        if layerwise:
            H.train(model, opt, chunk, grad_accum=grad_accum, layerwise=lw)
            assert all(p.grad is None for p in model.parameters()), "a gradient survived the layer-wise step"
            assert lw.step_count == s + 1
        else:
            for b in chunk:
                (model(b[:, :-1], b[:, 1:])[1] / grad_accum).backward()
            if clip is not None:
                clip_grad_norm_per_parameter_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
    return model, opt, lrs, lw


def _assert_same(a, b, what):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what}: {name}: {m}")  # noqa: B023  called right away


@pytest.mark.parametrize("preset", ["subtrack++", "grassjump", "adamw", "adamw-torch"])
def test_accumulation_4_equals_ordinary_step(vocab, batches, preset):
    ref, _, lrs_ref, _ = _run(vocab, batches[:16], preset, layerwise=False, grad_accum=4)
    lw_model, _, lrs, lw = _run(vocab, batches[:16], preset, layerwise=True, grad_accum=4)
    assert lrs == lrs_ref and len(lrs) == 4
    _assert_same(ref, lw_model, preset)
    # the same computation, parameter by parameter: in practice bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), lw_model.parameters()))
    # stepping at every micro-batch (the classic layer-wise bug) would give something else
    every, _, _, _ = _run(vocab, batches[:16], preset, layerwise=True, grad_accum=1)
    assert not all(torch.equal(a, b) for a, b in zip(ref.parameters(), every.parameters()))


def test_gradients_are_never_all_resident(vocab, batches):
    model = H.build_model(vocab)
    opt = H.build_optimizer(model, "subtrack++")
    params = list(model.parameters())
    most = []

    def count(_p):
        most.append(sum(q.grad is not None for q in params))

    lw = LayerwiseUpdater(opt)
    for p in params:  # registered after the updater's hooks: runs once the parameter was stepped
        p.register_post_accumulate_grad_hook(count)
    b = batches[0]
    model(b[:, :-1], b[:, 1:])[1].backward()
    assert len(most) == len(params) and max(most) == 0
    lw.remove()
    most.clear()
    model(b[:, :-1], b[:, 1:])[1].backward()  # ordinary backward: the gradients pile up
    assert max(most) == len(params)


@pytest.mark.parametrize("sched_first", [True, False])
def test_scheduler_steps_once_per_step_without_warnings(vocab, batches, sched_first):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, opt, lrs, _ = _run(vocab, batches[:6], "subtrack++", layerwise=True, grad_accum=2,
                              sched_first=sched_first)
    assert lrs == [pytest.approx(H.LR * _schedule(s)) for s in range(3)]


def _save(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("preset", ["grasswalk", "adamw-torch"])
def test_resume_in_layerwise_mode(vocab, batches, preset):
    grad_accum = 2
    full, _, _, _ = _run(vocab, batches[:12], preset, layerwise=True, grad_accum=grad_accum)

    def build(layerwise):
        model = H.build_model(vocab, seed=123)  # another init: everything must come from the checkpoint
        opt = H.build_optimizer(model, preset)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
        return model, opt, sched, (LayerwiseUpdater(opt) if layerwise else None)

    model, opt, sched, lw = build(True)
    model.load_state_dict(H.build_model(vocab).state_dict())
    for s in range(3):
        H.train(model, opt, batches[2 * s:2 * s + 2], grad_accum=grad_accum, layerwise=lw)
        sched.step()
    ckpt = _save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    for layerwise in (True, False):  # the checkpoint is the optimizer's own: it moves between modes
        ckpt.seek(0)  # load afresh: torch.optim adopts loaded state tensors and updates them in place
        state = torch.load(ckpt, weights_only=True)
        model, opt, sched, lw = build(layerwise)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        for s in range(3, 6):
            H.train(model, opt, batches[2 * s:2 * s + 2], grad_accum=grad_accum, layerwise=lw)
            sched.step()
        assert all(torch.equal(a, b) for a, b in zip(full.parameters(), model.parameters())), \
            f"{preset}: resumed (layerwise={layerwise}) differs from the uninterrupted run"


def test_per_parameter_clipping_matches_a_reference(vocab, batches):
    clip, grad_accum = 0.05, 2
    chunk = batches[:grad_accum]
    model = H.build_model(vocab)
    opt = H.build_optimizer(model, "subtrack++")
    lw = LayerwiseUpdater(opt, clip_norm=clip)
    H.train(model, opt, chunk, grad_accum=grad_accum, layerwise=lw)

    ref = H.build_model(vocab)
    ref_opt = H.build_optimizer(ref, "subtrack++")
    for b in chunk:
        (ref(b[:, :-1], b[:, 1:])[1] / grad_accum).backward()
    norms, clipped = [], 0
    with torch.no_grad():
        for p in ref.parameters():  # the reference, by hand in float64
            n = p.grad.double().norm()
            norms.append(n)
            coef = min(1.0, clip / (n.item() + 1e-6))
            clipped += coef < 1
            p.grad.copy_((p.grad.double() * coef).float())
    assert 0 < clipped < len(norms), "the clip should bind for some parameters and not others"
    ref_opt.step()
    _assert_same(ref, model, "per-parameter clipping")
    torch.testing.assert_close(lw.last_grad_norm.double(), torch.stack(norms).norm(), rtol=1e-5, atol=0)
    # and clipping mattered
    free = H.build_model(vocab)
    free_opt = H.build_optimizer(free, "subtrack++")
    H.train(free, free_opt, chunk, grad_accum=grad_accum, layerwise=LayerwiseUpdater(free_opt))
    assert not all(torch.allclose(a, b) for a, b in zip(free.parameters(), model.parameters()))


def test_clip_function_equals_torch_clip_on_each_parameter():
    torch.manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p, scale in zip(ps, (0.1, 1.0, 10.0)):
        p.grad = torch.randn_like(p) * scale
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_([r], 1.0)
    norms = clip_grad_norm_per_parameter_(ps, 1.0)
    assert norms[0] < 1 < norms[2]
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- misuse
def _tiny():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    return model, grassopt.make_optimizer(model, "subtrack++", rank=2, lr=1e-2)


def test_calling_step_is_refused_and_remove_restores_it():
    model, opt = _tiny()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    lw = LayerwiseUpdater(opt)
    with pytest.raises(LayerwiseError, match=r"step\(\) was called while layer-wise"):
        opt.step()
    with pytest.raises(LayerwiseError, match="already has a LayerwiseUpdater"):
        LayerwiseUpdater(opt)
    with pytest.raises(LayerwiseError, match="global-norm gradient clipping"):
        lw.clip_grad_norm_(1.0)
    with lw.accumulate(), pytest.raises(LayerwiseError, match="nested"):
        with lw.accumulate():
            pass
    lw.remove()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()  # ordinary stepping again, through the scheduler's wrapper
    assert getattr(opt.step, "_wrapped_by_lr_sched", False)
    sched.step()
    LayerwiseUpdater(opt).remove()  # a new updater can attach after remove()


def test_refused_optimizers():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(LayerwiseError, match="LBFGS"):
        LayerwiseUpdater(torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="clip_norm"):
        LayerwiseUpdater(torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=0.0)

    class GroupCounter(torch.optim.SGD):  # keeps a step counter in the param group
        def step(self, closure=None):
            for g in self.param_groups:
                g["count"] = g.get("count", 0) + 1
            return super().step(closure)

    opt = GroupCounter(model.parameters(), lr=0.1)
    opt.param_groups[0]["count"] = 0
    LayerwiseUpdater(opt)
    with pytest.raises(LayerwiseError, match="param-group entries"):
        model(torch.randn(3, 4)).sum().backward()


def test_non_finite_gradient_says_what_was_updated():
    model, opt = _tiny()
    LayerwiseUpdater(opt)
    with pytest.raises(FloatingPointError, match="layer-wise mode"):
        (model(torch.randn(4, 8)).sum() * float("nan")).backward()


@pytest.mark.parametrize("kw", [{}, {"track_grad_norm": False}, {"clip_norm": 1.0}],
                         ids=["norm-tracked", "no-norm", "clipped"])
def test_a_torch_optimizer_never_steps_a_non_finite_gradient(kw):
    """torch's AdamW writes a NaN gradient into the weights; layer-wise, the updater refuses it first
    (with or without clipping: no clipping is where nothing else would look)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    before = [p.detach().clone() for p in model.parameters()]
    lw = LayerwiseUpdater(torch.optim.AdamW(model.parameters(), lr=1e-2), **kw)
    x = torch.randn(4, 8)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient \(NaN or inf\) in parameter \d \(\d.*\); it "
                                                 r"was not stepped.*layer-wise mode"):
        (model(x).sum() * float("nan")).backward()  # every gradient NaN: the first one stops the step
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    lw.remove()
    lw = LayerwiseUpdater(torch.optim.AdamW(model.parameters(), lr=1e-2), check_finite=False, **kw)
    (model(x).sum() * float("nan")).backward()  # unchecked: the NaN reaches the weights (what the check prevents)
    assert not all(p.isfinite().all() for p in model.parameters())


def test_rso_is_refused_in_one_line_naming_why():
    """RSO's inner-step counter and merge are per optimizer step; a per-parameter step broke on them
    (KeyError: 'inner_step' from the narrowed param group). Refused at construction instead."""
    import grassopt.sketch as gs
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = gs.rso(model, rank=4, inner_steps=2, lr=1e-2)
    with pytest.raises(ValueError, match=r"^RSO cannot be stepped layer-wise: its inner-step counter.*once per "
                                         r"optimizer step, not once per parameter; train it without layer-wise"):
        LayerwiseUpdater(opt)
    assert opt.step.__func__ is type(opt).step  # nothing attached


@pytest.mark.parametrize("preset", ["subtrack++", "adamw-torch"])
def test_step_hooks_run_once_per_step_after_backward(preset):
    """``optimizer.step()`` runs its step hooks once; so does a layer-wise step (the pre-hooks before
    the first parameter's step, the post-hooks after backward), for SubspaceAdamW and torch's AdamW."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if preset == "adamw-torch"
           else grassopt.make_optimizer(model, preset, lr=1e-2, rank=2))
    events = []
    opt.register_step_pre_hook(lambda o, a, k: events.append(("pre", sum(p.grad is None for p in model.parameters()))))
    opt.register_step_post_hook(lambda o, a, k: events.append(("post", sum(p.grad is None for p in model.parameters()))))
    from torch.optim.optimizer import register_optimizer_step_post_hook
    glob = register_optimizer_step_post_hook(lambda o, a, k: events.append(("global",)))
    lw = LayerwiseUpdater(opt)
    try:
        for step in range(3):
            model(torch.randn(5, 8)).square().sum().backward()
            # pre: before the first step (only the first gradient exists); post: every gradient stepped and freed
            assert events == [("pre", 3), ("post", 4), ("global",)] * (step + 1)
        with lw.accumulate():  # accumulation only: no step, no hooks
            model(torch.randn(5, 8)).square().sum().backward()
        assert len(events) == 9
    finally:
        glob.remove()
        lw.remove()
