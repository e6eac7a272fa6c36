"""The block and the code of int8 weights (grassopt.qlinear), chosen by measurement.

For every linear weight of a pretrained encoder (MiniLM-L6, the one `grassopt finetune` ships: real trained
weights, with their outliers) and of a freshly initialised `tiny` LLaMA, rounds the weight to nearest on a
block-wise int8 grid and reports the relative error ``||W - Q(W)||_F / ||W||_F`` (all matrices pooled)
and the bytes per element (``1 + 4 / block``). Codes: ``linear`` (uniform, ``s = max|W| / 127``: what
``grassopt.qlinear`` uses; stochastic rounding on it is one ``floor(u + U)``) and ``sqrt`` (the signed
non-linear code of the int8 moments, ``c = 127 sign(u) sqrt|u|``: finer near zero). ``row`` is one scale
per output row (torchao's int8 training). Then trains the toy regression of the moment-format tests
(tests/toy.py, 300 steps, 2 seeds) with float32 weights and with int8 weights of each block, rounded
stochastically (``sr``) or to nearest (``rn``): the mean loss of the last 30 steps. About a minute on one
CPU thread:

    python benchmarks/int8_weights.py
"""

from __future__ import annotations

import math

import torch

from grassopt.codecs.int8 import dequantize_signed, quantize_signed_
from grassopt.qlinear import dequantize, quantize_

BLOCKS = (32, 64, 128, 256, 1024, "row")


def _linear_error(w: torch.Tensor, block: int) -> float:
    flat = w.reshape(-1).float()
    codes = torch.empty(flat.numel(), dtype=torch.int8)
    scales = torch.empty(math.ceil(flat.numel() / block))
    quantize_(codes, scales, flat, block)
    return float((dequantize(codes, scales, block) - flat).square().sum())


def _sqrt_error(w: torch.Tensor, block: int) -> float:
    import grassopt.codecs.int8 as c
    flat = w.reshape(-1).float()
    old, c.BLOCK = c.BLOCK, block
    try:
        codes = torch.empty(flat.numel(), dtype=torch.int8)
        scales = torch.empty(math.ceil(flat.numel() / block))
        quantize_signed_(codes, scales, flat)
        return float((dequantize_signed(codes, scales) - flat).square().sum())
    finally:
        c.BLOCK = old


def _weights() -> dict[str, list[torch.Tensor]]:
    from grassopt.finetune.model import load_encoder
    from grassopt.train.model import Llama, config
    enc, _ = load_encoder()
    minilm = [m.weight.detach() for m in enc.modules() if isinstance(m, torch.nn.Linear)]
    torch.manual_seed(0)
    llama = Llama(config("tiny", vocab_size=8192))
    init = [m.weight.detach() for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    return {"MiniLM-L6 (pretrained)": minilm, "tiny LLaMA (init)": init}


def main() -> None:
    torch.set_num_threads(1)
    print("| weights | code | " + " | ".join(f"block {b}" for b in BLOCKS) + " |")
    print("|---|---|" + "---|" * len(BLOCKS))
    for label, ws in _weights().items():
        total = sum(float(w.float().square().sum()) for w in ws)
        for code, fn in (("linear", _linear_error), ("sqrt", _sqrt_error)):
            cells = []
            for b in BLOCKS:
                err = sum(fn(w, w.shape[1] if b == "row" else b) for w in ws)
                cells.append(f"{100 * math.sqrt(err / total):.2f}%")
            print(f"| {label} | {code} | " + " | ".join(cells) + " |")
    print("| bytes per element | | " + " | ".join(
        "1 + 4/in" if b == "row" else f"{1 + 4 / b:.4f}" for b in BLOCKS) + " |")
    toy_runs()


def toy_runs() -> None:
    import sys
    import warnings
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from toy import toy_data, toy_model, toy_train

    import grassopt
    from grassopt.qlinear import quantize_linears
    warnings.simplefilter("ignore")  # the head's rank-4 fallback to plain AdamW
    data = toy_data(300)
    modes = ["fp32"] + [f"{r}{b}" for b in (32, 64, 256) for r in ("sr", "rn")]
    print("\n| preset | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for preset in ("adamw", "subtrack++"):
        cells = []
        for mode in modes:
            out = []
            for seed in (0, 1):
                m = toy_model()
                if mode != "fp32":
                    quantize_linears(m, targets=["0", "2", "4"], block=int(mode[2:]))
                opt = grassopt.make_optimizer(m, preset, lr=3e-3, rank=4, update_interval=20, seed=seed,
                                              stochastic_rounding=mode.startswith("sr"))
                out.append(sum(toy_train(m, opt, data)[-30:]) / 30)
            cells.append(f"{sum(out) / len(out):.4f}")
        print(f"| {preset} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
