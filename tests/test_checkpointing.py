"""Activation checkpointing per decoder block (``LlamaConfig(checkpoint_activations=True)``): the
same losses and gradients bit for bit, alone and with lean activations, sketching and layer-wise
updates; only the block inputs saved; hooks fire once; off in evaluation and without autograd."""

from __future__ import annotations

import pytest
import torch

import grassopt
import grassopt.sketch as gs
from grassopt.layerwise import LayerwiseUpdater
from grassopt.train.estimate import activation_bytes
from grassopt.train.model import Llama, config

VOCAB, B, T, STEPS = 512, 2, 16, 3


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (B, T + 1), generator=g) for _ in range(STEPS)]


def _train(checkpoint: bool, *, lean=False, sketch=None, layerwise=False, preset="subtrack++", low_bit=False):
    """A few steps on ``nano``; returns (losses, gradients per step by name, hook firings per
    parameter, forward calls of block 0's attention, the model). ``low_bit``: bf16 weights with
    stochastic rounding and int8 optimizer states (the 7B-on-24-GiB settings)."""
    torch.manual_seed(0)
    model = Llama(config("nano", vocab_size=VOCAB, lean_activations=lean, checkpoint_activations=checkpoint))
    if low_bit:
        model.to(torch.bfloat16)
    if sketch is not None:
        gs.sketch(model, rank=0.25, law=sketch, mode="estimator", seed=7)
    names = {p: n for n, p in model.named_parameters()}
    if low_bit:
        from grassopt.presets import param_groups
        opt = grassopt.SubspaceAdamW(param_groups(model, preset, 8, 2), lr=1e-2, state_dtype="int8",
                                     stochastic_rounding=True)
    else:
        opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=8, update_interval=2)
    grads: list[dict[str, torch.Tensor]] = []
    fired: dict[str, int] = dict.fromkeys(names.values(), 0)

    def record(p):  # registered before the updater's hook: sees each gradient before its step
        fired[names[p]] += 1
        grads[-1][names[p]] = p.grad.detach().clone()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(record)
    lw = LayerwiseUpdater(opt) if layerwise else None
    calls = [0]
    model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    losses = []
    for b in _batches():
        grads.append({})
        loss = model(b[:, :-1], b[:, 1:])[1]
        loss.backward()
        losses.append(loss.detach())
        if lw is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            assert all(p.grad is None for p in model.parameters())
        if sketch is not None:
            gs.next_step(model)
    return torch.stack(losses), grads, fired, calls[0], model


@pytest.mark.parametrize("case", [
    dict(),
    dict(lean=True),
    dict(sketch="haar"),
    dict(layerwise=True),
    dict(lean=True, sketch="haar", layerwise=True),
    dict(preset="adamw"),
    dict(low_bit=True, layerwise=True),
    dict(low_bit=True, layerwise=True, lean=True, sketch="haar"),
], ids=["plain", "lean", "haar", "layerwise", "lean-haar-layerwise", "adamw", "bf16-int8-layerwise",
        "bf16-int8-layerwise-lean-haar"])
def test_bit_identical_losses_and_gradients(case):
    ref_losses, ref_grads, ref_fired, ref_calls, ref_model = _train(False, **case)
    losses, grads, fired, calls, model = _train(True, **case)
    assert ref_calls == STEPS and calls == 2 * STEPS  # the checkpoint really recomputed each block
    assert torch.equal(losses, ref_losses)
    for step, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.keys() == r.keys() and len(g) == len(list(model.parameters()))
        for name in r:
            assert torch.equal(g[name], r[name]), f"step {step}: {name}"
    # the post-accumulate-grad hooks (layer-wise updates) fire exactly once per parameter and step
    assert fired == ref_fired == {n: STEPS for n in fired}
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name
        assert p.dtype == (torch.bfloat16 if case.get("low_bit") else torch.float32)


def test_sketched_recompute_uses_the_forward_pass_p():
    """P comes from (seed, step, group): the recomputation in backward finds the P of the forward
    pass; the gradient of a sketched weight is G P P^T with exactly that P."""
    _, grads, _, _, model = _train(True, sketch="haar")
    layer = model.layers[0].self_attn.q_proj
    assert gs.current_step(model) == STEPS
    _, ref_grads, _, _, _ = _train(False, sketch="haar")
    g = grads[-1]["layers.0.self_attn.q_proj.weight"]
    assert torch.equal(g, ref_grads[-1]["layers.0.self_attn.q_proj.weight"])
    # g = G P P^T with the last step's P (step STEPS - 1): its rows lie in P's column space, and
    # not in that of another step's P
    def residual(step):
        layer._group.state.step = step
        q, _ = torch.linalg.qr(layer.projection_matrix().double())
        return (g.double() - g.double() @ q @ q.T).norm() / g.double().norm()

    assert residual(STEPS - 1) < 1e-6
    assert residual(STEPS) > 0.1 and residual(STEPS - 2) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_only_block_inputs_are_saved(dtype):
    cfg = config("nano", vocab_size=VOCAB, checkpoint_activations=True)
    torch.manual_seed(0)
    model = Llama(cfg).to(dtype)
    idx, tgt = _batches()[0][:, :-1].contiguous(), _batches()[0][:, 1:].contiguous()
    rep = gs.saved_activation_bytes(model, lambda: model(idx, tgt)[1])
    plain = activation_bytes(cfg, B, T, dtype)
    a = torch.empty((), dtype=dtype).element_size()
    rotary = 2 * 4 * T * cfg.head_dim  # cos and sin, kept by the first block's checkpoint
    assert rep.prefixed("layers.0") == a * cfg.hidden_size * B * T + rotary
    assert rep.prefixed("layers.1") == a * cfg.hidden_size * B * T
    head = plain["norm"] + plain["lm_head"] + plain["loss"] + plain["inputs"] - rotary
    assert rep.total == cfg.num_layers * a * cfg.hidden_size * B * T + rotary + head
    assert rep.total < sum(plain.values())
    rep.output.backward()


def test_not_in_eval_or_without_grad():
    torch.manual_seed(0)
    model = Llama(config("nano", vocab_size=VOCAB, checkpoint_activations=True))
    calls = [0]
    model.layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    inner = [0]
    model.layers[0].mlp.register_forward_pre_hook(lambda *_: inner.__setitem__(0, inner[0] + 1))
    idx = _batches()[0][:, :-1]
    model.eval()
    rep = gs.saved_activation_bytes(model, lambda: model(idx, idx)[1])
    assert rep.prefixed("layers.0") > 4 * 64 * B * T * 4  # eval mode with grad: everything saved
    rep.output.backward()
    assert inner[0] == 1  # no recomputation
    model.train()
    with torch.no_grad():
        model(idx, idx)
    assert inner[0] == 2 and calls[0] == 2


@pytest.mark.parametrize("preset", ["subtrack++", "adamw-torch"])
def test_attach_with_layerwise_advances_p_once_per_step_after_backward(preset):
    """``gs.attach`` advances the sketch step from the optimizer's step post-hook; in layer-wise mode
    that hook runs once per step, after backward, so the recomputed blocks find the forward's P."""
    def run(checkpoint):
        torch.manual_seed(0)
        model = Llama(config("nano", vocab_size=VOCAB, checkpoint_activations=checkpoint))
        gs.sketch(model, rank=0.25, law="haar", mode="estimator", seed=7)
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if preset == "adamw-torch"
               else grassopt.make_optimizer(model, preset, lr=1e-2, rank=8))
        gs.attach(model, opt)
        LayerwiseUpdater(opt)
        steps = []
        for b in _batches():
            model(b[:, :-1], b[:, 1:])[1].backward()
            steps.append(gs.current_step(model))
        return steps, [p.detach().clone() for p in model.parameters()]

    steps, params = run(False)
    assert steps == list(range(1, STEPS + 1))
    steps_ck, params_ck = run(True)
    assert steps_ck == steps
    assert all(torch.equal(a, b) for a, b in zip(params, params_ck))
