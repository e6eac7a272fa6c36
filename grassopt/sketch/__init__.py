"""Activation-saving linear layers: the unbiased low-rank gradient estimator and RSO.

A sketched linear layer stores only ``x P`` (``tokens x r``) instead of its input ``x``
(``tokens x n``) for the backward pass, where ``P`` (``n x r``, ``E[P P^T] = I``) is a random
matrix of law ``haar``, ``gaussian`` or ``coordinate`` (docs/algorithms.md#sketches). Layers that read
the same input (q/k/v, gate/up) share one ``P`` and one stored ``x P``.

Estimator (docs/algorithms.md#estimator): ``W.grad`` receives the unbiased ``G P P^T``; any optimizer runs on top::

    import grassopt.sketch as gs
    gs.sketch(model, rank=0.125, law="haar", mode="estimator", seed=seed)   # in place; before DDP
    opt = torch.optim.AdamW(model.parameters(), lr=lr)          # or grassopt.SubspaceAdamW(...)
    for step in range(steps):
        for micro in range(accum):                               # micro-batches share one P
            loss = model(x, y)[1] / accum
            loss.backward()
        opt.step(); opt.zero_grad()
        gs.next_step(model)                                      # fresh P for the next step
    # or, once: gs.attach(model, opt) -- calls next_step after every opt.step()

The step counter that seeds ``P`` (with the seed and the layer group) lives in the model's
``state_dict`` (each sketched layer's ``_extra_state``), so checkpoint ``model.state_dict()`` and
``opt.state_dict()`` as usual; to resume, build the model, ``sketch`` it with the same arguments,
then ``load_state_dict``: the run continues bit-identically. A checkpoint of a sketched model
loads into a sketched model (``unsketch`` first to save a plain one).

RSO (docs/algorithms.md#rso), for ``grassopt train --preset rso``::

    opt = gs.rso(model, rank=0.125, inner_steps=K, lr=lr, weight_decay=wd, mu=0.0,
                 law="haar", seed=seed)                 # sketches the model in place; then wrap in DDP
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)   # acts on every group's lr
    for step in range(steps):
        loss = model(x, y)[1]; loss.backward()          # (accumulate micro-batches as usual)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # optional
        opt.step(); opt.zero_grad(); sched.step()       # the K-th step of an outer iteration merges
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    # resume (any step, also mid outer iteration): build the model, opt = gs.rso(model, <same args>),
    # model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["optimizer"])  -> bit-identical
    gs.unsketch(model)                                  # plain nn.Linear layers, B P^T merged into W

Do not call ``next_step`` with RSO: the optimizer advances the outer iteration. The model's
``state_dict`` holds each layer's ``B`` and the sketch step; the optimizer's holds the inner Adam
state, the AdamW state and the counters; both are plain tensors and values
(``torch.load(..., weights_only=True)`` works).

Accounting: ``saved_activation_bytes(model, lambda: model(x, y)[1])`` measures the bytes saved
for the backward pass, per module and in total (``.output`` is the loss, ready for ``backward``).
"""

from .accounting import ActivationReport, saved_activation_bytes
from .api import attach, current_step, next_step, sketch, sketch_states, sketched_layers, unsketch
from .function import SketchedLinearFunction, sketched_linear
from .laws import LAWS, draw, mix_seed, projection
from .layer import MODES, ProjectionGroup, SketchedLinear, SketchState
from .rso import RSO, rso

__all__ = [
    "sketch",
    "unsketch",
    "next_step",
    "attach",
    "current_step",
    "sketched_layers",
    "sketch_states",
    "SketchedLinear",
    "SketchState",
    "ProjectionGroup",
    "SketchedLinearFunction",
    "sketched_linear",
    "RSO",
    "rso",
    "saved_activation_bytes",
    "ActivationReport",
    "LAWS",
    "MODES",
    "draw",
    "projection",
    "mix_seed",
]
