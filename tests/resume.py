"""The resume check shared by the optimizer tests: a run stopped, saved, loaded and finished must
equal an uninterrupted run bit for bit."""

import torch


def assert_resumes_bit_identically(build, train, data, stop: int, path):
    """``build() -> (model, optimizer)``; ``train(model, optimizer, batches)``. Trains on ``data`` at
    once, and again in two parts with a ``torch.save`` / ``weights_only`` load after ``stop`` batches;
    asserts an equal ``state_dict`` and returns the saved checkpoint."""
    m1, o1 = build()
    train(m1, o1, data)
    m2, o2 = build()
    train(m2, o2, data[:stop])
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    m3, o3 = build()
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    train(m3, o3, data[stop:])
    s1, s3 = m1.state_dict(), m3.state_dict()  # parameters and buffers (int8 weights: their codes and scales)
    assert s1.keys() == s3.keys()
    for k in s1:
        assert torch.equal(s1[k], s3[k]), k
    return ckpt
