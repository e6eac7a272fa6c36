"""int8 weights and compressed bases (issue 28): benchmarks/int8_weights.md, .json (one command, in parts).

``blocks``: the block and the code of int8 weights (grassopt.qlinear), chosen by measurement. For every linear weight of a pretrained encoder (MiniLM-L6, the one `grassopt finetune` ships: real trained
weights, with their outliers) and of a freshly initialised `tiny` LLaMA, rounds the weight to nearest on a
block-wise int8 grid and reports the relative error ``||W - Q(W)||_F / ||W||_F`` (all matrices pooled)
and the bytes per element (``1 + 4 / block``). Codes: ``linear`` (uniform, ``s = max|W| / 127``: what
``grassopt.qlinear`` uses; stochastic rounding on it is one ``floor(u + U)``) and ``sqrt`` (the signed
non-linear code of the int8 moments, ``c = 127 sign(u) sqrt|u|``: finer near zero). ``row`` is one scale
per output row (torchao's int8 training). Then trains the toy regression of the moment-format tests
(tests/toy.py, 300 steps, 2 seeds) with float32 weights and with int8 weights of each block, rounded
stochastically (``sr``) or to nearest (``rn``): the mean loss of the last 30 steps. About a minute.

``bases``: the principal angles (float64, ``grassopt.bases.principal_angles``) between a Haar-random
orthonormal ``Q`` and the same basis stored and decoded in each ``basis_dtype``, and ``||Q^T Q - I||_F`` of
the decoded one. Seconds.

``memory``: LLaMA-7B at 1 x 2048 tokens with each weight and basis format (``grassopt.train.estimate``,
exact: what ``grassopt memory 7b ...`` prints). Instant.

``quality``: the contest's protocol (``benchmarks/contest.py``: ``tiny`` on SOTU, 8 x 256 tokens, rank 64,
basis updates every 40 steps, the common parts at ``plain_lr`` 0.1, ``subtrack++`` at the rate its sweep
chose, 1e-2) at its sweep horizon (250 steps, 512k tokens), seeds 0 and 1, through ``grassopt bench``:
float32 weights; int8 weights rounded stochastically and to nearest; int8 bases; and the configuration of
the 10 GiB row (rank 1/16 of the short side, int8 weights, int8 bases, then int8 moments too) beside
float32 at that rank.
``int8-fp32`` keeps float32 around the int8 weights (their effect alone, at float32 speed: this CPU runs
bf16 products far slower). Finished runs are reused; about 12 runs of 6 minutes on one idle thread.

    python benchmarks/int8_weights.py                     # every part
    python benchmarks/int8_weights.py --parts quality     # one part; the others keep their last results
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

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


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from ablations_report import write_with_analysis  # noqa: E402

#: the quality runs: (label, variant); the first of each pair of ranks is the float32 reference of those below it
QUALITY = [("float32", "subtrack++"),
           ("int8 weights, stochastic rounding", "subtrack++:param_dtype=int8-fp32,stochastic_rounding=True"),
           ("int8 weights, to nearest", "subtrack++:param_dtype=int8-fp32"),
           ("int8 bases", "subtrack++:basis_dtype=int8"),
           ("float32, rank 16", "subtrack++:rank=16"),
           ("rank 16, int8 weights (stochastic) and int8 bases",
            "subtrack++:rank=16,param_dtype=int8-fp32,stochastic_rounding=True,basis_dtype=int8"),
           ("rank 16, int8 weights (stochastic), int8 bases and int8 moments: the 10 GiB configuration",
            "subtrack++:rank=16,param_dtype=int8-fp32,stochastic_rounding=True,basis_dtype=int8,state_dtype=int8")]
QUALITY_ARGS = ["--model", "tiny", "--steps", "250", "--batch-size", "8", "--seq-len", "256", "--rank", "64",
                "--update-interval", "40", "--eval-every", "250", "--threads", "1", "--no-refs", "--no-progress",
                "--lr", "1e-2", "--plain-lr", "0.1"]
#: 7B rows: (options shown, estimate keywords)
MEMORY = [("`--param-dtype bf16`", {"dtype": "bf16"}),
          ("`--param-dtype int8`", {"dtype": "int8"}),
          ("`--param-dtype int8 --basis-dtype bfloat16`", {"dtype": "int8", "basis_dtype": "bfloat16"}),
          ("`--param-dtype int8 --basis-dtype int8`", {"dtype": "int8", "basis_dtype": "int8"}),
          ("`--param-dtype int8 --basis-dtype int4`", {"dtype": "int8", "basis_dtype": "int4"}),
          ("`--param-dtype int8 --basis-dtype int8 --rank 512`", {"dtype": "int8", "basis_dtype": "int8", "rank": 512}),
          ("`--param-dtype int8 --basis-dtype int8 --rank 256`", {"dtype": "int8", "basis_dtype": "int8", "rank": 256}),
          ("`--preset apollo-mini --param-dtype int8` (its rank 1; no basis)",
           {"dtype": "int8", "preset": "apollo-mini", "rank": None})]


def blocks_part() -> dict:
    torch.set_num_threads(1)
    rows = []
    for label, ws in _weights().items():
        total = sum(float(w.float().square().sum()) for w in ws)
        for code, fn in (("linear", _linear_error), ("sqrt", _sqrt_error)):
            rows.append({"weights": label, "code": code, "errors": [
                math.sqrt(sum(fn(w, w.shape[1] if b == "row" else b) for w in ws) / total) for b in BLOCKS]})
    return {"errors": rows, "toy": toy_runs()}


def toy_runs() -> list[dict]:
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
    rows = []
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
            cells.append(sum(out) / len(out))
        rows.append({"preset": preset, "modes": modes, "losses": cells})
    return rows




def bases_part() -> list[dict]:
    from grassopt.bases import load, principal_angles, store
    rows = []
    for fmt in ("bfloat16", "int8", "int4"):
        for d, r in ((4096, 1024), (1024, 128), (255, 32)):
            q = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(d + r))).Q
            st: dict = {}
            store(st, q, fmt)
            back = load(st)
            deg = principal_angles(q, back).rad2deg()
            ortho = float(torch.linalg.matrix_norm(back.double().mT @ back.double() - torch.eye(r, dtype=torch.float64)))
            rows.append({"shape": [d, r], "format": fmt, "largest_deg": float(deg.max()),
                         "rms_deg": float(deg.square().mean().sqrt()), "orthogonality": ortho,
                         "bytes": sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))})
    return rows


def memory_part() -> list[dict]:
    from grassopt.train.estimate import estimate
    rows = []
    for label, kw in MEMORY:
        kw = dict(kw)
        preset, rank = kw.pop("preset", "subtrack++"), kw.pop("rank", 1024)
        t = estimate("7b", preset, rank, kw.pop("dtype"), state_dtype="int8", layerwise=True,
                     checkpoint_activations=True, batch_size=1, seq_len=2048, **kw).totals()
        rows.append({"options": label, **{k: t[k] for k in ("weights", "bases", "moments", "total")}})
    return rows


def quality_part(out: Path, seeds: list[int]) -> dict:
    shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    cmd = ["grassopt", "bench", *QUALITY_ARGS, "--presets", *[v for _, v in QUALITY], "--seeds", *map(str, seeds),
           "--title", "int8 weights and compressed bases (issue 28), on the contest protocol", "--out", str(shown)]
    subprocess.run([sys.executable, "-m", "grassopt", *cmd[1:]], check=True, cwd=ROOT)
    from grassopt.train.estimate import estimate
    rows = []
    for label, variant in QUALITY:
        runs = {}
        for seed in seeds:
            slug = "".join(c if c.isalnum() or c in "+-._" else "_" for c in variant)
            summary = json.loads((out / "runs" / f"{slug}-s{seed}" / "summary.json").read_text())
            runs[seed] = summary["final_eval_loss"]
            state = summary["optimizer_state_bytes"]
        opts = dict(kv.split("=") for kv in variant.partition(":")[2].split(",") if kv)
        rank = int(opts.get("rank", 64))
        dtype = "int8" if opts.get("param_dtype", "").startswith("int8") else "fp32"
        weights = estimate("tiny", "subtrack++", rank, dtype, vocab_size=8192,
                           basis_dtype=opts.get("basis_dtype", "float32")).totals()["weights"]
        rows.append({"label": label, "variant": variant, "losses": runs, "state_bytes": state,
                     "weight_bytes_memory_config": weights})
    return {"command": shlex.join(cmd), "rows": rows}


def _quality_lines(q: dict) -> list[str]:
    lines = ["", "<a id=\"quality\"></a>", "## Quality on the contest's protocol", "",
             f"Command (`--parts quality`): `{q['command']}`.", "",
             "`tiny` on SOTU, 250 steps of 8 x 256 tokens (512k tokens: the contest's sweep horizon), rank 64 unless "
             "named, basis updates every 40 steps, the common parts at `plain_lr` 0.1, `subtrack++` at 1e-2 (its "
             "contest sweep's choice). Final eval loss on the whole validation split. Differences are against "
             "float32 at the same rank and seed. `int8-fp32`: int8 weights, float32 compute. Weights: the bytes "
             "of `tiny`'s weights in the memory configuration (int8 codes and block scales for the hidden "
             "matrices, `--param-dtype int8`), from the exact estimate.", "",
             "| variant | seed 0 | seed 1 | mean | vs float32 (per seed) | vs float32 (mean) | state (MB) | weights (MB) |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    base = None
    for r in q["rows"]:
        losses = {int(k): v for k, v in r["losses"].items()}
        if r["label"].startswith("float32"):
            base = losses
        mean = sum(losses.values()) / len(losses)
        if base is losses or base is None:
            per, rel = "", ""
        else:
            d = {s: losses[s] - base[s] for s in sorted(losses) if s in base}
            per = ", ".join(f"{v:+.4f}" for v in d.values())
            rel = f"{100 * (mean / (sum(base.values()) / len(base)) - 1):+.2f}%"
        lines.append(f"| {r['label']} | " + " | ".join(f"{losses.get(s, float('nan')):.4f}" for s in (0, 1)) +
                     f" | {mean:.4f} | {per} | {rel} | {r['state_bytes'] / 1e6:.2f} | "
                     f"{r['weight_bytes_memory_config'] / 1e6:.2f} |")
    return lines


def write(results: dict, dest: Path) -> None:
    gib = 2 ** 30
    lines = ["# int8 weights and compressed bases", "",
             "`grassopt.qlinear` stores a linear layer's weight as int8 codes and a float32 scale per block; the "
             "optimizer writes its update back onto the grid, stochastically or to nearest "
             "([docs](../docs/algorithms.md#int8-weights)). `basis_dtype` stores `Q` in bf16, int8 or int4 "
             "([docs](../docs/algorithms.md#compressed-bases)).", "",
             "Command: `python benchmarks/int8_weights.py` (parts `blocks`, `bases`, `memory`, `quality`; `--parts` "
             f"runs some, the others keep their last results); torch {torch.__version__}."]
    if "blocks" in results:
        b = results["blocks"]
        lines += ["", "## The block and the code (`--parts blocks`, one thread, about a minute)", "",
                  "Relative error `||W - Q(W)||_F / ||W||_F` of rounding to nearest, every linear weight of the "
                  "encoder `grassopt finetune` ships (MiniLM-L6, pretrained: real trained weights) and of a freshly "
                  "initialised `tiny` LLaMA, pooled; `linear`: the uniform grid `s = max|W| / 127`; `sqrt`: the signed "
                  "non-linear code of the int8 moments; `row`: one scale per output row.", "",
                  "| weights | code | " + " | ".join(f"block {x}" for x in BLOCKS) + " |",
                  "|---|---|" + "---|" * len(BLOCKS)]
        lines += [f"| {r['weights']} | {r['code']} | " + " | ".join(f"{100 * e:.2f}%" for e in r["errors"]) + " |"
                  for r in b["errors"]]
        lines.append("| bytes per element | | " + " | ".join(
            "1 + 4/in" if x == "row" else f"{1 + 4 / x:.4f}" for x in BLOCKS) + " |")
        modes = b["toy"][0]["modes"]
        lines += ["", "The toy regression of the moment-format tests (`tests/toy.py`: 16 -> 48 -> 40 -> 4, 300 steps, "
                  "lr 3e-3, rank 4, 2 seeds), mean loss of the last 30 steps: float32 weights, and int8 weights at "
                  "blocks 32, 64 and 256, rounded stochastically (`sr`) or to nearest (`rn`).", "",
                  "| preset | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        lines += [f"| {r['preset']} | " + " | ".join(f"{x:.4f}" for x in r["losses"]) + " |" for r in b["toy"]]
    if "bases" in results:
        lines += ["", "## Compressed bases: principal angles to the float32 basis (`--parts bases`)", "",
                  "A Haar-random orthonormal `Q`, stored and decoded (`grassopt.bases.store` / `load`); angles in "
                  "float64 (`grassopt.bases.principal_angles`); `||Q^T Q - I||_F` of the decoded basis (the optimizer "
                  "re-orthonormalises at every basis update, same span).", "",
                  "| `d x r` | format | largest angle | RMS angle | `||Q^T Q - I||_F` | bytes |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['shape'][0]} x {r['shape'][1]} | {r['format']} | {r['largest_deg']:.3f} deg | "
                  f"{r['rms_deg']:.3f} deg | {r['orthogonality']:.1e} | {r['bytes']:,} |" for r in results["bases"]]
    if "memory" in results:
        lines += ["", "## LLaMA-7B, 1 x 2048 tokens (`--parts memory`: `grassopt memory`'s exact estimate)", "",
                  "`grassopt memory 7b --preset subtrack++ --rank 1024 --state-dtype int8 --layerwise "
                  "--checkpoint-activations --batch-size 1 --seq-len 2048` plus:", "",
                  "| options | weights | bases | moments | total |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['options']} | {r['weights'] / gib:.2f} GiB | {r['bases'] / gib:.2f} GiB | "
                  f"{r['moments'] / gib:.2f} GiB | {r['total'] / gib:.2f} GiB |" for r in results["memory"]]
    if "quality" in results:
        lines += _quality_lines(results["quality"])
    write_with_analysis(dest, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["blocks", "bases", "memory", "quality"],
                    choices=["blocks", "bases", "memory", "quality"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", default="benchmarks/low_bit/quality",
                    help="the quality runs' bench folder (finished runs are reused; their summaries are committed)")
    args = ap.parse_args(argv)
    store = HERE / "int8_weights.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for part in args.parts:
        results[part] = {"blocks": blocks_part, "bases": bases_part, "memory": memory_part}[part]() \
            if part != "quality" else quality_part(ROOT / args.out, args.seeds)
    store.write_text(json.dumps(results, indent=1))
    write(results, HERE / "int8_weights.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
