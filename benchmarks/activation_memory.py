"""Activation memory and eval loss of the sketched methods (docs/algorithms.md#sketches).

Part ``memory``: for each model (``tiny``, ``small``) and each configuration (plain AdamW, the
unbiased estimator with ``haar`` + AdamW, RSO; ranks n/4 and n/8), a fresh Python process builds
the model, measures the bytes one training forward pass saves for backward
(``grassopt.sketch.saved_activation_bytes``: exact counts, per module), runs a few training steps
and reports the process's peak resident memory (``resource.getrusage`` max RSS) and the optimizer
state bytes. Token ids are random (memory does not depend on them).

Part ``loss``: the same SOTU tokens (same sampler seed) for ``torch.optim.AdamW``, AdamW on top of
the ``haar`` estimator, and RSO, each over a grid of learning rates (linear warm-up, cosine decay
to 10%); final eval loss = mean token loss over the whole validation split.

Writes ``activation_memory.md``, ``activation_memory.json`` and ``activation_memory.png`` in
``--out`` (default: this folder). Commands:

    python benchmarks/activation_memory.py --parts memory    # about 3 min on an idle machine
    python benchmarks/activation_memory.py --parts loss      # about 50 min (15 runs of 250 steps on tiny)
    python benchmarks/activation_memory.py                   # both
    python benchmarks/activation_memory.py --smoke           # a few steps of everything (~2 min): a check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MIB = 2**20


# ================================================================================ configurations
def memory_configs(ranks: list[float], inner_steps: int) -> list[dict]:
    out = [{"label": "plain AdamW", "method": "plain", "rank": None}]
    for r in ranks:
        out.append({"label": f"estimator haar n/{round(1 / r)}", "method": "estimator", "rank": r})
    for r in ranks:
        out.append({"label": f"RSO n/{round(1 / r)}", "method": "rso", "rank": r, "inner_steps": inner_steps})
    r = min(ranks)  # o_proj's input is saved by attention anyway: sketching it costs r per token
    out.append({"label": f"estimator haar n/{round(1 / r)}, o_proj plain", "method": "estimator", "rank": r,
                "targets": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]})
    # lean activations (LlamaConfig.lean_activations): RMSNorm and SwiGLU recompute what sketching cannot reach
    out.append({"label": "plain AdamW, lean", "method": "plain", "rank": None, "lean": True})
    out.append({"label": f"estimator haar n/{round(1 / r)}, lean", "method": "estimator", "rank": r, "lean": True})
    out.append({"label": f"RSO n/{round(1 / r)}, lean", "method": "rso", "rank": r, "inner_steps": inner_steps,
                "lean": True})
    return out


def build(model_name: str, vocab: int, seq: int, cfg: dict, lr: float, seed: int = 0, weight_decay: float = 0.0):
    """(model, optimizer) for a configuration, built by `grassopt train`'s own builders (plain: preset
    adamw-torch; estimator: adamw-torch on a model sketched with haar; rso: preset rso). The estimator's
    fresh sketch after every step comes from ``grassopt.sketch.attach``, since ``measure`` steps the
    optimizer itself. (The tables of activation_memory.md were measured with an earlier copy of these
    builders in this file: torch.optim.AdamW with its defaults on all parameters, and the model's
    rotary tables sized to ``seq`` rather than ``max(seq, 1024)``.)"""
    import grassopt.sketch as gs
    from grassopt.train.loop import TrainConfig, build_model, build_optimizer, sketch_model

    method = cfg["method"]
    if method not in ("plain", "estimator", "rso"):
        raise ValueError(method)
    targets = cfg.get("targets", "all-linear")
    tc = TrainConfig(model=model_name, seq_len=seq, preset="rso" if method == "rso" else "adamw-torch", lr=lr,
                     weight_decay=weight_decay, seed=seed, sketch=None if method == "plain" else "haar",
                     sketch_rank=cfg["rank"] or 0.125, update_interval=cfg.get("inner_steps"),
                     targets=[targets] if isinstance(targets, str) else list(targets),
                     lean_activations=cfg.get("lean", False))
    tc.validate()
    model = build_model(tc, vocab)
    sketched = sketch_model(model, tc)
    opt = build_optimizer(model, tc)
    if sketched:
        gs.attach(model, opt)
    return model, opt


# ================================================================================ part 1: memory
def measure(job: dict) -> dict:
    """Runs in a fresh process: saved bytes of one training forward pass, then peak RSS."""
    import contextlib

    import grassopt.sketch as gs
    from grassopt.profiling import TensorPeak
    from grassopt.profiling import peak_rss_bytes as max_rss_bytes

    torch.set_num_threads(job["threads"])
    rss_import = max_rss_bytes()
    model, opt = build(job["model"], job["vocab"], job["seq"], job["cfg"], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(job["vocab"], (job["batch"], job["seq"] + 1), generator=gen) for _ in range(2)]
    rss_setup = max_rss_bytes()
    times = []
    rep = None
    peak = TensorPeak()
    for step in range(job["steps"]):
        ids = batches[step % 2]
        x, y = ids[:, :-1], ids[:, 1:]
        t0 = time.perf_counter()
        # step 0 counts the saved bytes, step 1 the exact tensor peak (the state exists by then);
        # both hooks slow their step, so only the later steps are timed
        with peak if step == 1 else contextlib.nullcontext():
            if step == 0:
                rep = gs.saved_activation_bytes(model, lambda: model(x, y)[1])  # noqa: B023  called right away
                loss = rep.output
            else:
                loss = model(x, y)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if torch.is_tensor(v))
    blocks = {k: v for k, v in rep.by_block().items() if k.startswith("layers.")}
    block0 = {k[len("layers.0."):] or "(block)": v for k, v in rep.by_module.items()
              if k == "layers.0" or k.startswith("layers.0.")}
    return {"total": rep.total, "resident": rep.resident, "by_block": rep.by_block(),
            "block_mean": sum(blocks.values()) / max(len(blocks), 1), "block0": block0,
            "state_bytes": state, "step_peak": peak.peak, "rss_import": rss_import, "rss_setup": rss_setup, "rss_peak": max_rss_bytes(),
            "step_s": times, "tokens": job["batch"] * job["seq"]}


def run_memory(args) -> list[dict]:
    rows = []
    for model_name in args.models:
        for cfg in memory_configs(args.ranks, args.inner_steps):
            job = {"model": model_name, "vocab": args.vocab, "seq": args.seq, "batch": args.batch,
                   "steps": args.mem_steps, "threads": args.threads, "cfg": cfg}
            print(f"[memory] {model_name}: {cfg['label']}", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(job)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                raise RuntimeError(f"measurement failed for {model_name} {cfg['label']}:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"model": model_name, **cfg, **res})
    return rows


# ================================================================================ part 2: loss
def bench_command(args) -> list[str]:
    """The `grassopt bench` run of the loss part: the settings of benchmarks/sotu_tiny.sh, so that the
    `torch.optim.AdamW` runs (and its sweep) of that benchmark are reused when they share --loss-runs."""
    r, k = args.loss_rank, args.inner_steps
    est, rso = f"adamw-torch:sketch=haar,sketch_rank={r:g}", f"rso:sketch_rank={r:g},update_interval={k}"
    cmd = ["grassopt", "bench", "--model", args.loss_model, "--no-refs", "--no-progress",
           "--presets", "adamw-torch", est, rso,
           "--tokens", str(args.loss_tokens), "--batch-size", str(args.batch), "--seq-len", str(args.seq),
           "--rank", "64", "--update-interval", "50", "--eval-every", str(args.loss_eval_every),
           "--seeds", *map(str, args.seeds), "--sweep-steps", str(args.sweep_steps), "--sweep-eval-tokens", "32768",
           "--sweep-lrs", "adamw-torch=1e-3,3e-3,1e-2", f"{est}=3e-4,1e-3,3e-3", f"{rso}=1e-3,3e-3,1e-2",
           "--title", "AdamW, AdamW on the haar estimator, and RSO on SOTU (same tokens)",
           "--out", args.loss_runs, "--report-dir", os.path.relpath(Path(args.out) / "activation_memory_loss")]
    return cmd


def run_loss(args) -> dict:
    cmd = bench_command(args)
    print("[loss] " + shlex.join(cmd), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "grassopt", *cmd[1:]], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads((Path(args.out) / "activation_memory_loss" / "results.json").read_text())


# ================================================================================ report
def _mib(b: float) -> str:
    return f"{b / MIB:.2f}"


def write_report(args, mem: list[dict], loss: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/activation_memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = ["# Activation memory of the sketched methods (estimator, RSO)", ""]
    if args.smoke:
        lines += ["> **SMOKE RUN** (a few steps at a tiny batch, to check that the script works). These are not "
                  "results: run the commands below on an idle machine.", ""]
    lines += [f"Command: `{cmd.strip()}` (a part it did not run is kept from the previous report; the "
              "commands of both parts are at the end)", "",
              f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, fp32.",
              ""]
    if mem:
        lines += ["## Saved activations and peak memory per training step", "",
                  f"Batch {args.batch} x {args.seq} tokens, vocabulary {args.vocab}, random token ids. *Saved* = bytes "
                  "the forward pass of one training step stores for backward (exact count of distinct storages, "
                  "parameters and sketch matrices excluded); *per block* = the mean over transformer blocks; "
                  "*step peak* = the exact tensor bytes the second training step allocates at its worst moment "
                  "beyond the weights and the optimizer state (forward, backward and optimizer step; "
                  "`grassopt.profiling.TensorPeak`); *peak RSS* = the measuring process's high-water mark after "
                  f"{args.mem_steps} training steps (it includes torch itself: compare the *training* column, "
                  "peak minus the mark after building the model and optimizer; it also holds the allocator's "
                  "caches, so it follows the saved bytes only loosely: the exact columns are the measures of record). Ranks are fractions of each "
                  "layer's `in_features` (n/8 is 32 for `tiny`'s d=256 inputs and 86 for `down_proj`).", ""]
        for model_name in args.models:
            rows = [r for r in mem if r["model"] == model_name]
            plain = next(r for r in rows if r["method"] == "plain" and not r.get("lean"))
            lines += [f"### `{model_name}`", "",
                      "| configuration | saved (MiB) | vs plain | per block (MiB) | block vs plain | optimizer state (MiB) "
                      "| step peak (MiB) | vs plain | peak RSS (MiB) | training (MiB) | step (s) |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                peak = (f"{_mib(r['step_peak'])} | {r['step_peak'] / plain['step_peak'] - 1:+.1%}"
                        if r.get("step_peak") and plain.get("step_peak") else "n/a | n/a")
                lines.append(
                    f"| {r['label']} | {_mib(r['total'])} | {r['total'] / plain['total'] - 1:+.1%} | "
                    f"{_mib(r['block_mean'])} | {r['block_mean'] / plain['block_mean'] - 1:+.1%} | "
                    f"{_mib(r['state_bytes'])} | {peak} | "
                    f"{r['rss_peak'] / MIB:.0f} | {(r['rss_peak'] - r['rss_setup']) / MIB:.0f} | "
                    f"{sum(r['step_s']) / max(len(r['step_s']), 1):.2f} |")
            lines.append("")
            mods = list(plain["block0"])
            for r in rows:
                mods += [m for m in r["block0"] if m not in mods]
            tok = plain["tokens"]
            lines += ["Block 0 by module, bytes per token (first saver of a shared storage gets it; "
                      "`self_attn` / `mlp` are the attention and SwiGLU code around the linear layers):", "",
                      "| module | " + " | ".join(r["label"] for r in rows) + " |",
                      "|---|" + "---:|" * len(rows)]
            for m in mods:
                lines.append(f"| {m} | " + " | ".join(f"{r['block0'].get(m, 0) / tok:.0f}" for r in rows) + " |")
            lines.append("| **block** | " + " | ".join(f"**{sum(r['block0'].values()) / tok:.0f}**" for r in rows) + " |")
            lines.append("")
        lines += ["Target: at least 20% fewer saved-activation bytes per block at n/8 (a *lean* row is also "
                  "compared with plain AdamW on the same lean model, which is the fair comparison for it)."]
        for model_name in args.models:
            rows = [r for r in mem if r["model"] == model_name]
            plain = next(r for r in rows if r["method"] == "plain" and not r.get("lean"))
            lean = next((r for r in rows if r["method"] == "plain" and r.get("lean")), None)
            for r in rows:
                if r["rank"] == min(args.ranks) and r["method"] != "plain":
                    s = 1 - r["block_mean"] / plain["block_mean"]
                    text = f"- `{model_name}`, {r['label']}: {s:.1%} fewer than plain"
                    if r.get("lean") and lean is not None:
                        s = 1 - r["block_mean"] / lean["block_mean"]
                        text += f", {s:.1%} fewer than plain with lean activations"
                    lines.append(f"{text} {'(met)' if s >= 0.2 else '(not met)'}")
        lines += ["", "Why sketching alone stops near 20%: per token, a plain LLaMA block saves about `2(2d+1)` "
                  "(two RMSNorms: input and normalised output), `4d` (attention: rotated q, k, v and the output), "
                  "`3f` (SwiGLU: gate, silu(gate), up) and `2d + f` (inputs of the linear layers: one shared "
                  "by q/k/v, one by gate/up, the input of down_proj; o_proj's input *is* the attention output, "
                  "already saved). Sketching replaces only the last part, `2d + f` by `2r + r_f` (+ `r` for o_proj), "
                  "so the saving is bounded by `(2d + f) / total`, about 22.6% on `tiny`. The *lean* rows "
                  "(`LlamaConfig(lean_activations=True)`, `grassopt train --lean-activations`) shrink the untouched "
                  "part: RMSNorm saves `x` and one `rsqrt` per token instead of also the normalised tensor, SwiGLU "
                  "saves gate and up and recomputes silu; `2d + f` fewer floats per token and block, the same "
                  "forward pass, gradients equal to float rounding (tests/test_model.py).", ""]
    if loss:
        rows = loss["rows"]
        lines += ["## Eval loss on SOTU (same tokens for every run)", "",
                  f"`grassopt bench` (report: [activation_memory_loss/report.md](activation_memory_loss/report.md), "
                  f"with loss curves): `{args.loss_model}`, {rows[0]['tokens']:,} training tokens per run ({args.batch} "
                  f"x {args.seq} per step), seeds {args.seeds}, each method at its best learning rate of a {args.sweep_steps}-step "
                  f"sweep; sketch rank {args.loss_rank:g} of each layer's input (n/{round(1 / args.loss_rank)}); RSO "
                  f"resamples its subspaces every {args.inner_steps} steps (K). Eval loss: mean token loss over the "
                  "whole validation split (mean over seeds; spread = max - min).", "",
                  "| method | lr | eval loss | spread | vs AdamW | saved act. (MiB) | opt. state (MiB) | tokens/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['preset']} | {r['lr']:g} | {r['eval_loss']:.4f} | {r['eval_loss_spread']:.4f} | "
                         f"{r.get('loss_vs_ref_pct', 0):+.2f}% | {r.get('saved_mb') or float('nan'):.1f} | "
                         f"{r['state_mb']:.2f} | {r['tokens_per_s']:.0f} |")
        lines += ["", f"Learning-rate sweep ({args.sweep_steps} steps, eval on the first 32k validation tokens): " + "; ".join(
            f"{s['preset']} {s['lr']:g}: {s['final_eval_loss']:.3f}" for s in loss["sweep"]) + ".", ""]
    lines += ["## Commands", "", "```",
              "python benchmarks/activation_memory.py --parts memory   # both models, 9 configurations each",
              "python benchmarks/activation_memory.py --parts loss     # grassopt bench: AdamW, estimator, RSO on tiny",
              "# the bench command itself:",
              shlex.join(bench_command(args)),
              "```", ""]
    (out / "activation_memory.md").write_text("\n".join(lines))
    (out / "activation_memory.json").write_text(json.dumps({"args": vars(args), "memory": mem, "loss": loss}, indent=1))
    plot(args, mem, loss, out / "activation_memory.png")
    print("\n".join(lines))


def plot(args, mem, loss, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 if mem else 0  # the loss part's curves are in activation_memory_loss/ (grassopt bench)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if mem:
        ax = axes.pop(0)
        labels = [c["label"] for c in memory_configs(args.ranks, args.inner_steps)]
        width = 0.8 / max(len(args.models), 1)
        for i, model_name in enumerate(args.models):
            rows = {r["label"]: r for r in mem if r["model"] == model_name}
            ax.barh([j + i * width for j in range(len(labels))],
                    [rows[lb]["block_mean"] / rows[lb]["tokens"] for lb in labels], height=width, label=model_name)
        ax.set_yticks([j + width * (len(args.models) - 1) / 2 for j in range(len(labels))], labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("saved bytes per token per block")
        ax.set_title("saved activations per transformer block")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ================================================================================ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--parts", nargs="+", choices=["memory", "loss"], default=["memory", "loss"])
    ap.add_argument("--models", nargs="+", default=["tiny", "small"], help="models of the memory part")
    ap.add_argument("--ranks", nargs="+", type=float, default=[0.25, 0.125], help="rank fractions (memory part)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--mem-steps", type=int, default=4, help="training steps per memory measurement (>= 3)")
    ap.add_argument("--inner-steps", type=int, default=25, help="RSO: inner steps per outer iteration (K)")
    ap.add_argument("--loss-model", default="tiny")
    ap.add_argument("--loss-rank", type=float, default=0.25, help="sketch rank of the loss part (fraction of n)")
    ap.add_argument("--loss-tokens", type=int, default=501760, help="training tokens of each loss run")
    ap.add_argument("--loss-eval-every", type=int, default=123)
    ap.add_argument("--sweep-steps", type=int, default=40)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--loss-runs", default="runs/sotu_tiny",
                    help="folder of the bench runs (the default shares benchmarks/sotu_tiny.sh's, reusing its AdamW runs)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--smoke", action="store_true", help="a few steps at a tiny batch: checks that the script runs")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:  # child process of the memory part
        print(json.dumps(measure(json.loads(args.measure))))
        return
    if args.smoke:
        args.batch, args.seq, args.mem_steps = 2, 64, 3
        args.loss_model, args.loss_tokens, args.loss_eval_every, args.sweep_steps = "nano", 1024, 4, 2
        args.inner_steps, args.seeds, args.loss_runs = 3, [0], "runs/activation_smoke"
    mem = run_memory(args) if "memory" in args.parts else []
    loss = run_loss(args) if "loss" in args.parts else []
    # a part not run now keeps its results from the last report in --out (one file holds both parts)
    saved = Path(args.out) / "activation_memory.json"
    if saved.is_file() and not args.smoke and (not mem or not loss):
        prev = json.loads(saved.read_text())
        if not prev.get("args", {}).get("smoke"):
            mem, loss = mem or prev.get("memory") or [], loss or prev.get("loss") or []
    write_report(args, mem, loss, Path(args.out))


if __name__ == "__main__":
    main()
