"""Checkpoints written by the release before the moment codecs still load and resume bit-identically.

``tests/data/legacy_int8.pt`` was written by this file's ``main()`` with the code of commit 259807f
(before ``grassopt.codecs``): int8 moments (``state_dtype="int8"``) for SubTrack++ (a projected group
of ``Q``-basis matrices and a plain group of biases) and for APOLLO (a seeded rule, channel scaling),
each saved after ``STOP`` steps on a tiny model. It has no record of the int8 code map (that release
had none: the map was the module default, ``pow4`` with round-to-nearest).

The tests load it with today's code and finish the run; the result must equal an uninterrupted run
computed here from the same seed, bit for bit (nothing depends on stored floats but the checkpoint's
own tensors). Where the platform matches the one it was written on (recorded in the file), the
uninterrupted run's state at ``STOP`` must also equal the stored state bit for bit: the refactor did
not change a number. (A deliberate numerical change to Adam or a rule invalidates only that second
test; the first is the compatibility guarantee.)

Regenerate (only with the old code): ``python tests/test_legacy_checkpoint.py``.
"""

from __future__ import annotations

import platform
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import grassopt

PATH = Path(__file__).resolve().parent / "data" / "legacy_int8.pt"
PRESETS = ("subtrack++", "apollo")
STOP, TOTAL = 5, 9  # basis updates at steps 3 and 6 (update_interval=3): one before the save, one after


def _platform() -> dict:
    return {"torch": str(torch.__version__), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def build(preset: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 3))
    with warnings.catch_warnings():  # the last matrix (3 x 24) is below the rank: plain AdamW, on purpose
        warnings.simplefilter("ignore")
        opt = grassopt.make_optimizer(model, preset, lr=1e-2, rank=4, update_interval=3, seed=3,
                                      state_dtype="int8")
    return model, opt


def batches(n: int = TOTAL):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(12, 3, generator=g)
    xs = [torch.randn(16, 12, generator=g) for _ in range(n)]
    return [(x, torch.tanh(x @ w)) for x in xs]


def train(model, opt, data) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def main() -> None:  # pragma: no cover - run by hand, with the old code
    out = {"platform": _platform(), "stop": STOP, "total": TOTAL}
    for preset in PRESETS:
        model, opt = build(preset)
        train(model, opt, batches()[:STOP])
        out[preset] = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    torch.save(out, PATH)
    print(f"wrote {PATH} ({PATH.stat().st_size} bytes)")


@pytest.fixture(scope="module")
def saved():
    return torch.load(PATH, weights_only=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_legacy_int8_checkpoint_resumes_bit_identically(saved, preset):
    data = batches()
    m1, o1 = build(preset)
    train(m1, o1, data)
    m2, o2 = build(preset)
    m2.load_state_dict(saved[preset]["model"])
    o2.load_state_dict(saved[preset]["optimizer"])
    train(m2, o2, data[saved["stop"]:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    # the loaded state now records the code that wrote it (the old release's only one)
    sd = o2.state_dict()
    assert all(st.get("int8_code") == "pow4/nearest" for st in sd["state"].values())


@pytest.mark.parametrize("preset", PRESETS)
def test_todays_code_writes_the_legacy_state_bit_for_bit(saved, preset):
    if saved["platform"] != _platform():
        pytest.skip(f"written on {saved['platform']}, this is {_platform()}")
    model, opt = build(preset)
    train(model, opt, batches()[:saved["stop"]])
    for k, v in saved[preset]["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    old, new = saved[preset]["optimizer"]["state"], opt.state_dict()["state"]
    assert old.keys() == new.keys()
    for i in old:
        assert set(new[i]) - set(old[i]) <= {"int8_code"}, (i, set(new[i]) ^ set(old[i]))
        for k, v in old[i].items():
            same = torch.equal(new[i][k], v) if isinstance(v, torch.Tensor) else new[i][k] == v
            assert same, (preset, i, k)


if __name__ == "__main__":
    sys.exit(main())
