"""The ``galore`` preset against the reference package ``galore-torch==1.0`` on the same gradients."""

import warnings

import pytest
import torch

import grassopt

galore_torch = pytest.importorskip("galore_torch", reason="install the test extra: pip install -e .[test]")


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)], ids=["m<n", "m>n", "square"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_galore_preset_matches_galore_torch_step_by_step(shape, weight_decay):
    T, steps, rank = 5, 22, 8  # basis refreshes at steps 5, 10, 15, 20: four of them
    g = torch.Generator().manual_seed(1)
    w0 = 0.02 * torch.randn(shape, generator=g)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdamW(
            [{"params": [a], "rank": rank, "update_proj_gap": T, "scale": 0.25, "proj_type": "std"}],
            lr=1e-2, weight_decay=weight_decay)
    ours = grassopt.SubspaceAdamW(
        [{"params": [b], "rank": rank, "update_interval": T, "alpha": 0.25, **grassopt.PRESETS["galore"]}],
        lr=1e-2, weight_decay=weight_decay)
    worst = 0.0
    bases_changed = 0
    prev_q = None
    for _ in range(steps):
        # gradients with a drifting dominant subspace, so every refresh really changes the basis
        G = torch.randn(shape, generator=g) + 3 * torch.outer(torch.randn(shape[0], generator=g),
                                                             torch.randn(shape[1], generator=g))
        a.grad, b.grad = G.clone(), G.clone()
        pa, pb = a.detach().clone(), b.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.step()
        ours.step()
        da, db = a.detach() - pa, b.detach() - pb
        worst = max(worst, ((da - db).norm() / da.norm()).item())
        q = ours.state[b]["Q"]
        if prev_q is not None and not torch.equal(q, prev_q):
            bases_changed += 1
        prev_q = q.clone()
    assert bases_changed >= 3
    assert worst < 1e-5
    assert ((a - b).norm() / (a - w0).norm()).item() < 1e-5
