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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .. import distributed, references, registry
from ..engine import (CheckpointError, LoopResult, TrainStep, call_hooks, default_device, load_checkpoint, lr_factor,
                      save_checkpoint)
from ..engine import config_differences as _differences
from ..engine.session import Session, run_session
from ..engine.config import RunConfig, check_count, check_folder, redeclare, setting, state_dtype_choices
from ..presets import PRESETS
from ..targets import parse_rank, parse_rank_or_fraction, resolve_rank, sketch_rank_spec
from . import data as data_mod
from .model import CONFIGS, Llama, config as model_config

__all__ = ["TrainConfig", "train", "build_optimizer", "evaluate", "CheckpointError", "load_checkpoint",
           "save_checkpoint", "EXTRA_PRESETS", "optimizer_state_bytes", "default_device", "build_model",
           "config_differences", "lr_factor"]

#: Optimizers the loop knows beside grassopt's presets (grassopt.registry).
EXTRA_PRESETS = {name: entry.description for name, entry in registry.OTHER_ENTRIES.items()}
#: --param-dtype: a torch dtype of every parameter, or int8 linear weights (grassopt.qlinear) with the other parameters
#: and the products in bfloat16 (int8: the memory configuration) or float32 (int8-fp32: the int8 weights' effect alone)
PARAM_DTYPES = ("float32", "bfloat16", "float16", "int8", "int8-fp32")
INT8_COMPUTE = {"int8": torch.bfloat16, "int8-fp32": torch.float32}



@dataclass
class TrainConfig(RunConfig):
    """Everything that defines a run. ``steps`` or ``tokens`` sets its length. The optimizer's
    hyperparameters and schedule (``lr``, ``min_lr_ratio``, ``warmup``, ``weight_decay``, ``plain_lr``,
    ``plain_weight_decay``, ``betas``, ``targets``, ``options``), ``clip``, ``bf16``, ``seed`` (model init and
    data order), ``device``, ``threads`` and the run control (``log_every``, ``checkpoint_every``, ``out``, ``resume``,
    ``stop_after``, ``progress``, ``plot``) are :class:`grassopt.engine.config.RunConfig`'s.

    Each field is also a flag of ``grassopt train`` (and ``grassopt bench``): see
    :func:`grassopt.engine.config.setting`. Run control (``RUN_CONTROL``: may change when a run is resumed)
    beyond the base's: ``checkpoint_activations`` gives bit-identical losses and gradients
    (tests/test_checkpointing.py), so a run may be resumed with it switched on or off, e.g. on a device with
    less memory; ``cache_dir`` (where the token cache lives) and ``eval_batch_size`` (how evaluation is
    batched) do not change the run either: a changed corpus is caught by the data's fingerprint in the
    checkpoint, whatever cache holds it; nor do ``profile_memory`` and ``subspace_quality`` (measurements)."""

    out: str = redeclare(RunConfig, "out", "runs/train")
    plot: bool = redeclare(RunConfig, "plot", help="do not write loss.png")
    model: str = setting("tiny", "model config", group="data", choices=lambda: sorted(CONFIGS))
    corpus: str | None = setting(None, "a folder of .txt files or a .jsonl with a 'text' field (default: the SOTU "
                                       "corpus)", group="data")
    vocab_size: int = setting(8192, "BPE vocabulary size", group="data")
    seq_len: int = setting(256, "tokens per sequence", group="data")
    batch_size: int = setting(8, "sequences per micro-batch on each process", group="data")
    grad_accum: int = setting(1, "micro-batches per optimizer step", group="data")
    steps: int = setting(200, "optimizer steps")
    tokens: int | None = setting(None, "train on this many tokens instead of --steps (steps = ceil(tokens / tokens "
                                       "per step))")
    preset: str = setting(
        "subtrack++", "optimizer preset; adamw-torch is torch.optim.AdamW; ref-* are reference optimizers (ref-muon, "
                      "ref-adafactor: torch's own; the others need pip install grassopt[bench])",
        group="optimizer", choices=lambda: sorted(registry.ENTRIES))
    rank: int | str | None = setting(
        None, "subspace rank r: an integer, or 'd/N' for a fraction of each matrix's short side (default: the "
              "preset's: 128; apollo d/4; apollo-mini 1)", group="optimizer", parse=parse_rank)
    update_interval: int | None = setting(None, "steps between basis updates T (default: the preset's: 200; "
                                                "ldadam 1)", group="optimizer")
    clip_mode: str = setting(
        "global", "clip the norm of all gradients together (torch's clip_grad_norm_) or of each parameter's "
                  "gradient separately; --layerwise needs per-parameter", group="optimizer",
        choices=("global", "per-parameter"))
    layerwise: bool = setting(
        False, "step each parameter inside backward as soon as its gradient is complete, then free the gradient "
               "(grassopt.layerwise): the full set of gradients is never resident. Global-norm clipping needs all "
               "gradients at once: use --clip-mode per-parameter or --clip 0", group="optimizer")
    sketch: str | None = setting(
        None, "store only x P (tokens x r) for the backward pass of the covered linear layers, with a random P of "
              "this law: W.grad gets the unbiased estimate G P P^T, a fresh P every step, under any preset; with "
              "--preset rso, the law of its subspaces (haar if not given)", group="memory",
        choices=("haar", "gaussian", "coordinate"))
    sketch_rank: float = setting(0.125, "rank r of P: a fraction of each layer's in_features such as 0.125, or an "
                                        "integer", group="memory", parse=parse_rank_or_fraction)
    lean_activations: bool = setting(
        False, "RMSNorm and SwiGLU save only their inputs (and one float per token) for backward and recompute the "
               "rest: 2d + f fewer floats per token and block, the same forward pass", group="memory")
    checkpoint_activations: bool = setting(
        False, "activation checkpointing per decoder block: each block saves only its input for backward and runs "
               "its forward again when backward reaches it (about one more forward pass of compute); bit-identical "
               "losses and gradients, so a run may resume with it on or off", group="memory", run_control=True)
    subspace_quality: bool = setting(
        False, "record, for every projected matrix, the share of the next gradients' energy its basis captures, "
               "averaged over each interval between basis updates, and the angles each update turns (analysis.jsonl, "
               "capture_next.png; one extra Q^T X product per matrix and step)", group="output", run_control=True)
    fsdp: bool = setting(
        False, "shard the model with FSDP2 (torch's fully_shard: each decoder block, then the rest) over the "
               "processes of torchrun (or one process): weights, gradients and AdamW state are split across the "
               "ranks, a projected matrix is gathered at its step (grassopt.distributed.FSDPSubspaceAdamW); "
               "checkpoints are sharded (torch.distributed.checkpoint: checkpoint.dcp/, every rank writes its "
               "shards) and resume at this or another number of processes")
    param_dtype: str = setting(
        "float32", "dtype of the parameters (optimizer state stays float32); int8: the weights of the projected "
                   "linear layers (--targets) as int8 codes with a float32 scale per block of 256 (grassopt.qlinear), "
                   "the other parameters and the products in bfloat16 (int8-fp32: in float32); add "
                   "--stochastic-rounding (else their updates are rounded to nearest)", choices=PARAM_DTYPES)
    state_dtype: str = setting(
        "float32", "Adam moments of grassopt's presets (projected and plain groups): float32, or int8 codes with a "
                   "float32 scale per block of 256 (about 1/4 of the bytes; grassopt.codecs.int8)",
        group="optimizer", choices=state_dtype_choices)
    plain_state_dtype: str | None = setting(
        None, "Adam moments of the plain parameters (embedding, head, norms, biases) of grassopt's presets, in "
              "place of --state-dtype: e.g. factored (Adafactor's row and column statistics for V) beside int8 "
              "subspace moments; factored-no-m and no-m need --betas 0,B2", group="optimizer",
        choices=state_dtype_choices)
    stochastic_rounding: bool = setting(
        False, "with --param-dtype bfloat16 or int8: round each weight update stochastically (unbiased), so that "
               "updates below half a bf16 ulp or int8 grid step are not lost (else: to nearest); seeded, resumable, "
               "identical on every rank", group="optimizer")
    compile: bool = setting(
        False, "run the optimizer step's elementwise work (int8 moments, Adam, the update, stochastic rounding, the "
               "recovery scales) as torch.compile kernels (grassopt's presets; equal to the eager step within 1e-6 "
               "relative per step, so a resume may switch it; the eager step, with one warning, where compile is "
               "unavailable)", group="optimizer", run_control=True)
    eval_every: int = setting(100, "evaluate every N steps (0: only at the end)")
    eval_batch_size: int = setting(32, "sequences per evaluation batch", run_control=True)
    eval_tokens: int | None = setting(None, "evaluate on the first N tokens of the validation split (default: all "
                                            "of it, exactly)")
    profile_memory: bool = setting(
        False, "count the tensor bytes the second training step allocates at its worst moment, beyond the weights "
               "and optimizer state (grassopt.profiling.TensorPeak; slows that one step)", group="output",
        run_control=True)
    cache_dir: str | None = setting(None, "tokenizer/token cache (default: $GRASSOPT_CACHE or ~/.cache/grassopt)",
                                    group="data", run_control=True)

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
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype={self.param_dtype!r} must be one of {list(PARAM_DTYPES)} (--param-dtype)")
        if self.corpus is not None and not isinstance(self.corpus, (str, Path)):
            raise ValueError(f"corpus={self.corpus!r} must be a path (a folder of .txt files or a .jsonl file), or "
                             "None for the SOTU corpus (--corpus)")
        check_folder(data_mod.default_cache_root(self.cache_dir), "cache_dir", "cache folder")
        if self.state_dtype not in state_dtype_choices():
            raise ValueError(f"state_dtype={self.state_dtype!r} must be one of {state_dtype_choices()}")
        if self.plain_state_dtype is not None and self.plain_state_dtype not in state_dtype_choices():
            raise ValueError(f"plain_state_dtype={self.plain_state_dtype!r} must be one of {state_dtype_choices()}")
        if self.plain_state_dtype is not None and self.preset not in PRESETS:
            raise ValueError(f"plain_state_dtype={self.plain_state_dtype!r} applies to grassopt's presets, not to "
                             f"{self.preset!r}; leave it unset")
        if self.state_dtype != "float32" and self.preset not in PRESETS:
            raise ValueError(f"state_dtype={self.state_dtype!r} applies to grassopt's presets, not to {self.preset!r} "
                             "(for 8-bit AdamW as a reference use the preset ref-adamw8bit)")
        if self.compile is not False and (self.compile is not True or self.preset not in PRESETS):
            raise ValueError(f"compile={self.compile!r} must be True or False, and True applies to grassopt's presets "
                             f"(SubspaceAdamW), not to {self.preset!r} (--compile)")
        if self.stochastic_rounding and (self.param_dtype not in ("bfloat16", *INT8_COMPUTE) or self.preset not in PRESETS):
            raise ValueError("stochastic_rounding=True rounds the updates of bfloat16 or int8 weights of grassopt's "
                             "presets: use it with param_dtype='bfloat16', 'int8' or 'int8-fp32' (--param-dtype) and a grassopt "
                             "preset")
        self._check_int8()
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
        if self.layerwise and self.preset == "rso":
            from ..sketch.rso import RSO
            raise ValueError(f"layerwise=True cannot step preset 'rso': {RSO.layerwise_refusal}")
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
        if self.fsdp:
            self._validate_fsdp()
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


    def _validate_fsdp(self) -> None:
        if self.preset not in PRESETS and self.preset != "adamw-torch":
            raise ValueError(f"fsdp=True steps grassopt's presets and adamw-torch on a sharded model; {self.preset!r} "
                             "does not run on one (run it without --fsdp, with DDP under torchrun)")
        if self.layerwise:
            raise ValueError(
                "layerwise=True does not run with fsdp=True: FSDP2 reduce-scatters a block's gradients after that "
                "block's whole backward and frees the unsharded ones itself, while grassopt.layerwise steps each "
                "gradient from a hook as it completes (DDP's buckets); drop --layerwise (FSDP2 already keeps only "
                "sharded gradients) or --fsdp")
        plain = self.plain_state_dtype or self.state_dtype
        if plain.startswith("factored"):
            raise ValueError(
                f"fsdp=True steps the plain parameters (embedding, head, norms) on each rank's shard, and the "
                f"{plain!r} moments keep row and column statistics of whole matrices; use --plain-state-dtype "
                "float32, bfloat16, int8 or no-m with --fsdp")
        if self.sketch is not None:
            raise ValueError(f"sketch={self.sketch!r} replaces the covered layers, which fsdp=True does not shard; "
                             "run the estimator without --fsdp")
        if self.subspace_quality:
            raise ValueError("subspace_quality=True reads whole gradients after backward, which fsdp=True shards; "
                             "measure it without --fsdp")
        if self.param_dtype in INT8_COMPUTE:
            raise ValueError(f"param_dtype={self.param_dtype!r} keeps int8 codes in grassopt.qlinear layers, which "
                             "fsdp=True does not shard; use --param-dtype bfloat16 (with --stochastic-rounding) with "
                             "--fsdp, or int8 weights with DDP")

    def _check_int8(self) -> None:
        """int8 weights are written by grassopt's optimizers alone, and read only through their codes."""
        if self.param_dtype not in INT8_COMPUTE:
            return
        dt = self.param_dtype
        if self.preset not in PRESETS:
            raise ValueError(f"param_dtype={dt!r} weights are updated by grassopt's presets (SubspaceAdamW writes "
                             f"them back onto the int8 grid); {self.preset!r} cannot: choose a preset such as "
                             "'adamw' or 'subtrack++', or --param-dtype bfloat16")
        if self.sketch is not None:
            raise ValueError(f"param_dtype={dt!r} and sketch: the sketched layers read full-precision weights; drop "
                             "--sketch or use --param-dtype bfloat16")
        if self.bf16 and dt == "int8":
            raise ValueError("param_dtype='int8' already computes in bfloat16; drop --bf16 (autocast), or use "
                             "param_dtype='int8-fp32' with it")


#: Config fields that may change when a run is resumed (they do not affect the numbers): see TrainConfig.
RUN_CONTROL = TrainConfig.RUN_CONTROL


# ---------------------------------------------------------------------------------------- model and optimizer
def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device | str = "cpu") -> Llama:
    """The LLaMA of ``cfg.model`` (seeded by ``cfg.seed``) on ``device``, in ``cfg.param_dtype`` (``int8``: the
    linear layers of ``cfg.targets`` quantized from their float32 initialisation, the rest bfloat16; ``int8-fp32``:
    the rest float32)."""
    torch.manual_seed(cfg.seed)
    model = Llama(model_config(cfg.model, vocab_size=vocab_size, max_seq_len=max(cfg.seq_len, 1024),
                               lean_activations=cfg.lean_activations,
                               checkpoint_activations=cfg.checkpoint_activations))
    if cfg.param_dtype in INT8_COMPUTE:
        from ..qlinear import quantize_linears
        quantize_linears(model, cfg.targets)
        return model.to(device=device, dtype=INT8_COMPUTE[cfg.param_dtype])
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
    this also sketches ``model``; with ``cfg.fsdp``, ``model`` is sharded and the presets are
    :class:`grassopt.distributed.FSDPSubspaceAdamW`)."""
    return registry.build(cfg.preset, model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                          rank=cfg.rank, update_interval=cfg.update_interval, targets=cfg.targets,
                          options=cfg.options, seed=cfg.seed, state_dtype=cfg.state_dtype,
                          stochastic_rounding=cfg.stochastic_rounding, sketch=cfg.sketch, sketch_rank=cfg.sketch_rank,
                          plain_lr=cfg.plain_lr, plain_weight_decay=cfg.plain_weight_decay,
                          plain_state_dtype=cfg.plain_state_dtype, sharded=cfg.fsdp, compile=cfg.compile)


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
             rank: int = 0, world: int = 1, lockstep: bool = False) -> tuple[float, int]:
    """Exact mean token loss over the whole token stream (every predicted token counted once), the batches
    shared out over ``world`` ranks. ``lockstep`` (FSDP2, whose forward passes are collectives): every rank
    runs the same number of forward passes (one with fewer batches repeats its last, uncounted)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    autocast: dict[str, Any] = dict(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    try:
        mine, last = 0, None
        for i, (x, y) in enumerate(data_mod.iter_eval_batches(tokens, batch_size, seq_len, device=device)):
            if i % world != rank:
                continue
            with torch.autocast(**autocast):
                _, loss = model(x, y, reduction="sum")
            total += loss.double()
            count += y.numel()
            mine, last = mine + 1, (x, y)
        n = data_mod.num_eval_batches(len(tokens), batch_size, seq_len)
        if lockstep and n and last is None:
            last = next(data_mod.iter_eval_batches(tokens, batch_size, seq_len, device=device))
        if lockstep and last is not None:
            for _ in range(-(-n // world) - mine):
                with torch.autocast(**autocast):
                    model(*last, reduction="sum")
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

    The setup and wrap-up every run shares (validation, threads, device, the run folder, the summary, the
    plot, Ctrl-C, a non-finite loss) are :func:`grassopt.engine.session.run_session`'s.
    """
    hooks = list(hooks or [])
    if cfg.subspace_quality:
        from ..analysis.hook import SubspaceQuality
        hooks.append(SubspaceQuality(out=cfg.out, plot=cfg.plot))

    def prepare() -> None:
        if cfg.resume:
            references.prepare_resume(cfg.preset)  # torchao's state tensors must be known to weights_only loading

    if not cfg.fsdp:
        return run_session(cfg, lambda session: _train(session, dataset, hooks), prepare=prepare)
    cfg.validate()  # (before the device names a backend)
    with distributed.process_group_of_one(cfg.device or default_device()):  # FSDP2 in one process too
        return run_session(cfg, lambda session: _train(session, dataset, hooks), prepare=prepare, sharded=True,
                           saved_config=_per_process_batch)


def _per_process_batch(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The saved config as a run resumed by another number of processes reads it: ``batch_size`` (sequences
    per process) may change with the world size if the global batch (``batch_size`` x processes) stays the
    same; the run then draws exactly the batches it would have drawn."""
    saved, world = dict(ckpt["config"]), distributed.rank_and_world()[1]
    saved_world = int(ckpt.get("world_size", world))
    batch = saved.get("batch_size")
    if saved_world != world and isinstance(batch, int) and (batch * saved_world) % world == 0:
        saved["batch_size"] = batch * saved_world // world
    return saved


@dataclass
class _Run:
    """What :func:`_build` makes of a config: the data, the model, the optimizer and the step."""

    dataset: data_mod.TokenizedCorpus
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    sampler: data_mod.BatchSampler
    sketched: bool


def _build(cfg: TrainConfig, session: Session, dataset: data_mod.TokenizedCorpus | None,
           hooks: list[Any]) -> _Run:
    """The data, model, optimizer and training step of ``cfg``, each built once, here."""
    device, rank, world = session.device, session.rank, session.world
    if dataset is None:
        dataset = data_mod.prepare(cfg.corpus, vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir,
                                   progress=cfg.progress and rank == 0)
    dataset.check_size(cfg.batch_size * world, cfg.seq_len)
    if cfg.layerwise and any(callable(getattr(h, "after_backward", None)) for h in hooks):
        raise ValueError("a hook reads the gradients after backward (after_backward), but with layerwise=True "
                         "each gradient is stepped and freed inside backward; run it without layerwise")
    model = build_model(cfg, dataset.vocab_size, device)
    sketched = sketch_model(model, cfg)  # the estimator: W.grad = G P P^T, a fresh P every step
    if cfg.fsdp:
        distributed.shard_model(model, model.layers, device)
    opt = build_optimizer(model, cfg)  # (rso sketches the model here)
    if getattr(opt, "zeroth_order", False) and world > 1:
        raise ValueError(f"preset {cfg.preset!r} (forward-only) does not support data parallelism; run one process")
    ddp_model = None
    if world > 1 and not cfg.fsdp:  # after sketching: DDP sees the final parameters (B for rso)
        # int8 weights (grassopt.qlinear) are not broadcast: their parameters hold no values, and every rank
        # builds the same codes from the same seed and writes the same updates (seeded rounding generators)
        int8 = cfg.param_dtype in INT8_COMPUTE
        ddp_model = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=cfg.layerwise,
                                                        init_sync=not int8, broadcast_buffers=not int8)
    updater = None
    if cfg.layerwise:
        from ..layerwise import LayerwiseUpdater
        updater = LayerwiseUpdater(opt, ddp_model=ddp_model, clip_norm=cfg.clip if cfg.clip > 0 else None)
    sampler = data_mod.BatchSampler(dataset.train, cfg.batch_size * world, cfg.seq_len, seed=cfg.seed)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    step = TrainStep(model, opt, _lm_loss, ddp_model=ddp_model, updater=updater, clip=cfg.clip,
                     clip_mode=cfg.clip_mode, autocast=autocast, sketched=sketched, hooks=hooks, fsdp=cfg.fsdp)
    return _Run(dataset, model, opt, step, sampler, sketched)


def _train(session: Session, dataset: data_mod.TokenizedCorpus | None, hooks: list[Any]) -> dict[str, Any]:
    cfg, device, rank, world = session.cfg, session.device, session.rank, session.world
    run = _build(cfg, session, dataset, hooks)
    dataset, model, sampler = run.dataset, run.model, run.sampler

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sampler.next()
        if world > 1:
            x, y = x[rank * cfg.batch_size:(rank + 1) * cfg.batch_size], y[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        return x.to(device), y.to(device)

    def run_eval() -> dict[str, Any]:
        val = dataset.val if cfg.eval_tokens is None else dataset.val[:cfg.eval_tokens + 1]
        loss, count = evaluate(model, val, cfg.eval_batch_size, cfg.seq_len, device, cfg.bf16, rank, world,
                               lockstep=cfg.fsdp)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700)), "eval_tokens": count}

    total = cfg.total_steps(world)
    saved_world = (session.checkpoint or {}).get("world_size", world)
    if saved_world != world:  # a sharded run resumed by another number of processes: the sampler goes on
        session.checkpoint["sampler"]["batch_size"] = sampler.batch_size  # type: ignore[index]  # (its global batch)
    loop = session.loop(model=model, optimizer=run.optimizer,
                        scheduler=session.scheduler(run.optimizer, total, cfg.warmup_steps(world)),
                        sampler=sampler, step=run.step, next_batch=next_batch, grad_accum=cfg.grad_accum, total=total,
                        per_step={"tokens_seen": cfg.tokens_per_step(world)},
                        position=lambda c: {"tokens": c["tokens_seen"]}, rate=("tokens_per_s", "tokens_seen"),
                        evaluate=run_eval, eval_every=cfg.eval_every, hooks=hooks,
                        desc=f"{cfg.preset} {cfg.model}", data=data_fingerprint(dataset))
    saved_bytes = None if run.step.forward_only else _saved_bytes(run, cfg, device)
    loop.profile_step = loop.step + 1 if cfg.profile_memory else None  # the optimizer state exists by then
    call_hooks(hooks, "on_start", model, run.optimizer, cfg)
    res = loop.run()
    summary = _summary(cfg, run, res, saved_bytes)
    call_hooks(hooks, "on_end", model, run.optimizer, summary)
    title = f"{cfg.preset} on {cfg.model}"
    return session.finish(res, summary, lambda history, path: plot_run(history, path, title=title), "loss.png",
                          notices=sys.stdout)  # the line on an interruption: on stdout, before the summary


def _saved_bytes(run: _Run, cfg: TrainConfig, device: torch.device) -> int:
    """Bytes one training micro-batch saves for backward (exact; on a batch of the training shape, the
    sampler's position restored so the run is unchanged)."""
    from ..sketch import saved_activation_bytes
    model, sampler = run.model, run.sampler
    position = sampler.state_dict()
    xb, yb = (t[:cfg.batch_size].to(device) for t in sampler.next())
    sampler.load_state_dict(position)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        return saved_activation_bytes(model, lambda: model(xb, yb)[1]).total


def _summary(cfg: TrainConfig, run: _Run, res: LoopResult, saved_bytes: int | None) -> dict[str, Any]:
    return {"preset": cfg.preset, "model": cfg.model, "seed": cfg.seed, "lr": cfg.lr, "rank": cfg.rank,
            **res.summary(), "tokens": res.counters["tokens_seen"], **_final_losses(res.history),
            "tokens_per_s": res.counters["tokens_seen"] / res.train_time if res.train_time else None,
            "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
            "parameters": sum(p.numel() for p in run.model.parameters()),
            "mean_opt_step_s": None if run.step.updater is not None else
            res.optimizer_time / max(1, res.step - res.start_step),
            "saved_activation_bytes": saved_bytes, "step_peak_tensor_bytes": res.step_peak_tensor_bytes,
            "peak_rss_bytes": res.peak_rss_bytes, "rss_before_training_bytes": res.rss_before_training_bytes,
            "train_peak_rss_bytes": res.train_peak_rss_bytes}


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
