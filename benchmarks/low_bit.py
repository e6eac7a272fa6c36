"""Low-bit optimizer states and bf16 weights: benchmarks/low_bit.md (one command).

Four parts, each written into the one report (a part not run keeps its last results):

``codes``: why the int8 code of Adam's second moment is what it is. A stream of gradients whose
per-element scale spans 4 decades inside every block of 256, and drops 30x for half of the elements
at step 1000, is averaged into ``V`` (``beta2 = 0.999``) by exact float64, by bf16 storage rounded to
nearest, and by each int8 code of ``grassopt.functional`` (``log`` and ``pow4`` maps, rounded to
nearest or stochastically). Reported: the median and 90th percentile of ``|sqrt(V_q) / sqrt(V) - 1|``.

``maps``: the same alternatives as training runs (``tiny``, SOTU, ``galore`` with int8 states on
both groups, 150 steps of 8 x 128 tokens, one seed), scored by eval loss on 64k validation tokens.

``bench``: the ``sotu_tiny`` protocol (500k tokens, 8 x 256, rank 64, T = 50, 2 seeds, each method at
the rate the ``sotu_tiny`` sweep chose for it) through ``grassopt bench``: ``adamw``, ``galore`` and
``subtrack++`` with float32 and int8 states, ``bitsandbytes``' and ``torchao``'s 8-bit AdamW.

``bf16``: the same tokens, batch and rate on ``nano`` (a 4096-token BPE; bf16 matrix products run
far slower than fp32 on a CPU without bf16 units; the script measures it): ``adamw`` with float32 weights, bf16 weights,
and bf16 weights with stochastic rounding of the update.

    python benchmarks/low_bit.py                 # all four parts (about 2.5 h on 2 idle cores)
    python benchmarks/low_bit.py --parts codes maps
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from grassopt.codecs import int8 as F  # the int8 codec: its code map defaults and quantizers

HERE = Path(__file__).resolve().parent
CODES = [("log", "nearest"), ("pow4", "nearest"), ("log", "stochastic"), ("pow4", "stochastic")]
ADAM_LR, SUBSPACE_LR = 1e-3, 1e-2  # the sotu_tiny sweep's choices (adamw-torch 1e-3, galore/subtrack++ 1e-2)
BENCH = [  # label, lr
    ("adamw", ADAM_LR), ("adamw:state_dtype=int8", ADAM_LR),
    ("galore", SUBSPACE_LR), ("galore:state_dtype=int8", SUBSPACE_LR),
    ("subtrack++", SUBSPACE_LR), ("subtrack++:state_dtype=int8", SUBSPACE_LR),
    ("ref-adamw8bit", ADAM_LR), ("ref-torchao-adamw8bit", ADAM_LR),
]
BF16 = [("adamw", ADAM_LR), ("adamw:param_dtype=bfloat16", ADAM_LR),
        ("adamw:param_dtype=bfloat16,stochastic_rounding=True", ADAM_LR)]
BF16_MODEL, BF16_VOCAB = "nano", 4096  # bf16 matmuls run far slower than fp32 on a CPU without bf16 units


def codes_part(steps: int = 4000) -> list[dict]:
    blocks, n = 64, 256 * 64
    g = torch.Generator().manual_seed(1)
    sig = torch.exp(torch.empty(n).uniform_(-math.log(100.0), 0.0, generator=g))  # 4 decades of V per block
    half = torch.arange(n) % 2 == 0
    draws = [torch.randn(n, generator=torch.Generator().manual_seed(10 + t)) for t in range(steps)]
    variants = [("bf16, nearest", None, None)] + [(f"int8 {c}, {r}", c, r) for c, r in CODES]
    rows = []
    saved = (F.V_CODE, F.V_ROUNDING)
    try:
        for label, code, rounding in variants:
            v = torch.zeros(n)
            exact = torch.zeros(n, dtype=torch.float64)
            codes, scales = torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks)
            gen = torch.Generator().manual_seed(2)
            if code:
                F.V_CODE, F.V_ROUNDING = code, rounding
            checkpoints = {}
            for t in range(1, steps + 1):
                s = torch.where(half & (t > 1000), sig / 30, sig)
                grad = draws[t - 1] * s
                new = 0.999 * v + 0.001 * grad * grad
                if code is None:
                    v = new.to(torch.bfloat16).float()
                else:
                    F.quantize_unsigned_(codes, scales, new, gen)
                    v = F.dequantize_unsigned(codes, scales)
                exact = 0.999 * exact + 0.001 * grad.double() ** 2
                if t % 500 == 0:
                    err = (v.double().sqrt() / exact.sqrt() - 1).abs()
                    checkpoints[t] = (float(err.median()), float(err.quantile(0.9)))
            rows.append({"variant": label, "errors": checkpoints})
            print(label, checkpoints, file=sys.stderr)
    finally:
        F.V_CODE, F.V_ROUNDING = saved
    return rows


def maps_part(out: Path) -> list[dict]:
    rows = []
    for code, rounding in [(None, None)] + CODES:
        label = "float32" if code is None else f"int8 {code}, {rounding}"
        run = out / "maps" / label.replace(" ", "_").replace(",", "")
        script = (
            "import sys, json, torch\ntorch.set_num_threads(1)\n"
            "from grassopt.codecs import int8 as F\n"
            "from grassopt.train.loop import TrainConfig, train\n"
            f"code, rounding = {code!r}, {rounding!r}\n"
            "if code: F.V_CODE, F.V_ROUNDING = code, rounding\n"
            f"cfg = TrainConfig(model='tiny', preset='galore', lr={SUBSPACE_LR}, rank=64, update_interval=50, "
            "steps=150, batch_size=8, seq_len=128, eval_every=150, eval_tokens=65536, "
            f"state_dtype='float32' if code is None else 'int8', out={str(run)!r}, progress=False, plot=False)\n"
            "s = train(cfg)\n"
            "print(json.dumps({'loss': s['final_eval_loss'], 'step_s': s.get('mean_step_time')}))\n")
        summary = run / "summary.json"
        if not summary.exists():
            subprocess.run([sys.executable, "-c", script], check=True)
        s = json.loads(summary.read_text())
        rows.append({"variant": label, "eval_loss": s["final_eval_loss"]})
        print(rows[-1], file=sys.stderr)
    return rows


def bench_part(out: Path, seeds: list[int], tokens: int, bf16: bool = False) -> dict:
    run = out / ("bf16" if bf16 else "bench")
    variants = BF16 if bf16 else BENCH
    size = (["--model", BF16_MODEL, "--vocab-size", str(BF16_VOCAB), "--seq-len", "128", "--eval-every", "245",
             "--title", "bf16 weights with and without stochastic rounding on nano and SOTU"] if bf16 else
            ["--model", "tiny", "--seq-len", "256", "--eval-every", "123",
             "--title", "Low-bit states on tiny and SOTU"])
    cmd = [sys.executable, "-m", "grassopt", "bench", *size, "--no-progress", "--no-refs", "--presets", *[b for b, _ in variants],
           "--lrs", *[f"{b}={lr}" for b, lr in variants], "--tokens", str(tokens), "--batch-size", "8",
           "--rank", "64", "--update-interval", "50", "--seeds", *map(str, seeds), "--out", str(run)]
    shown = shlex.join(["grassopt", *cmd[3:]])
    print(shown, file=sys.stderr)
    subprocess.run(cmd, check=True)
    return {"command": shown, "results": json.loads((run / "results.json").read_text()),
            "report": (run / "report.md").read_text()}


def matmul_ms(repeats: int = 5) -> dict[str, float]:
    """Median ms of a 2048 x 512 by 512 x 1376 product (an MLP projection of 2048 tokens) per dtype."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 512, dtype=dtype), torch.randn(512, 1376, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        out[str(dtype).replace("torch.", "")] = 1e3 * sorted(times)[repeats // 2]
    return out


def _report(report: str, part: str, out: Path) -> str:
    """A ``grassopt bench`` report under a heading of this one, its plots copied beside it."""
    body = report.split("\n", 1)[1].strip()
    for png in ("loss_vs_step.png", "loss_vs_time.png"):
        src = out / part / png
        dst = HERE / "low_bit" / f"{part}_{png}"
        if src.exists():
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, dst)
        body = body.replace(f"]({png})", f"](low_bit/{part}_{png})")
    return body


def write(results: dict, path: Path, out: Path) -> None:
    lines = ["# Low-bit optimizer states and bf16 weights", "",
             "Command: `python benchmarks/low_bit.py` (all four parts; `--parts` runs some, the others keep their "
             f"last results; last run: `{' '.join(shlex.quote(a) for a in sys.argv[1:]) or 'all parts'}`); "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
             "int8 state (`state_dtype=\"int8\"`, `grassopt.functional`): one byte per moment element plus a "
             "float32 scale per block of 256, `n + 4 ceil(n/256)` bytes per moment; `M` on a signed square-root "
             "code, `V` on the code chosen below.", ""]
    if "codes" in results:
        rows = results["codes"]
        ts = sorted({int(t) for r in rows for t in r["errors"]})
        lines += ["## The code of `V`: tracking a second moment whose gradients change scale", "",
                  "Error `|sqrt(V_stored) / sqrt(V_exact) - 1|`, median / 90th percentile over 16,384 elements; "
                  "`beta2 = 0.999`, 4 decades of gradient scale inside every block of 256; at step 1000 half of the "
                  "elements' gradients drop 30x (their `V` should decay by 900x over the next few thousand steps).", "",
                  "| storage | " + " | ".join(f"step {t}" for t in ts) + " |",
                  "|---|" + "---:|" * len(ts)]
        for r in rows:
            lines.append(f"| {r['variant']} | " + " | ".join(
                "{:.3f} / {:.3f}".format(*r["errors"][str(t) if str(t) in r["errors"] else t]) for t in ts) + " |")
    if "maps" in results:
        lines += ["", "## The same alternatives in training", "",
                  "`tiny` on SOTU, `galore` (rank 64, lr 1e-2, T = 50) with int8 moments in both groups, 150 steps of "
                  "8 x 128 tokens, seed 0; eval loss on the first 65,536 validation tokens.", "",
                  "| V stored as | eval loss | vs float32 |", "|---|---:|---:|"]
        base = results["maps"][0]["eval_loss"]
        for r in results["maps"]:
            lines.append(f"| {r['variant']} | {r['eval_loss']:.4f} | {100 * (r['eval_loss'] / base - 1):+.2f}% |")
    if "bench" in results:
        lines += ["", "## The `sotu_tiny` protocol", "", _report(results["bench"]["report"], "bench", out)]
    if "bf16" in results:
        mm = results["bf16"].get("matmul_ms") or {}
        speed = (f"a bf16 matrix product runs {mm['bfloat16'] / mm['float32']:.0f}x slower than in fp32 here "
                 f"(2048 x 512 times 512 x 1376, median of 5: {mm['bfloat16']:,.0f} ms against {mm['float32']:.1f} ms, "
                 "measured by this script)") if mm else "a bf16 matrix product runs far slower than in fp32 here"
        lines += ["", "## bf16 weights with and without stochastic rounding", "",
                  f"`{BF16_MODEL}` with a {BF16_VOCAB}-token BPE, not `tiny`: this CPU has no bf16 units, and {speed}, "
                  "so a bf16 `tiny` run of 500k tokens would take over an hour. Same tokens, "
                  "batch, rate and schedule as above; only the weights' dtype and the rounding of their update change.",
                  "", _report(results["bf16"]["report"], "bf16", out)]
    keep = ""
    if path.exists() and "<!-- analysis -->" in path.read_text():
        text = path.read_text()
        keep = text[text.index("<!-- analysis -->"):]
    path.write_text("\n".join(lines) + "\n\n" + (keep or "<!-- analysis -->\n<!-- /analysis -->\n"))
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["codes", "maps", "bench", "bf16"],
                    choices=["codes", "maps", "bench", "bf16"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--tokens", type=int, default=501760)
    ap.add_argument("--out", default="runs/low_bit", help="run folder (finished runs are reused)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = HERE / "low_bit.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    t0 = time.time()
    if "codes" in args.parts:
        results["codes"] = codes_part()
    if "maps" in args.parts:
        results["maps"] = maps_part(out)
    if "bench" in args.parts:
        results["bench"] = bench_part(out, args.seeds, args.tokens)
    if "bf16" in args.parts:
        results["bf16"] = {**bench_part(out, args.seeds, args.tokens, bf16=True), "matmul_ms": matmul_ms()}
    print(f"{(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    store.write_text(json.dumps(results, indent=1))
    write(results, HERE / "low_bit.md", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
