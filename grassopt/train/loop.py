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

import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .. import memory, references
from ..functional import fused_available
from ..optimizer import SubspaceAdamW
from ..layerwise import clip_grad_norm_per_parameter_
from ..optimizer import SUBSPACE_DEFAULTS
from ..presets import PRESETS, default_rank, param_groups, resolve_rank, select_targets
from . import data as data_mod
from .model import Llama, config as model_config

__all__ = ["TrainConfig", "train", "build_optimizer", "evaluate", "CheckpointError", "load_checkpoint",
           "save_checkpoint", "EXTRA_PRESETS", "optimizer_state_bytes", "default_device"]

#: Optimizers the loop knows beside grassopt's presets.
EXTRA_PRESETS = {
    "adamw-torch": "torch.optim.AdamW (full rank, PyTorch's own implementation; fused=True where the device has "
                   "the fused kernel)",
    "ref-galore": "GaLoreAdamW from the reference package galore-torch (optional: pip install grassopt[bench])",
    "ref-apollo": "APOLLOAdamW from the reference package apollo-torch (optional: pip install grassopt[bench])",
    "zo": "forward-only training: zeroth-order low-rank (U V^T, Haar V) gradient estimates (grassopt.zo)",
    "mezo": "forward-only training with dense Gaussian perturbations (MeZO), the baseline of zo",
    "rso": "randomized subspace optimization (grassopt.sketch.rso): the covered layers train a low-rank B in a "
           "random subspace P (resampled every --update-interval steps) and store only x P for backward",
    # the reference optimizers people pick today (grassopt.references; optional: pip install grassopt[bench])
    **{name: ref.description for name, ref in references.REFERENCES.items()},
}

#: Config fields that may change when a run is resumed (they do not affect the numbers).
#: ``checkpoint_activations`` gives bit-identical losses and gradients (tests/test_checkpointing.py): a run
#: may be resumed with it switched on or off, e.g. on a device with less memory.
RUN_CONTROL = {"out", "resume", "stop_after", "checkpoint_every", "log_every", "progress", "threads", "plot",
               "profile_memory", "checkpoint_activations"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or from another run."""


def default_device() -> str:
    """The current accelerator (CUDA, MPS, XPU, ...) if there is one, else the CPU."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return str(acc.current_accelerator())
    return "cpu"


@dataclass
class TrainConfig:
    """Everything that defines a run. ``steps`` or ``tokens`` sets its length."""

    model: str = "tiny"
    corpus: str | None = None  # None: the SOTU corpus
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch on each rank
    grad_accum: int = 1
    steps: int = 200
    tokens: int | None = None  # if set, steps = ceil(tokens / tokens per step)
    preset: str = "subtrack++"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int | None = None  # default: 10% of the steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    rank: int | str | None = None  # None: the preset's default (128; apollo d/4; apollo-mini 1); or "d/N"
    update_interval: int | None = None  # None: the preset's default (200; ldadam: every step)
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    options: dict[str, Any] = field(default_factory=dict)  # other subspace options (alpha, step_size, ...)
    clip: float = 1.0  # gradient-norm clipping; 0 disables it
    clip_mode: str = "global"  # "global" (torch's clip_grad_norm_ over all parameters) or "per-parameter"
    layerwise: bool = False  # step each parameter inside backward (grassopt.layerwise); frees its gradient
    sketch: str | None = None  # sketch law (haar, gaussian, coordinate): the unbiased estimator; for rso, P's law
    sketch_rank: float = 0.125  # rank of the sketch: a fraction of each layer's in_features, or an int >= 1
    bf16: bool = False  # bf16 autocast for the forward pass
    lean_activations: bool = False  # RMSNorm and SwiGLU recompute their intermediates in backward (LlamaConfig)
    checkpoint_activations: bool = False  # each block saves only its input, recomputes the rest in backward
    param_dtype: str = "float32"  # dtype of the parameters themselves ("bfloat16" for pure bf16 training)
    state_dtype: str = "float32"  # Adam moments of grassopt's presets: "float32" or "int8" (grassopt.functional)
    stochastic_rounding: bool = False  # round bf16 weight updates stochastically (needs param_dtype bfloat16)
    eval_every: int = 100
    eval_batch_size: int = 32
    eval_tokens: int | None = None  # None: the whole validation split; else its first N predicted tokens
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end and on Ctrl-C
    profile_memory: bool = False  # count the tensor bytes one training step allocates (grassopt.memory.TensorPeak)
    seed: int = 0  # model init and data order
    device: str | None = None
    threads: int | None = None
    out: str = "runs/train"
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this invocation
    progress: bool = True
    plot: bool = True
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
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.rank is not None:
            resolve_rank(self.rank, (1 << 62, 1 << 62))
        if self.update_interval is not None and (isinstance(self.update_interval, bool) or
                                                 not isinstance(self.update_interval, int) or self.update_interval < 1):
            raise ValueError(f"update_interval={self.update_interval!r} must be an integer >= 1 (steps between "
                             "basis updates), or None for the preset's default")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            raise ValueError(f"eval_tokens={self.eval_tokens} must be >= 1 (or None for the whole validation split)")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"tokens={self.tokens} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.param_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"param_dtype={self.param_dtype!r} must be float32, bfloat16 or float16")
        if self.clip < 0:
            raise ValueError(f"clip={self.clip} must be >= 0 (0 disables clipping)")
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
        if self.layerwise and self.preset in references.REFERENCES:
            raise ValueError(f"layerwise=True steps grassopt's presets and adamw-torch; the reference "
                             f"{self.preset!r} runs as its authors do, with optimizer.step()")
        forward_only = self.preset in ("zo", "mezo")
        if self.layerwise and forward_only:
            raise ValueError(f"layerwise=True needs a backward pass; preset {self.preset!r} is forward-only")
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
        if isinstance(r, bool) or not (0 < r < 1 or (r >= 1 and float(r).is_integer())):
            raise ValueError(f"sketch_rank={r!r} must be a fraction of in_features in (0, 1) or an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# ---------------------------------------------------------------------------------------- optimizers
def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _reference_groups(model: nn.Module, cfg: TrainConfig, ours: str,
                      extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Projected/plain groups for the reference packages: the same targets and ranks (``cfg.rank``,
    else the default rank of our preset ``ours``) as :func:`grassopt.param_groups`."""
    spec = default_rank(ours) if cfg.rank is None else cfg.rank
    rank_of = {}
    for _, m in select_targets(model, cfg.targets):
        r = resolve_rank(spec, m.weight.shape)
        if m.weight.requires_grad and r < min(m.weight.shape):
            rank_of[id(m.weight)] = r
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in rank_of]
    groups: list[dict[str, Any]] = [{"params": plain}]
    for r in sorted(set(rank_of.values())):
        groups.append({"params": [p for p in model.parameters() if rank_of.get(id(p)) == r], "rank": r,
                       "update_proj_gap": cfg.update_interval or SUBSPACE_DEFAULTS["update_interval"],
                       "proj_type": "std", **extra})
    return groups


def _sketch_rank(cfg: TrainConfig) -> float | int:
    r = cfg.sketch_rank
    return int(r) if r >= 1 else float(r)


def sketch_model(model: nn.Module, cfg: TrainConfig) -> bool:
    """Sketch ``model`` in place for the unbiased estimator when ``cfg.sketch`` names a law (not for
    ``rso``, whose optimizer sketches the model itself). True if it did; call before wrapping in DDP."""
    if cfg.sketch is None or cfg.preset == "rso":
        return False
    from .. import sketch as gs
    gs.sketch(model, _sketch_rank(cfg), law=cfg.sketch, targets=cfg.targets, mode="estimator", seed=cfg.seed)
    return True


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.preset`` for ``model`` (for ``rso``, this also sketches ``model``)."""
    opts = dict(cfg.options)
    if cfg.preset == "rso":
        from .. import sketch as gs
        known = {"inner_steps", "mu", "inner", "eps"}
        bad = set(opts) - known
        if bad:
            raise ValueError(f"unknown option(s) {sorted(bad)} for preset 'rso'; it takes {sorted(known)} "
                             "(the rank is sketch_rank, the law is sketch, the outer iteration is update_interval)")
        inner_steps = int(opts.get("inner_steps", cfg.update_interval or SUBSPACE_DEFAULTS["update_interval"]))
        return gs.rso(model, _sketch_rank(cfg), inner_steps=inner_steps,
                      lr=cfg.lr, weight_decay=cfg.weight_decay, mu=float(opts.get("mu", 0.0)),
                      law=cfg.sketch or "haar", seed=cfg.seed, targets=cfg.targets, betas=cfg.betas,
                      eps=float(opts.get("eps", 1e-6)), inner=opts.get("inner", "adam"))
    if cfg.preset in ("zo", "mezo"):
        from ..zo import ZO
        known = {"eps", "momentum", "law", "lazy", "others"}
        bad = set(opts) - known
        if bad:
            raise ValueError(f"unknown option(s) {sorted(bad)} for preset {cfg.preset!r}; it takes {sorted(known)}")
        if isinstance(cfg.rank, str):
            raise ValueError(f"preset {cfg.preset!r} takes an integer rank, got rank={cfg.rank!r}")
        return ZO(model, rank=8 if cfg.rank is None else cfg.rank, lr=cfg.lr, weight_decay=cfg.weight_decay,
                  targets=cfg.targets, dense=cfg.preset == "mezo", seed=cfg.seed, **opts)
    if cfg.preset == "adamw-torch":  # torch's fused kernel wherever the device has one: its fastest AdamW
        groups = _decay_groups(model, cfg.weight_decay)
        fused = fused_available([p for g in groups for p in g["params"]]) or None
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)
    if cfg.preset in references.REFERENCES:
        return references.build(cfg.preset, model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                settings=opts)
    references.require(cfg.preset)  # ref-galore, ref-apollo: one line if the package is missing
    if cfg.preset == "ref-galore":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW
            return GaLoreAdamW(_reference_groups(model, cfg, "galore", {"scale": opts.get("alpha", 0.25)}), lr=cfg.lr,
                               betas=cfg.betas, weight_decay=cfg.weight_decay, no_deprecation_warning=True)
    if cfg.preset == "ref-apollo":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from apollo_torch import APOLLOAdamW
            extra = {"scale": opts.get("scale", 1.0), "proj": "random", "scale_type": opts.get("scale_type", "channel")}
            return APOLLOAdamW(_reference_groups(model, cfg, "apollo", extra), lr=cfg.lr, betas=cfg.betas,
                               weight_decay=cfg.weight_decay)
    groups = param_groups(model, cfg.preset, rank=cfg.rank, update_interval=cfg.update_interval,
                          targets=cfg.targets, weight_decay=cfg.weight_decay,
                          **(opts if PRESETS[cfg.preset] is not None else {}))
    return SubspaceAdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, seed=cfg.seed,
                         state_dtype=cfg.state_dtype, stochastic_rounding=cfg.stochastic_rounding)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors, as allocated (:func:`grassopt.references.tensor_bytes`):
    nested lists and dicts (SOAP's preconditioners), each storage once and whole (bitsandbytes'
    shared quantization maps; galore-torch's bases, slices of a full SVD factor), tensor subclasses
    by their inner tensors (torchao's 8-bit codes, scales and maps), and the reference packages'
    projector bases (galore-torch, apollo-torch). One counter for every method."""
    seen: set = set()
    total = references.tensor_bytes(list(opt.state.values()), seen)
    for st in opt.state.values():
        proj = st.get("projector") if isinstance(st, dict) else None
        mat = getattr(proj, "ortho_matrix", None)
        if torch.is_tensor(mat):
            total += references.tensor_bytes(mat, seen)
    return total


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` with ``torch.save`` atomically: a temporary file in the same folder,
    flushed to disk, then renamed over ``path``; a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_CKPT_KEYS = ("format", "config", "step", "model", "optimizer", "scheduler", "sampler", "rng")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True``; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; start without --resume, or point --out at the run to resume")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt: {type(e).__name__}: {str(e)[:200]}); "
            "delete it to start over, or resume from an intact copy") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CKPT_KEYS) or ckpt.get("format") != 1:
        raise CheckpointError(f"{path} is not a grassopt training checkpoint (missing fields); "
                              "was it written by `grassopt train`?")
    return ckpt


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


# ---------------------------------------------------------------------------------------- the loop
class _StopFlag:
    """First SIGINT: stop after the current step (and checkpoint). Second: abort immediately."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _StopFlag:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def config_differences(saved: dict[str, Any], cfg: TrainConfig, ignore: Iterable[str] = RUN_CONTROL) -> list[str]:
    """The settings in which ``cfg`` differs from a saved ``config.json`` (a key missing from it,
    written before the field existed, counts as that field's default)."""
    defaults, ignore = TrainConfig().to_dict(), set(ignore)
    return [f"{k}: checkpoint {saved.get(k, defaults.get(k))!r} vs now {v!r}" for k, v in cfg.to_dict().items()
            if k not in ignore and saved.get(k, defaults.get(k)) != v]


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    diffs = config_differences(saved, cfg)
    if diffs:
        raise CheckpointError(f"{path} was written by a run with other settings ({'; '.join(diffs)}); "
                              "resume with the same settings, or start a new run in another --out folder")


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

    def call(name: str, *a: Any) -> None:
        for h in hooks:
            fn = getattr(h, name, None)
            if fn is not None:
                fn(*a)

    cfg.validate()
    rank, world = _dist()
    main_proc = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or default_device())
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    ckpt = None
    if cfg.resume:
        references.prepare_resume(cfg.preset)  # torchao's state tensors must be known to weights_only loading
        ckpt = load_checkpoint(ckpt_path)
        _check_resume_config(ckpt["config"], cfg, ckpt_path)
    if dataset is None:
        dataset = data_mod.prepare(cfg.corpus, vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir,
                                   progress=cfg.progress and main_proc)
    dataset.check_size(cfg.batch_size * world, cfg.seq_len)

    if cfg.layerwise and any(callable(getattr(h, "after_backward", None)) for h in hooks):
        raise ValueError("a hook reads the gradients after backward (after_backward), but with layerwise=True "
                         "each gradient is stepped and freed inside backward; run it without layerwise")

    torch.manual_seed(cfg.seed)
    model = Llama(model_config(cfg.model, vocab_size=dataset.vocab_size, max_seq_len=max(cfg.seq_len, 1024),
                               lean_activations=cfg.lean_activations,
                               checkpoint_activations=cfg.checkpoint_activations))
    model.to(device=device, dtype=getattr(torch, cfg.param_dtype))
    sketched = sketch_model(model, cfg)  # the estimator: W.grad = G P P^T, a fresh P every step
    opt = build_optimizer(model, cfg)  # (rso sketches the model here)
    ddp_model: nn.Module = model
    if world > 1:  # after sketching: DDP sees the final parameters (B for rso)
        ddp_model = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=cfg.layerwise)
    updater = None
    if cfg.layerwise:
        from ..layerwise import LayerwiseUpdater
        updater = LayerwiseUpdater(opt, ddp_model=ddp_model if world > 1 else None,
                                   clip_norm=cfg.clip if cfg.clip > 0 else None)
    total, warmup = cfg.total_steps(world), cfg.warmup_steps(world)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))
    sampler = data_mod.BatchSampler(dataset.train, cfg.batch_size * world, cfg.seq_len, seed=cfg.seed)
    step, history = 0, []
    train_time, tokens_seen = 0.0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        step = int(ckpt["step"])
        train_time, tokens_seen = float(ckpt["train_time"]), int(ckpt["tokens_seen"])
        history = _read_metrics(out / "metrics.jsonl", upto=step)

    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        _write_metrics(out / "metrics.jsonl", history)
    n_params = sum(p.numel() for p in model.parameters())
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    saved_bytes = None
    if not getattr(opt, "zeroth_order", False):
        # bytes one training micro-batch saves for backward (exact; on a batch of the training shape,
        # the sampler's position restored so the run is unchanged)
        from ..sketch import saved_activation_bytes
        position = sampler.state_dict()
        xb, yb = (t[:cfg.batch_size].to(device) for t in sampler.next())
        sampler.load_state_dict(position)
        with torch.autocast(**autocast):
            saved_bytes = saved_activation_bytes(model, lambda: model(xb, yb)[1]).total
        del xb, yb
    rss_before = memory.current_rss_bytes()
    can_reset_peak = memory.reset_peak_rss()  # the training phase's own peak resident memory

    def run_eval() -> dict[str, Any]:
        val = dataset.val if cfg.eval_tokens is None else dataset.val[:cfg.eval_tokens + 1]
        loss, count = evaluate(model, val, cfg.eval_batch_size, cfg.seq_len, device, cfg.bf16, rank, world)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700)), "eval_tokens": count}

    def checkpoint() -> None:
        if not main_proc:
            return
        rng = {"cpu": torch.get_rng_state()}
        save_checkpoint(ckpt_path, {
            "format": 1, "config": cfg.to_dict(), "step": step, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "sampler": sampler.state_dict(),
            "rng": rng, "train_time": train_time, "tokens_seen": tokens_seen})

    bar = None
    if main_proc and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc=f"{cfg.preset} {cfg.model}", unit="step", dynamic_ncols=True)
    log_loss, log_n, opt_time, interrupted = 0.0, 0, 0.0, False
    stop_at = total if cfg.stop_after is None else min(total, step + cfg.stop_after)
    params = [p for p in model.parameters() if p.requires_grad]
    zeroth_order = getattr(opt, "zeroth_order", False)
    if zeroth_order and world > 1:
        raise ValueError(f"preset {cfg.preset!r} (forward-only) does not support data parallelism; run one process")
    call("on_start", model, opt, cfg)
    profile_step, step_peak = step + 1, None  # the second step of this invocation: the optimizer state exists
    with _StopFlag() as stop:
        while step < stop_at:
            t0 = time.perf_counter()
            profiling = cfg.profile_memory and step == profile_step
            with memory.TensorPeak() if profiling else contextlib.nullcontext() as peak:
                step_loss = torch.zeros((), device=device)
                batches = []
                for _ in range(cfg.grad_accum):
                    x, y = sampler.next()
                    if world > 1:
                        x, y = x[rank * cfg.batch_size:(rank + 1) * cfg.batch_size], y[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
                    batches.append((x.to(device), y.to(device)))
                grad_norm = None
                lr_used = float(opt.param_groups[0]["lr"])  # (a tensor in torchao's optimizers)
                if zeroth_order:  # two forward passes inside the optimizer, no backward
                    def closure() -> torch.Tensor:
                        total = torch.zeros((), device=device)
                        for xb, yb in batches:
                            with torch.autocast(**autocast):
                                total = total + model(xb, yb)[1].float()
                        return total / len(batches)
                    t1 = time.perf_counter()
                    step_loss = opt.step(closure)
                    t2 = time.perf_counter()
                else:
                    for micro, (x, y) in enumerate(batches):
                        last = micro == cfg.grad_accum - 1
                        if updater is not None:  # the last backward steps every parameter (and frees its grad)
                            sync = updater.accumulate(enabled=not last)
                        elif world > 1 and not last:
                            sync = ddp_model.no_sync()
                        else:
                            sync = contextlib.nullcontext()
                        with sync:
                            with torch.autocast(**autocast):
                                _, loss = ddp_model(x, y)
                            (loss / cfg.grad_accum).backward()
                        step_loss += loss.detach() / cfg.grad_accum
                    if updater is None:
                        call("after_backward", step, model, opt)
                        if cfg.clip > 0 and cfg.clip_mode == "global":
                            grad_norm = nn.utils.clip_grad_norm_(params, cfg.clip)
                        elif cfg.clip > 0:
                            norms = clip_grad_norm_per_parameter_(params, cfg.clip)
                            grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
                        t1 = time.perf_counter()
                        opt.step()
                        t2 = time.perf_counter()
                    else:  # the optimizer ran inside backward: its time is in the step time, not apart
                        grad_norm = updater.last_grad_norm
                        t1 = t2 = time.perf_counter()
                if sketched:
                    from .. import sketch as gs
                    gs.next_step(model)
                opt.zero_grad(set_to_none=True)
            if profiling:
                step_peak = peak.peak
            sched.step()
            step += 1
            dt = time.perf_counter() - t0
            train_time += dt
            opt_time += t2 - t1
            tokens_seen += cfg.tokens_per_step(world)
            if world > 1:  # the logged loss is the mean over every rank's micro-batches
                step_loss = step_loss.detach().clone()
                torch.distributed.all_reduce(step_loss)
                step_loss /= world
            log_loss += step_loss.item()
            log_n += 1
            record: dict[str, Any] | None = None
            if step % cfg.log_every == 0 or step == total:
                record = {"step": step, "tokens": tokens_seen, "loss": log_loss / log_n,
                          "lr": lr_used,
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          "tokens_per_s": tokens_seen / train_time, "step_time": dt, "train_time": train_time}
                log_loss, log_n = 0.0, 0
            if step % cfg.eval_every == 0 or step == total:
                record = {**(record or {"step": step, "tokens": tokens_seen, "train_time": train_time}), **run_eval()}
            if record is not None:
                history.append(record)
                if main_proc:
                    _append_metric(out / "metrics.jsonl", record)
            call("after_step", step, model, opt, record)
            if bar is not None:
                bar.update(1)
                losses = [h["loss"] for h in history[-3:] if "loss" in h]
                bar.set_postfix(loss=f"{losses[-1] if losses else step_loss.item():.3f}",
                                tok_s=f"{tokens_seen / train_time:.0f}", refresh=False)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < stop_at:
                checkpoint()
            if stop.requested:
                interrupted = True
                break
    if bar is not None:
        bar.close()
    train_peak = memory.peak_rss_since_reset() if can_reset_peak else None
    if updater is not None:
        updater.remove()
    checkpoint()
    summary = _summary(cfg, history, step, total, train_time, tokens_seen, opt, n_params, interrupted)
    summary["mean_opt_step_s"] = None if updater is not None else \
        opt_time / max(1, step - (int(ckpt["step"]) if ckpt else 0))
    summary.update(saved_activation_bytes=saved_bytes, step_peak_tensor_bytes=step_peak,
                   peak_rss_bytes=memory.peak_rss_bytes(),
                   rss_before_training_bytes=rss_before, train_peak_rss_bytes=train_peak)
    call("on_end", model, opt, summary)
    if main_proc:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.plot:
            plot_run(history, out / "loss.png", title=f"{cfg.preset} on {cfg.model}")
        if interrupted:
            print(f"stopped at step {step}/{total}; checkpoint written to {ckpt_path} (continue with --resume)")
    return summary


def _summary(cfg, history, step, total, train_time, tokens_seen, opt, n_params, interrupted) -> dict[str, Any]:
    evals = [h for h in history if "eval_loss" in h]
    last = evals[-1] if evals else {}
    logged = [h["loss"] for h in history if "loss" in h]
    return {
        "preset": cfg.preset, "model": cfg.model, "seed": cfg.seed, "lr": cfg.lr, "rank": cfg.rank,
        "steps": step, "total_steps": total, "tokens": tokens_seen, "finished": step >= total,
        "interrupted": interrupted, "final_eval_loss": last.get("eval_loss"), "final_eval_ppl": last.get("eval_ppl"),
        "final_train_loss": logged[-1] if logged else None,
        "train_time_s": train_time, "tokens_per_s": tokens_seen / train_time if train_time else None,
        "mean_step_s": train_time / step if step else None, "optimizer_state_bytes": optimizer_state_bytes(opt),
        "parameters": n_params,
    }


def _append_metric(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    os.replace(tmp, path)


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if rec.get("step", 0) <= upto:
                out.append(rec)
    return out


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
