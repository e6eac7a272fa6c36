import os
import warnings

import pytest
import torch

# Two OpenMP threads on two shared cores can make a 1 s test take 40 s when anything else runs
# (threads busy-wait for each other). Tests measure correctness, not speed: use one thread.
torch.set_num_threads(int(os.environ.get("GRASSOPT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def random_orthonormal(d, r, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=dtype))
    return q


def principal_angles(q1, q2):
    """Principal angles (radians, ascending) between two orthonormal bases, in float64."""
    q1, q2 = q1.double(), q2.double()
    cos = torch.linalg.svdvals(q1.mT @ q2).clamp(0, 1)  # descending: smallest angles first
    sin = torch.linalg.svdvals(q2 - q1 @ (q1.mT @ q2)).clamp(0, 1).flip(0)  # ascending
    return torch.atan2(sin, cos)  # accurate for small and large angles


warnings.filterwarnings("ignore", message=".*kernels.*")


@pytest.fixture(scope="session")
def sotu_1k(tmp_path_factory):
    """The real SOTU corpus with a 1024-token BPE, tokenized once per test session."""
    from grassopt.train.data import prepare

    root = tmp_path_factory.getbasetemp() / "grassopt-cache"
    root.mkdir(exist_ok=True)
    return prepare(vocab_size=1024, cache_dir=root, progress=False)
