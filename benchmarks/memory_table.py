"""Optimizer-state memory of the GaLore protocol models: GaLore's published BF16 table beside ours.

Every number of ours comes from ``grassopt.memory.estimate`` (the model built on the ``meta``
device, the optimizer's param groups resolved exactly as in training), whose per-parameter formula
the tests check byte for byte against live optimizers. Nothing here is fitted to the paper.

    python benchmarks/memory_table.py [--out benchmarks]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from pathlib import Path

from grassopt.memory import estimate
from grassopt.train.model import config

GB, GIB = 1e9, 2**30
#: GaLore (Zhao et al., 2024), memory estimates in BF16 of the optimizer states, at the ranks of its
#: pre-training table (r / d_model = 128/256, 256/768, 256/1024, 512/2048).
PAPER = {"60m": (128, 0.23, 0.13), "130m": (256, 0.51, 0.28), "350m": (256, 1.37, 0.54), "1b": (512, 5.20, 1.78)}
PRESETS = ["adamw", "galore", "subtrack++", "apollo", "apollo-mini", "ldadam"]


def states(model: str, preset: str, rank, state_dtype: str = "bf16") -> dict[str, int]:
    return estimate(model, preset, rank, "bf16", state_dtype=state_dtype, seq_len=256).totals()


def params(model: str) -> int:
    return estimate(model, "adamw", dtype="fp32", seq_len=1).totals()["weights"] // 4


def variants(model: str, rank: int) -> dict[tuple, float]:
    """GaLore-state elements under other accountings (to show that none reproduces the paper):
    with or without the bases, and the embedding / output layer plain, projected or left out."""
    c = config(model)
    h, i, L, V = c.hidden_size, c.intermediate_size, c.num_layers, c.vocab_size
    out = {}
    for bases, emb, head in itertools.product((True, False), ("plain", "projected", "left out"),
                                              ("plain", "projected", "left out")):
        def proj(a, b):
            d, k = min(a, b), max(a, b)
            return (d * rank if bases else 0) + 2 * k * rank
        n = L * (4 * proj(h, h) + 3 * proj(h, i)) + 2 * (2 * L + 1) * h
        for mode in (emb, head):
            n += {"plain": 2 * V * h, "projected": proj(V, h), "left out": 0}[mode]
        out[(bases, emb, head)] = n
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args(argv)
    cmd = "python benchmarks/memory_table.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows, data = [], {"paper": PAPER, "ours": {}}
    for model, (rank, p_full, p_galore) in PAPER.items():
        full, galore = states(model, "adamw", None), states(model, "galore", rank)
        n = params(model)
        data["ours"][model] = {"params": n, "rank": rank, "full_bytes": full["states"], "galore_bytes": galore["states"],
                               "galore_bases_bytes": galore["bases"]}
        rows.append(f"| {model} | {n / 1e6:.1f}M | {rank} | {p_full:.2f} | {full['states'] / GB:.3f} | "
                    f"{full['states'] / GIB:.3f} | {p_galore:.2f} | {galore['states'] / GB:.3f} | "
                    f"{galore['states'] / GIB:.3f} | {(galore['states'] - galore['bases']) / GB:.3f} | "
                    f"{1 - p_galore / p_full:.1%} | {1 - galore['states'] / full['states']:.1%} |")
    # implied parameter counts of the paper's full-rank column (2 bf16 moments = 4 bytes per parameter;
    # a value printed with 2 decimals stands for +-0.005)
    implied = []
    for model, (rank, p_full, _) in PAPER.items():
        n = data["ours"][model]["params"]
        lo_gb, hi_gb = (p_full - 0.005) * GB / 4, (p_full + 0.005) * GB / 4
        lo_gib, hi_gib = (p_full - 0.005) * GIB / 4, (p_full + 0.005) * GIB / 4
        fits = [u for u, lo, hi in (("GB", lo_gb, hi_gb), ("GiB", lo_gib, hi_gib)) if lo <= n <= hi]
        implied.append(f"| {model} | {n / 1e6:.1f}M | {lo_gb / 1e6:.1f}-{hi_gb / 1e6:.1f}M | "
                       f"{lo_gib / 1e6:.1f}-{hi_gib / 1e6:.1f}M | {', '.join(fits) or 'neither'} |")
    # the best of the alternative accountings of the GaLore column
    best = []
    for unit_name, unit in (("GB", GB), ("GiB", GIB)):
        scored = []
        for key in variants("60m", 128):
            vals = {m: 2 * variants(m, PAPER[m][0])[key] / unit for m in PAPER}
            err = max(abs(vals[m] - PAPER[m][2]) for m in PAPER)
            scored.append((err, key, vals))
        scored.sort(key=lambda s: s[0])
        for err, (bases, emb, head), vals in scored[:2]:
            best.append(f"| {unit_name} | {'yes' if bases else 'no'} | {emb} | {head} | "
                        + " | ".join(f"{vals[m]:.3f}" for m in PAPER) + f" | {err:.3f} |")
    # every preset, float32 states as grassopt allocates them
    preset_rows = []
    for model, (rank, _, _) in PAPER.items():
        cells = []
        for preset in PRESETS:
            r = None if preset in ("adamw", "apollo", "apollo-mini") else rank
            t = states(model, preset, r, state_dtype="fp32")
            cells.append(f"{t['states'] / GIB:.3f}")
        preset_rows.append(f"| {model} | {rank} | " + " | ".join(cells) + " |")
        data["ours"][model]["fp32_states_gib"] = dict(zip(PRESETS, map(float, cells)))
    ours = data["ours"]
    over = [ours[m]["galore_bytes"] / (PAPER[m][2] * u) - 1 for m in PAPER for u in (GB,)]
    over_gib = [ours[m]["galore_bytes"] / (PAPER[m][2] * u) - 1 for m in PAPER for u in (GIB,)]
    paper_saving = ", ".join(f"{1 - PAPER[m][2] / PAPER[m][1]:.0%}" for m in PAPER)
    our_saving = ", ".join(f"{1 - ours[m]['galore_bytes'] / ours[m]['full_bytes']:.0%}" for m in PAPER)
    miss = []  # how far our exact count is from the nearest count the paper's rounding allows
    for model, (_, p_full, _) in PAPER.items():
        n = ours[model]["params"]
        lo, hi = min((p_full - 0.005) * u / 4 for u in (GB, GIB)), max((p_full + 0.005) * u / 4 for u in (GB, GIB))
        gaps = [abs(n - b) / n for u in (GB, GIB) for b in ((p_full - 0.005) * u / 4, (p_full + 0.005) * u / 4)
                if not ((p_full - 0.005) * u / 4 <= n <= (p_full + 0.005) * u / 4)]
        if len(gaps) == 4:
            miss.append(min(gaps))
    galore_1b_fp32 = states("1b", "galore", 512, state_dtype="fp32")["states"] / GIB
    lines = [
        "# Optimizer-state memory: GaLore's published estimates beside ours",
        "",
        f"Command: `{cmd.strip()}` (instant: the models are built on the `meta` device). Every number of ours is "
        "`grassopt.memory.estimate` (also `grassopt memory MODEL --preset ... --state-dtype bf16`), whose "
        "per-parameter formula `tests/test_memory.py` checks byte for byte against live optimizers on `nano` and "
        "`tiny`. Nothing is fitted to the paper.",
        "",
        "## BF16 optimizer states, full-rank Adam vs GaLore",
        "",
        "GaLore's convention: both Adam moments in BF16 (2 bytes per element), GaLore's basis `P` (`d x r`) in BF16 too. "
        "Models: the GaLore LLaMA shapes (hidden/intermediate/heads/layers 512/1376/8/8, 768/2048/12/12, "
        "1024/2736/16/24, 2048/5461/32/24; vocabulary 32000, untied embedding and output layer, RMSNorm "
        "weights, no biases). Ours: projected = the 7 linear layers of each block (q, k, v, o, gate, up, down) "
        "at `d r + 2 k r` elements; embeddings, output layer and norms are plain AdamW (`2 numel`), as in "
        "GaLore's own training script (`target_modules_list = [\"attn\", \"mlp\"]`).",
        "",
        "| model | parameters (ours) | rank | paper full-rank (GB) | ours full-rank (GB) | ours full-rank (GiB) | "
        "paper GaLore (GB) | ours GaLore (GB) | ours GaLore (GiB) | ours GaLore without bases (GB) | paper saving | "
        "our saving |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "### Where the numbers differ, and why",
        "",
        "- **Units.** The paper writes \"GB\" but is not consistent. Its full-rank column is 2 moments x 2 bytes x "
        "parameters; the parameter counts that its rounded values allow are:",
        "",
        "| model | parameters (ours) | allowed if GB = 10^9 B | allowed if GB = 2^30 B | our count fits |",
        "|---|---:|---:|---:|---|",
        *implied,
        "",
        "  60M matches decimal GB, 350M matches binary GiB, and 130M and 1B match neither (our exact count is "
        f"{min(miss):.0%}-{max(miss):.0%} away from the nearest allowed one): the column "
        "cannot come from one parameter count and one unit. Our counts are exact for these shapes (LLaMA-7B, "
        "built the same way, has exactly 6,738,415,616 parameters: `tests/test_memory.py`).",
        "- **Which parameters count.** Embedding (`32000 x d`) and output layer are 2 x 16.4M = 32.8M of the 60M "
        "model's 58.1M parameters and stay full-rank AdamW; this is why GaLore saves 29% at 60M but 61% at 1B. "
        "The norms add `2 (2L + 1) d` elements (negligible). Biases: none in LLaMA.",
        "- **The GaLore column is lower than the paper's own formula.** GaLore's Table 1 gives `mr + 2nr` "
        "(basis + moments, `m <= n`) per projected matrix; applied to the models above that is our GaLore "
        f"column, {min(over):.0%}-{max(over):.0%} above the paper's in GB ({min(over_gib):.0%}-{max(over_gib):.0%} in GiB). Counting it another way does not close the gap: below are the two "
        "closest of 18 accountings per unit (bases counted or not; embedding and output layer plain AdamW, "
        "projected at rank `r` too, or left out), with the largest error over the four models:",
        "",
        "| unit | bases | embedding | output layer | 60m | 130m | 350m | 1b | largest error |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
        *best,
        "",
        "  None reproduces all four values, and the closest ones need the embedding or the output layer projected "
        f"or left out, which GaLore's code does not do. The paper's savings ({paper_saving}) are larger than the formula gives "
        f"({our_saving}) at every size; we report the formula's.",
        f"- **What grassopt really allocates.** `SubspaceAdamW` keeps every state in float32 whatever the weights' "
        "dtype (subspace maths in float32, ALGORITHMS.md section 0), so its states are exactly twice the BF16 "
        f"column (`grassopt memory 1b --preset galore --rank 512` prints {galore_1b_fp32:.2f} GiB). The estimate's `--state-dtype "
        "bf16` only reproduces the papers' convention. Recovery scaling adds one float per matrix.",
        "",
        "## Every preset at these sizes (float32 states as allocated, GiB)",
        "",
        "Rank: the GaLore rank above; `apollo` uses its default `d/4` (128/192/256/512, the ranks of the APOLLO "
        "paper) and `apollo-mini` rank 1. APOLLO stores no basis (regenerated from a seed), LDAdam adds one "
        "full-size float32 error buffer per projected matrix.",
        "",
        "| model | rank | " + " | ".join(PRESETS) + " |",
        "|---|---:|" + "---:|" * len(PRESETS),
        *preset_rows,
        "",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.md").write_text("\n".join(lines))
    (out / "memory.json").write_text(json.dumps(data, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
