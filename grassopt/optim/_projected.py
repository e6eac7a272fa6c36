"""The projected step of ``SubspaceAdamW`` as functions of explicit tensors and settings.

One step of a projected group (docs/algorithms.md#projected-step), over a :class:`Batch` (the
group's oriented gradients ``X``, bases ``Q`` and ``R = Q^T X``), the parameters' state dicts and
diagnostics dicts:

1. :func:`maintain_bases_`: the first basis, the scheduled basis updates (with the moments'
   transport), error feedback's ``X = G + E``, the step counts; returns the Adam step sizes;
2. :func:`directions_`: ``scale * N``, Adam in the subspace on the group's moment codec;
3. :func:`scales`: the recovery (or APOLLO) scales ``c Phi``, the limiter folded in;
4. :func:`apply_updates_`: the weights, and error feedback's new ``E``.

:func:`projected_step_` runs the four. The class holds groups, state, generators and checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from .. import bases
from .. import functional as F
from .. import recovery as rec
from ..codecs import Codec
from ..linalg import is_transposed, largest_angle, orient, reorthonormalize
from ..qlinear import int8_module
from ..rules import RuleContext, rule_flag
from ..transport import transport
from . import _compiled
from .state import init_state

__all__ = ["Batch", "mix_seed", "seeded_basis", "prepare", "projected_step_", "maintain_bases_", "directions_",
           "scales", "apply_updates_", "transport_moments_"]

#: ``index -> generator`` of a batch's parameter (the optimizer's, created on first use)
GeneratorOf = Callable[[int], torch.Generator]


def mix_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed from ``(seed, parameter index)`` (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class Batch:
    """One step's working set of a projected group: oriented gradients, bases and ``R = Q^T X`` per
    matrix. (One shared ``(sum k) x r`` buffer for the group was tried and measured slower on the
    CPU: a fresh large allocation every step costs its page faults, about 1 ms per 4 MB here.)"""

    def __init__(self, chosen: list[tuple[int, Tensor]], params: list[Tensor]) -> None:
        self.chosen, self.params = chosen, params
        self.ks = [max(p.shape) for p in params]
        n = len(params)
        # None until filled (a matrix's entries are set before they are read): typed as Any for that
        self.xs: list[Any] = [None] * n
        self.qs: list[Any] = [None] * n
        self.rts: list[Any] = [None] * n

    def project(self, j: int) -> None:
        """``R_j = (Q_j^T X_j)^T`` (``k x r``)."""
        self.rts[j] = self.xs[j].mT @ self.qs[j]

    def checks(self):
        """``(index, tensor)`` to check for each matrix: its ``R``, or its gradient before it has one
        (first step, basis updates of seeded rules, error feedback)."""
        for (i, p), rt in zip(self.chosen, self.rts):
            yield i, (p.grad if rt is None else rt)

    def directions(self) -> list[Tensor]:
        """Zeroed ``k x r`` outputs for ``scale * N``."""
        return [torch.zeros_like(rt) for rt in self.rts]

    def segments(self, device) -> Tensor:
        """The matrix index of every slice ``j`` of the concatenated per-slice vectors."""
        return torch.repeat_interleave(torch.arange(len(self.ks), device=device),
                                       torch.tensor(self.ks, device=device))


def seeded_basis(rule, group: dict[str, Any], seed: int, x: Tensor, cache: dict[str, torch.Generator]) -> Tensor:
    """The basis of a ``FROM_SEED`` rule for ``seed``: ``rule.init`` with a generator seeded from it
    (one scratch generator per device in ``cache``, reseeded before each use)."""
    key = str(x.device)
    gen = cache.get(key)
    if gen is None:
        gen = cache[key] = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    ctx = RuleContext(rank=group["rank"], transposed=False, options=group, generator=gen)
    return rule.init(x, ctx).to(torch.float32)


def prepare(group: dict[str, Any], rule, chosen: list[tuple[int, Tensor]], states: list[dict],
            cache: dict[str, torch.Generator]) -> Batch:
    """The oriented gradients of a projected group, its current bases, and ``R = Q^T X`` where a basis
    exists (error feedback forms ``X = G + E`` after the finiteness check: nothing yet)."""
    seeded, T = rule_flag(rule, "FROM_SEED"), group["update_interval"]
    batch = Batch(chosen, [p for _, p in chosen])
    if group.get("error_feedback", False):
        return batch
    for j, ((_, p), st) in enumerate(zip(chosen, states)):
        x = batch.xs[j] = orient(cast(Tensor, p.grad))  # d x k, float32 (the step steps parameters with one)
        q = None
        if seeded:  # regenerated, except at a basis update (the old one is not needed)
            if "seed" in st and st["step"] % T:
                q = seeded_basis(rule, group, st["seed"], x, cache)
        else:
            q = bases.load(st) if "Q" in st else None
        batch.qs[j] = q
        if q is not None:
            batch.project(j)
    return batch


def transport_moments_(codec: Codec, kind: str, q_old: Tensor, q_new: Tensor, st: dict[str, Any]) -> None:
    """Transport the moments of ``st`` from ``q_old`` to ``q_new`` (decoded to float32 and back)."""
    m, v = codec.load(st)
    shape = codec.shape(st)
    restart = transport(kind, q_old, q_new, m.view(shape), v.view(shape))
    codec.store(st, m, v)
    if restart:
        st["adam_step"] = 0


def _error_feedback_(st: dict[str, Any], p: Tensor) -> Tensor:
    """``X = G + E`` formed in the error buffer itself (E is X until the end of the step); returns it oriented."""
    e, g = st.get("error"), cast(Tensor, p.grad)
    if e is None:
        e = st["error"] = torch.empty_like(p, dtype=torch.float32, memory_format=torch.contiguous_format).copy_(g)
    else:
        e.add_(g)
    return orient(e)


def _first_basis_(batch: Batch, j: int, st: dict[str, Any], ctx: RuleContext, *, rule, group: dict[str, Any],
                  seed: int, cache: dict) -> None:
    """The initial basis (or its seed) and zero state of a matrix's first step."""
    x = batch.xs[j]
    if rule_flag(rule, "FROM_SEED"):
        st["seed"] = seed
        q = seeded_basis(rule, group, seed, x, cache)
    else:
        bases.store(st, rule.init(x, ctx).to(torch.float32), group["basis_dtype"])
        q = bases.load(st)  # the stored basis, as every later step decodes it
    init_state(st, group, batch.params[j])
    batch.qs[j] = q
    batch.project(j)


def _update_basis_(batch: Batch, j: int, st: dict[str, Any], ctx: RuleContext, *, rule, group: dict[str, Any],
                   codec: Codec, cache: dict) -> Tensor | None:
    """A scheduled basis update and the moments' transport; returns the angle turned (or None)."""
    x = batch.xs[j]
    if rule_flag(rule, "FROM_SEED"):  # a fresh draw from a new seed; keep/reset transports need no old basis
        st["seed"] = mix_seed(st["seed"], st["step"])
        q = seeded_basis(rule, group, st["seed"], x, cache)
        transport_moments_(codec, group["transport"], q, q, st)
        angle = None
    else:
        q_old = batch.qs[j] if batch.qs[j] is not None else bases.load(st)
        if bases.compressed(st) and rule_flag(rule, "ORTHONORMAL"):  # the rule's maths needs orthonormal columns
            q_old = reorthonormalize(q_old, tol=0.0)
            batch.rts[j] = None
        if batch.rts[j] is None:
            batch.qs[j] = q_old
            batch.project(j)
        ctx.projected = batch.rts[j].mT
        q_new = rule.update(q_old, x, ctx)
        if q_new is not q_old:
            orthonormal = rule_flag(rule, "ORTHONORMAL")
            q_new = q_new.to(torch.float32)
            if orthonormal:
                q_new = reorthonormalize(q_new)
            q_new = q_new.contiguous()
            angle = ctx.angle if ctx.angle is not None else largest_angle(q_old, q_new) if orthonormal else None
            transport_moments_(codec, group["transport"], q_old, q_new, st)
            bases.store(st, q_new, group["basis_dtype"])
            q = bases.load(st)
        else:
            q, angle = q_old, x.new_zeros(())
    batch.qs[j] = q
    batch.project(j)
    return angle


def maintain_bases_(batch: Batch, states: list[dict], diags: list[dict], *, rule, group: dict[str, Any],
                    codec: Codec, seeds: list[int], generator: GeneratorOf, cache: dict) -> tuple[list[bool], list[float]]:
    """Per matrix: error feedback's ``X``, the first basis or a scheduled update (with transport), ``R``,
    the step counts and diagnostics. Returns whether each matrix's basis was updated and its Adam step
    size ``lr sqrt(1 - b2^t) / (1 - b1^t)`` (``seeds``: the first seed of each matrix of a seeded rule)."""
    b1, b2 = group["betas"]
    needs_gen = rule.NEEDS_GENERATOR and not rule_flag(rule, "FROM_SEED")
    updated, sizes = [], []
    for j, (p, st, diag) in enumerate(zip(batch.params, states, diags)):
        if group.get("error_feedback", False):
            batch.xs[j] = _error_feedback_(st, p)
        ctx = RuleContext(rank=group["rank"], transposed=is_transposed(p.shape), options=group,
                          generator=generator(j) if needs_gen else None)
        basis_update = True
        if "step" not in st:
            _first_basis_(batch, j, st, ctx, rule=rule, group=group, seed=seeds[j], cache=cache)
            diag.update(angle=None, last_update=0)
        elif st["step"] % group["update_interval"] == 0:
            angle = _update_basis_(batch, j, st, ctx, rule=rule, group=group, codec=codec, cache=cache)
            diag.update(angle=angle, last_update=st["step"])
        else:
            basis_update = False
            if batch.rts[j] is None:  # error feedback: X was only formed now
                batch.qs[j] = bases.load(st)
                batch.project(j)
        if ctx.svd_fallbacks:
            diag["svd_fallbacks"] = diag.get("svd_fallbacks", 0) + ctx.svd_fallbacks
        st["step"] += 1
        st["adam_step"] += 1
        diag["step"] = st["step"]
        updated.append(basis_update)
        t = st["adam_step"]
        sizes.append(group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t))
    return updated, sizes


def directions_(batch: Batch, states: list[dict], *, codec: Codec, betas: tuple[float, float], eps: float,
                scale: float, fused: bool | None, generator: GeneratorOf,
                kernels: _compiled.Kernels | None = None) -> list[Tensor]:
    """``scale * N`` for every matrix (moments updated in place): dense moments in one fused call per
    Adam step count, others one matrix at a time, a chunk at a time (``generator``: the rounding
    generator, for a codec that rounds stochastically; ``kernels``: compiled where they can be)."""
    out = batch.directions()
    if not codec.DENSE:
        for j, st in enumerate(states):
            nt = None if kernels is None else _compiled.direction_(kernels, batch.rts[j], st, betas=betas, eps=eps,
                                                                   scale=scale, codec=codec)
            if nt is not None:
                out[j] = nt
                continue
            gen = generator(j) if codec.needs_generator(st) else None
            out[j].copy_(F.direction_tensor_(batch.rts[j], st, st["adam_step"], betas=betas, eps=eps, scale=scale,
                                             generator=gen, fused=fused, codec=codec))
        return out
    batches: dict[int, list[int]] = {}
    for j, st in enumerate(states):
        batches.setdefault(st["adam_step"], []).append(j)
    for t, idx in batches.items():
        ms, vs = zip(*(codec.tensors(states[j]) for j in idx))
        F.adam_direction_([batch.rts[j] for j in idx], list(ms), list(vs), t, betas=betas, eps=eps, scale=scale,
                          fused=fused, out=[out[j] for j in idx])
    return out


def scales(batch: Batch, nts: list[Tensor], states: list[dict], diags: list[dict], *, scaling: str | None,
           zeta: float, scale: float, kernels: _compiled.Kernels | None = None) -> list[Tensor]:
    """The recovery (or APOLLO) scales ``c Phi`` of every matrix, with the limiter folded in.

    ``nts`` hold ``scale * N``. ``||X_j||^2`` (recovery and channel scaling) is the only pass over
    the gradients besides the two products; the per-slice arithmetic and the limiter run once
    over the group's concatenated slice vectors (one compiled kernel with ``kernels``).
    """
    xs, rts = batch.xs, batch.rts
    n = len(rts)
    if scaling == "tensor":
        phis = [rec.tensor_scale(rt, nt) / scale for rt, nt in zip(rts, nts)]
        s_norm = torch.stack([phi * torch.linalg.vector_norm(x) for phi, x in zip(phis, xs)])
    else:
        sizes = [rt.shape[0] for rt in rts]
        r_norm = torch.cat([torch.linalg.vector_norm(rt, dim=1) for rt in rts])
        n_norm = torch.cat([torch.linalg.vector_norm(nt, dim=1) for nt in nts])
        x_col2 = torch.cat([rec.col_sq(x) for x in xs])
        if kernels is not None and kernels.usable(r_norm.device):
            done = _compiled_scales(kernels, batch, r_norm, n_norm, x_col2, states, diags, scaling=scaling,
                                    zeta=zeta, scale=scale)
            if done is not None:
                return list(done.split(sizes))
        phi = n_norm.div_(r_norm.add(rec.PHI_EPS))
        if scale != 1.0:
            phi.div_(scale)
        seg = batch.segments(phi.device)

        def seg_sum(v: Tensor) -> Tensor:
            return torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, seg, v)

        if scaling == "channel":  # ||X Phi||^2 = sum_j phi_j^2 ||X_j||^2
            s_norm = seg_sum(phi.square() * x_col2).sqrt_()
        else:  # recovery: the residual E Phi only, ||E_j||^2 = ||X_j||^2 - ||R_j||^2
            e_col2 = (x_col2 - r_norm.square_()).clamp_min_(0.0)
            s_norm = seg_sum(phi.square() * e_col2).sqrt_()
            e = seg_sum(e_col2).sqrt_()
            ratio = e / seg_sum(x_col2).sqrt_().clamp_min(1e-30)
    prev = [s["residual_norm"] for s in states]
    c = rec.limit(s_norm, torch.stack(prev), zeta)
    torch._foreach_copy_(prev, list((s_norm * c).unbind()))
    cs = c.unbind()
    if scaling is None:
        for d, ei, ri, ci in zip(diags, e.unbind(), ratio.unbind(), cs):
            d.update(residual_norm=ei, residual_ratio=ri, limiter=ci)
    else:
        for d, ci in zip(diags, cs):
            d.update(limiter=ci)
    if scaling == "tensor":
        return [phi * ci for phi, ci in zip(phis, cs)]
    return list(phi.mul_(c[seg]).split(sizes))  # the limiter folded into Phi


def _compiled_scales(kernels: _compiled.Kernels, batch: Batch, r_norm: Tensor, n_norm: Tensor, x_col2: Tensor,
                     states: list[dict], diags: list[dict], *, scaling: str | None, zeta: float,
                     scale: float) -> Tensor | None:
    """:func:`scales`' arithmetic and limiter as one compiled kernel (:func:`grassopt.optim._compiled.recovery_scales`):
    the concatenated ``c Phi``, or None when it could not run (nothing changed then)."""
    prev = [s["residual_norm"] for s in states]
    hp = torch.tensor([scale, zeta, rec.PHI_EPS], dtype=torch.float32, device=r_norm.device)
    ok, out = kernels.run(_compiled.recovery_scales, r_norm, n_norm, x_col2, batch.segments(r_norm.device),
                          torch.stack(prev), hp, len(prev), scaling == "channel")
    if not ok:
        return None
    phi, c, kept, e, ratio = out
    torch._foreach_copy_(prev, list(kept.unbind()))
    for d, ei, ri, ci in zip(diags, e.unbind(), ratio.unbind(), c.unbind()):
        d.update(limiter=ci) if scaling is not None else d.update(residual_norm=ei, residual_ratio=ri, limiter=ci)
    return phi


def _residual_diagnostics(diag: dict, x: Tensor, rt: Tensor) -> None:
    """``||X - Q Q^T X||`` and its share of ``||X||`` (at basis updates, without recovery)."""
    x2 = rec.col_sq(x).sum()
    e = (x2 - rt.square().sum()).clamp_min(0).sqrt()
    diag.update(residual_norm=e, residual_ratio=e / x2.sqrt().clamp_min(1e-30))


def apply_updates_(batch: Batch, states: list[dict], nts: list[Tensor], phis: list[Tensor],
                   sizes: list[float], residual_diags: list[dict | None], *, group: dict[str, Any],
                   generator: GeneratorOf) -> None:
    """``W = (W - s D)(1 - lr wd)`` for every matrix (``D``: the back-projected ``N``, plus the recovery
    term; or APOLLO's scaled gradient), rounded into a low-precision ``W`` (stochastically from
    ``generator``, the rounding generator, with ``stochastic_rounding``); then error feedback's
    ``E = X - Q R``. An int8 weight (:func:`grassopt.qlinear.int8_module`) is dequantized, updated in
    float32 and requantized onto its grid (stochastically with ``stochastic_rounding``). ``nts`` already
    hold ``alpha N - alpha_r c R Phi`` with recovery."""
    scaling, feedback, recovery = group.get("scaling"), group.get("error_feedback", False), group["recovery"]
    alpha = group["alpha"]
    alpha_r = alpha if group["alpha_r"] is None else group["alpha_r"]
    decay = 1.0 - group["lr"] * group["weight_decay"]  # decoupled decay after the update, folded into it
    for j, (p, x, q, st, rt, nt, step_size) in enumerate(zip(batch.params, batch.xs, batch.qs, states, batch.rts,
                                                             nts, sizes)):
        transposed = is_transposed(p.shape)
        q8 = int8_module(p)  # an int8 weight (grassopt.qlinear): its float32 values, requantized below
        w = q8.read().view(p.shape) if q8 is not None else p if p.dtype == torch.float32 else p.float()
        # the raw gradient in W's layout: p.grad itself when W is float32 and X was not rebuilt
        g = cast(Tensor, p.grad) if w is p and not feedback else x.mT if transposed else x
        if scaling is not None:  # APOLLO: D = alpha c X Phi, nothing back-projected
            phi = phis[j] if scaling == "tensor" else phis[j].unsqueeze(1) if transposed else phis[j].unsqueeze(0)
            if group["weight_decay"]:
                w.mul_(decay)
            w.addcmul_(g, phi, value=-step_size * alpha * decay)
        else:
            diag = residual_diags[j]
            if diag is not None:
                _residual_diagnostics(diag, x, rt)
            if transposed:  # W (m x n) -= step (Q N)^T = Nt Q^T: no full-size temporary
                w.addmm_(nt, q.mT, beta=decay, alpha=-step_size * decay)
            else:
                w.addmm_(q, nt.mT, beta=decay, alpha=-step_size * decay)
            if recovery:  # + alpha_r c X Phi, with Phi along the long side
                phi = phis[j].unsqueeze(1)
                w.addcmul_(g, phi if transposed else phi.mT, value=-step_size * alpha_r * decay)
        if q8 is not None:
            q8.write_(w.view(-1), generator=generator(j) if group["stochastic_rounding"] else None)
        elif w is not p:
            if group["stochastic_rounding"]:
                F.stochastic_round_(p, w, generator(j))
            else:
                p.copy_(w)
        if feedback:  # E = X - Q R, in place in the buffer that held X (m x n)
            if transposed:
                st["error"].addmm_(rt, q.mT, alpha=-1.0)
            else:
                st["error"].addmm_(q, rt.mT, alpha=-1.0)


def projected_step_(batch: Batch, states: list[dict], diags: list[dict], *, rule, group: dict[str, Any],
                    codec: Codec, seeds: list[int], generator: GeneratorOf, rounding_generator: GeneratorOf,
                    cache: dict, fused: bool | None, kernels: _compiled.Kernels | None = None) -> None:
    """One step for every matrix of a projected group: per-matrix basis maintenance and products;
    Adam (fused), the recovery norms and the limiter batched over the group. The rules draw from
    ``generator``, the stochastic roundings (weights, codec state) from ``rounding_generator``: turning
    rounding on or off never changes a basis. ``kernels`` (``compile=True``): the compiled kernels of
    :mod:`grassopt.optim._compiled` where they apply."""
    scaling, recovery = group.get("scaling"), group["recovery"]
    updated, sizes = maintain_bases_(batch, states, diags, rule=rule, group=group, codec=codec, seeds=seeds,
                                     generator=generator, cache=cache)
    alpha = group["alpha"]
    scale = alpha if scaling is None else 1.0  # nts = scale * N
    nts = directions_(batch, states, codec=codec, betas=group["betas"], eps=group["eps"], scale=scale,
                      fused=fused, generator=rounding_generator, kernels=kernels)
    phis: list[Tensor] = []  # (none without recovery or scaling)
    if scaling is not None or recovery:
        phis = scales(batch, nts, states, diags, scaling=scaling, zeta=group["zeta"], scale=scale, kernels=kernels)
    if recovery:  # alpha N - alpha_r c R Phi
        alpha_r = alpha if group["alpha_r"] is None else group["alpha_r"]
        for nt, rt, phi in zip(nts, batch.rts, phis):
            nt.addcmul_(rt, phi.unsqueeze(1), value=-alpha_r)
    orthonormal = rule_flag(rule, "ORTHONORMAL")
    residual_diags = [d if (not recovery and up and orthonormal and scaling is None) else None
                      for d, up in zip(diags, updated)]
    apply_updates_(batch, states, nts, phis, sizes, residual_diags, group=group, generator=rounding_generator)
