"""Memory of training a whole LLaMA config: weights, gradients, optimizer states, saved activations.

``estimate(config, preset, rank, dtype, ...)`` builds :class:`grassopt.train.model.Llama` on the
``meta`` device (no memory, so ``7b`` is free), forms the optimizer's param groups exactly as
training would (:func:`grassopt.param_groups`, then :class:`grassopt.SubspaceAdamW` for the resolved
settings), and adds up weights, gradients and optimizer states (bases, moments, other) per
parameter, priced by :func:`grassopt.memory.param_state_bytes`, plus an analytical count of the
activations a forward pass saves for backward (:func:`activation_bytes`). Options: 8-bit states
(``state_dtype="int8"``), layer-wise updates (``layerwise=True``: only the largest gradient is alive
at once) and activation checkpointing (``checkpoint_activations=True``). ``grassopt memory`` is its
command line (:mod:`grassopt.train.memory_cli`).

It lives beside the model it describes: the library's own accounting (:mod:`grassopt.memory`)
knows nothing of this model.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..codecs import CODECS
from ..memory import CATEGORIES, DTYPES, INT8_BLOCK, STATE_DTYPES, _dtype, _size, _state_dtype, param_state_bytes
from ..optimizer import SubspaceAdamW
from ..qlinear import BLOCK as INT8_WEIGHT_BLOCK
from ..qlinear import weight_bytes as int8_weight_bytes
from ..presets import PRESETS, default_rank, param_groups
from ..targets import resolve_sketch_rank, select_targets
from .model import CONFIGS, Llama, LlamaConfig, config

__all__ = ["estimate", "activation_bytes", "load_config", "Estimate", "ParamMemory", "fits_line", "NOT_COUNTED",
           "DTYPES", "PARAM_DTYPES", "STATE_DTYPES", "INT8_BLOCK"]

#: ``--param-dtype``: a dtype of every weight (:data:`DTYPES`), or ``int8``: the weights of the targeted linear
#: layers as int8 codes with block scales (:mod:`grassopt.qlinear`), everything else (and every product) bf16
#: (``int8-fp32``: float32)
PARAM_DTYPES: dict[str, Any] = {**DTYPES, "int8": "bf16", "int8-fp32": "fp32"}


_HF_KEYS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
            "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers", "vocab_size": "vocab_size"}


def load_config(spec: Any, vocab_size: int | None = None):
    """A :class:`grassopt.train.model.LlamaConfig` from a config name (``nano`` ... ``7b``), a
    ``LlamaConfig``, a dict, or the path of a Hugging Face-style ``config.json`` (LLaMA keys:
    ``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_hidden_layers``,
    ``vocab_size``; optional ``num_key_value_heads``, ``tie_word_embeddings``,
    ``max_position_embeddings``, ``rms_norm_eps``, ``rope_theta``)."""
    if isinstance(spec, LlamaConfig):
        cfg = spec
    elif isinstance(spec, str) and spec in CONFIGS:
        return config(spec, vocab_size=vocab_size)
    elif isinstance(spec, dict) or (isinstance(spec, (str, Path)) and Path(spec).is_file()):
        d = spec if isinstance(spec, dict) else json.loads(Path(spec).read_text())
        missing = [k for k in _HF_KEYS if k not in d]
        if missing:
            raise ValueError(f"{spec if not isinstance(spec, dict) else 'config'}: not a LLaMA-style config, "
                             f"missing {missing}; the calculator models LLaMA-style decoders")
        kw: dict[str, Any] = {ours: int(d[theirs]) for theirs, ours in _HF_KEYS.items()}
        if d.get("num_key_value_heads") not in (None, d["num_attention_heads"]):
            kw["num_kv_heads"] = int(d["num_key_value_heads"])
        kw["tie_embeddings"] = bool(d.get("tie_word_embeddings", False))
        if "max_position_embeddings" in d:
            kw["max_seq_len"] = int(d["max_position_embeddings"])
        if "rms_norm_eps" in d:
            kw["rms_eps"] = float(d["rms_norm_eps"])
        if isinstance(d.get("rope_theta"), (int, float)):
            kw["rope_theta"] = float(d["rope_theta"])
        cfg = LlamaConfig(**kw)
    else:
        raise ValueError(f"unknown model config {spec!r}: give one of {', '.join(CONFIGS)} or the path of a "
                         "Hugging Face-style config.json")
    if vocab_size is not None:
        from dataclasses import replace
        cfg = replace(cfg, vocab_size=vocab_size)
    return cfg


class _ShapesOnly(SubspaceAdamW):
    """The optimizer's groups resolved on a meta model: never stepped, only counted."""

    _shapes_only = True


def _meta_model(cfg):
    with torch.device("meta"):
        return Llama(cfg)


# ---------------------------------------------------------------------------------------- activations
#: which linear layers read the same input tensor; ``o_proj``'s input (the attention output) is also
#: saved by the attention kernel, so sketching ``o_proj`` frees nothing.
_INPUTS = (("qkv", ("q_proj", "k_proj", "v_proj"), "h", True),
           ("o", ("o_proj",), "h", False),
           ("gate_up", ("gate_proj", "up_proj"), "h", True),
           ("down", ("down_proj",), "i", True))


def _sketch_rank(spec: int | float, n: int) -> int:
    """The sketch rank of a layer with ``n`` inputs (:func:`grassopt.targets.resolve_sketch_rank`)."""
    return resolve_sketch_rank(spec, "sketch_rank", _Inputs(n))


@dataclass(frozen=True)
class _Inputs:
    in_features: int


def activation_bytes(cfg, batch_size: int, seq_len: int, dtype: str | torch.dtype = "fp32",
                     mode: str | None = None, sketch_rank: int | float | None = None,
                     covered: set[str] | None = None, checkpoint: bool = False) -> dict[str, int]:
    """Bytes the forward pass of :class:`grassopt.train.model.Llama` saves for its backward pass.

    An exact count of what autograd keeps (distinct storages) for this implementation, with the
    fused attention kernel of ``scaled_dot_product_attention`` (flash or memory-efficient: ``q``,
    ``k``, ``v``, the output and a float32 log-sum-exp per head; no ``T x T`` matrix) and weights in
    ``dtype`` (fp32 or a 16-bit type, not autocast). Per token and block, with ``a`` bytes per element:
    two RMSNorms (a float32 copy of the input, the float32 ``rsqrt``, the normalised output: ``4h + 4
    + a h`` each), the q/k/v input, q and k after rotary, v, the attention output (``5 a h``), the
    log-sum-exp (``4 H``), the gate/up input (``a h``), and ``gate``, ``silu(gate)``, ``up`` and their
    product (``4 a i``). Then the final norm, the ``lm_head`` input, the float32 log-softmax
    (``4 V``), the token ids and targets (int64), and the rotary tables (``8 T head_dim``).

    ``mode="estimator"`` or ``"rso"`` (``grassopt.sketch``): each covered linear layer keeps only ``x P``
    (``tokens x r``, in ``dtype``); layers reading the same input share one ``x P``; an input is
    freed when every layer reading it is covered and nothing else saves it (the attention output
    is saved by the attention kernel anyway). With ``"rso"`` and 16-bit weights each covered layer
    also saves the 16-bit cast of its float32 ``B`` (``m x r``, independent of the batch).
    ``covered``: names of covered projections (default:
    all seven). Returns bytes by block (``layers.N``), ``norm``, ``lm_head``, ``loss`` and ``inputs``.

    ``checkpoint=True`` (``LlamaConfig(checkpoint_activations=True)``): each block keeps only its input
    (``layers.N``: ``a h`` per token; the rotary tables it also keeps are in ``inputs`` as before), and
    ``recompute`` holds ONE block's full activations, which exist again while backward goes through
    that block (one block at a time). The forward pass ends with the block inputs, the head and the
    inputs saved (what :func:`grassopt.sketch.saved_activation_bytes` measures); the sum with
    ``recompute`` is an upper bound of the activations alive at once (the head's are freed before the
    first block is recomputed, but the gradient of the last block's output is alive then).
    """
    a = _size(dtype)
    h, i, H, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.vocab_size
    N = batch_size * seq_len
    norm = 4 * h + 4 + a * h
    block = 2 * norm + 4 * a * h + 4 * H + 3 * a * i  # + the inputs of the linear layers (below)
    inputs = {"qkv": a * h, "o": 0, "gate_up": a * h, "down": a * i}  # per token, when not sketched
    if mode is not None:
        if mode not in ("estimator", "rso"):
            raise ValueError(f"unknown activation mode {mode!r}; choose 'estimator' or 'rso' (or None)")
        if sketch_rank is None:
            raise ValueError(f"mode={mode!r} needs a sketch_rank (an int, or a fraction of in_features)")
        covered = {n for _, names, _, _ in _INPUTS for n in names} if covered is None else set(covered)
        for key, names, side, freeable in _INPUTS:
            n = h if side == "h" else i
            ours = [nm for nm in names if nm in covered]
            if not ours:
                continue
            r = _sketch_rank(sketch_rank, n)
            extra = a * r  # one shared x P for the layers of this input
            if freeable and len(ours) == len(names):
                inputs[key] = 0
            inputs[key] += extra
    block += inputs["qkv"] + inputs["o"] + inputs["gate_up"] + inputs["down"]
    fixed = 0  # per block, independent of the batch
    if mode == "rso" and a != 4:  # B is float32 (master); the 16-bit cast of it is saved for backward
        kv = cfg.kv_heads * cfg.head_dim
        outs = {"q_proj": h, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": i, "up_proj": i, "down_proj": h}
        # (mode is set: sketch_rank and covered were checked and set above)
        fixed = sum(a * m * _sketch_rank(sketch_rank, i if nm == "down_proj" else h)  # type: ignore[arg-type]
                    for nm, m in outs.items() if nm in covered)  # type: ignore[operator]
    if checkpoint:
        out = {f"layers.{j}": a * h * N for j in range(cfg.num_layers)}
        out["recompute"] = block * N + fixed
    else:
        out = {f"layers.{j}": block * N + fixed for j in range(cfg.num_layers)}
    out["norm"] = norm * N
    out["lm_head"] = a * h * N
    out["loss"] = 4 * V * N + 4  # float32 log-softmax; nll's total weight
    out["inputs"] = 2 * 8 * N + 2 * 4 * seq_len * cfg.head_dim  # ids and targets (int64); cos, sin
    return out


# ---------------------------------------------------------------------------------------- estimate
@dataclass
class ParamMemory:
    """Bytes of one parameter (or an RSO ``B``): weight, gradient, optimizer state by category."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "projected", "plain", "rso" (an RSO-covered weight: frozen W plus B)
    rank: int | None
    weights: int
    gradients: int
    bases: int
    moments: int
    other: int

    @property
    def states(self) -> int:
        return self.bases + self.moments + self.other


_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _layer_of(name: str) -> str:
    m = _BLOCK.match(name)
    return m.group(1) if m else name.split(".")[0]


@dataclass
class Estimate:
    """The result of :func:`estimate`; ``totals()``, ``per_layer()``, ``to_dict()``, ``table()``."""

    model: str
    preset: str
    rank: Any
    dtype: str
    state_dtype: str
    batch_size: int
    seq_len: int
    mode: str | None
    sketch_rank: Any
    params: list[ParamMemory]
    activations: dict[str, int]
    sketch_matrices: int = 0
    notes: list[str] = field(default_factory=list)
    layerwise: bool = False
    checkpoint_activations: bool = False

    def largest_gradient(self) -> ParamMemory | None:
        """The parameter with the largest gradient (what layer-wise updates hold at their worst moment)."""
        return max(self.params, key=lambda p: p.gradients, default=None)

    def totals(self) -> dict[str, int]:
        """Bytes by category. ``gradients``: all of them, or with ``layerwise`` only the largest one
        (each parameter is stepped and its gradient freed as soon as it is complete)."""
        t = {k: sum(getattr(p, k) for p in self.params) for k in ("weights", "gradients", *CATEGORIES)}
        if self.layerwise:
            t["gradients"] = max((p.gradients for p in self.params), default=0)
        t["states"] = t["bases"] + t["moments"] + t["other"]
        t["activations"] = sum(self.activations.values())
        t["sketch_matrices"] = self.sketch_matrices
        t["total"] = t["weights"] + t["gradients"] + t["states"] + t["activations"] + t["sketch_matrices"]
        return t

    def per_rank(self, world_size: int, owners: bool = True) -> dict[str, int]:
        """Bytes on the fullest of ``world_size`` ranks of an FSDP2 run of this configuration (``grassopt train
        --fsdp``: ``fully_shard`` on every block and at the root, each parameter split by rows): weights,
        gradients and the plain parameters' state split ``world_size`` ways (rounded up per parameter); the
        projected matrices' state (bases, moments) held by each matrix's owner rank
        (:func:`grassopt.distributed.assign_owners`, ``FSDPSubspaceAdamW(owners=True)``), or, with
        ``owners=False``, whole on every rank; the activations of one rank's micro-batch; and ``transient``,
        what is gathered at the worst moment: the root's parameters and two blocks unsharded (FSDP2's default
        prefetch), or the matrix a rank steps, whole, with its gradient (the largest of its owned ones, which
        it gathers one at a time; without owners, the largest one), whichever is larger (an upper bound from
        the shapes, not a measurement)."""
        if self.layerwise or self.mode is not None:
            raise ValueError("FSDP is priced without layer-wise updates and activation-saving layers: leave out "
                             "--layerwise and --activations")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size={world_size!r} must be an integer >= 1")

        from ..distributed import assign_owners
        projected = [p for p in self.params if p.kind == "projected"]
        owner = dict(zip((p.name for p in projected), assign_owners(
            [float(p.shape[0] * p.shape[1] * min(p.shape)) for p in projected], world_size if owners else 1)))
        mine = [{p.name for p in projected if owner[p.name] == r} for r in range(world_size if owners else 1)]
        busiest = max(mine, key=lambda names: sum(p.bases + p.moments + p.other for p in projected if p.name in names))

        def share(p: ParamMemory, k: str) -> int:
            b = getattr(p, k)
            if k in CATEGORIES and p.kind == "projected":
                return b if p.name in busiest else 0
            return -(-b // world_size)

        t = {k: sum(share(p, k) for p in self.params) for k in ("weights", "gradients", *CATEGORIES)}
        t["states"] = t["bases"] + t["moments"] + t["other"]
        t["activations"] = sum(self.activations.values())
        unit: dict[str, int] = {}
        for p in self.params:
            key = _layer_of(p.name) if _BLOCK.match(p.name) else "root"
            unit[key] = unit.get(key, 0) + p.weights
        blocks = [v for k, v in unit.items() if k != "root"]
        gathered = unit.get("root", 0) + 2 * max(blocks, default=0)
        stepped = max((p.weights + p.gradients for p in projected), default=0)
        t["transient"] = 0 if world_size == 1 else max(gathered, stepped)
        t["sketch_matrices"] = self.sketch_matrices
        t["total"] = sum(t[k] for k in ("weights", "gradients", "states", "activations", "transient", "sketch_matrices"))
        return t

    def per_layer(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        zero = {k: 0 for k in ("weights", "gradients", *CATEGORIES, "activations")}
        for p in self.params:
            row = out.setdefault(_layer_of(p.name), dict(zero))
            for k in ("weights", "gradients", *CATEGORIES):
                row[k] += getattr(p, k)
        for name, b in self.activations.items():
            out.setdefault(name, dict(zero))["activations"] += b
        return out

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("model", "preset", "rank", "dtype", "state_dtype", "batch_size",
                                             "seq_len", "mode", "sketch_rank", "layerwise",
                                             "checkpoint_activations", "notes")}
        d["totals"] = self.totals()
        d["projected_params"] = sum(1 for p in self.params if p.kind != "plain")
        if per_layer:
            d["per_layer"] = self.per_layer()
            d["params"] = [asdict(p) for p in self.params]
        return d

    def table(self, per_layer: bool = False, unit: str = "auto", budget: int | None = None) -> str:
        """A plain-text table (bytes and a human unit); with ``budget`` (bytes), whether the total fits."""
        t = self.totals()
        grad_label = "gradients (largest one)" if self.layerwise else "gradients"
        act_label = "saved activations (checkpointed)" if self.checkpoint_activations else "saved activations"
        rows = [("weights", t["weights"]), (grad_label, t["gradients"]),
                ("optimizer states", t["states"]), ("  bases", t["bases"]), ("  moments", t["moments"]),
                ("  other", t["other"]), (act_label, t["activations"])]
        if self.checkpoint_activations:
            rec = self.activations.get("recompute", 0)
            rows += [("  block inputs, head, ids", t["activations"] - rec), ("  one block recomputed", rec)]
        if self.mode is not None:
            rows.append(("sketch matrices P", t["sketch_matrices"]))
        rows.append(("total", t["total"]))
        head = (f"{self.model}, preset {self.preset}, rank {self.rank}, weights {self.dtype}, states "
                f"{self.state_dtype}, batch {self.batch_size} x {self.seq_len} tokens"
                + (", layer-wise updates" if self.layerwise else "")
                + (", activation checkpointing" if self.checkpoint_activations else "")
                + (f", activations {self.mode} (sketch rank {self.sketch_rank})" if self.mode else ""))
        width = max(len(r[0]) for r in rows)
        lines = [head, "", f"{'':<{width}}  {'bytes':>16}  {'':>10}"]
        lines += [f"{name:<{width}}  {b:>16,}  {_human(b, unit):>10}" for name, b in rows]
        if budget is not None:
            lines += ["", fits_line(t["total"], budget, unit)]
        if per_layer:
            cols = ("weights", "gradients", *CATEGORIES, "activations")
            layers = self.per_layer()
            w = max(len(n) for n in layers) if layers else 5
            lines += ["", f"{'layer':<{w}}  " + "  ".join(f"{c:>12}" for c in cols)]
            for name, row in layers.items():
                lines.append(f"{name:<{w}}  " + "  ".join(f"{_human(row[c], unit):>12}" for c in cols))
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


#: what no estimate here counts (said beside every "fits" verdict)
NOT_COUNTED = ("not counted: the CUDA context, the allocator's caches and fragmentation, the optimizer step's "
               "temporaries")


def fits_line(total: int, budget: int, unit: str = "auto") -> str:
    """``fits in 24.00 GiB: yes (1.90 GiB to spare)`` or ``... no (3.10 GiB over)``."""
    verdict = (f"yes ({_human(budget - total, unit)} to spare)" if total <= budget
               else f"no ({_human(total - budget, unit)} over)")
    return f"fits in {_human(budget, unit)}: {verdict}; {NOT_COUNTED}"


def _human(b: int, unit: str = "auto") -> str:
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    if unit == "auto":
        unit = next((u for u in ("GiB", "MiB", "KiB") if b >= units[u]), "B")
    return f"{b / units[unit]:.2f} {unit}" if unit != "B" else f"{b} B"


def _sketched(model, targets: Any, mode: str | None, sketch_rank: Any,
              wsize: int) -> tuple[dict[int, int], set[str], int]:
    """With an activation ``mode``: the covered weights (RSO: ``id(weight) -> sketch rank``), the
    short names of the covered layers and the bytes of the sketch matrices ``P``."""
    covered: dict[int, int] = {}
    names_covered: set[str] = set()
    sketch_matrices = 0
    if mode is None:
        return covered, names_covered, sketch_matrices
    if mode not in ("estimator", "rso"):
        raise ValueError(f"unknown activation mode {mode!r}; choose 'estimator' or 'rso' (or None)")
    if sketch_rank is None:
        raise ValueError(f"mode={mode!r} needs a sketch_rank (an int, or a fraction of in_features)")
    seen_inputs: set[tuple[str, int]] = set()
    for name, mod in select_targets(model, targets):
        short = name.split(".")[-1]
        names_covered.add(short)
        r = resolve_sketch_rank(sketch_rank, name, mod)
        key = next((k for k, names, _, _ in _INPUTS if short in names), short)
        if (f"{_layer_of(name)}.{key}", r) not in seen_inputs:
            seen_inputs.add((f"{_layer_of(name)}.{key}", r))
            # P in float32 (grassopt.sketch's master dtype), plus its cast for 16-bit weights
            sketch_matrices += (4 + (wsize if wsize != 4 else 0)) * mod.in_features * r
        if mode == "rso":
            covered[id(mod.weight)] = r
    return covered, names_covered, sketch_matrices


def _param_rows(model, opt: SubspaceAdamW, covered: dict[int, int], quantized: set[int], wsize: int,
                sdtype: Any, own_codec: dict[int, str]) -> list[ParamMemory]:
    """One :class:`ParamMemory` per parameter of the meta ``model``: an RSO-covered weight (``covered``: its
    sketch rank), an int8 weight (``quantized``: its codes and block scales and its parameter's one element),
    or a weight of ``wsize`` bytes an element; the state of its group in ``opt``, priced in ``sdtype`` (or in its
    group's own codec, ``own_codec``: plain_state_dtype)."""
    params: list[ParamMemory] = []
    for name, p in model.named_parameters():
        numel = p.numel()
        if id(p) in covered:
            r = covered[id(p)]
            m = p.shape[0]
            params.append(ParamMemory(name, tuple(p.shape), "rso", r, weights=numel * wsize + m * r * 4,
                                      gradients=m * r * 4, bases=0, moments=2 * m * r * 4, other=0))
            continue
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        sb = param_state_bytes(p.shape, group, own_codec.get(id(p), sdtype))
        weights = int8_weight_bytes(p.shape) + wsize if id(p) in quantized else numel * wsize
        params.append(ParamMemory(name, tuple(p.shape), "projected" if "rank" in group else "plain",
                                  group.get("rank"), weights=weights, gradients=numel * wsize,
                                  bases=sb["bases"], moments=sb["moments"], other=sb["other"]))
    return params


def _own_codecs(groups: list[dict[str, Any]]) -> dict[int, str]:
    """{id(parameter): codec} of the groups that name their own ``state_dtype`` (``plain_state_dtype``); a
    codec without ``M`` is priced as it runs, so its group gets ``betas[0] = 0`` (in place)."""
    for g in groups:
        if "state_dtype" in g and CODECS[g["state_dtype"]].group_error({**g, "betas": (0.9, 0.999)}):
            g["betas"] = (0.0, 0.999)
    return {id(q): g["state_dtype"] for g in groups if "state_dtype" in g
            for q in (x[1] if isinstance(x, tuple) else x for x in g["params"])}


def estimate(config: Any, preset: str = "adamw", rank: int | str | None = None, dtype: str | torch.dtype = "fp32",
             *, batch_size: int = 1, seq_len: int | None = None, mode: str | None = None,
             sketch_rank: int | float | None = None, targets: Any = "all-linear",
             state_dtype: str | torch.dtype = "fp32", vocab_size: int | None = None,
             layerwise: bool = False, checkpoint_activations: bool = False,
             **overrides: Any) -> Estimate:
    """Memory of training ``config`` with ``preset`` (see the module docstring).

    Args:
        config: a config name (``nano`` ... ``7b``), a ``LlamaConfig`` or a ``config.json`` path.
        preset, rank, targets, overrides: as for :func:`grassopt.param_groups` (``rank=None``: the
            preset's default; ``"d/4"``: a fraction of each matrix's short side).
        dtype: the weights' (and gradients', and activations') dtype (``grassopt memory --param-dtype``);
            ``"int8"``: the weights of the ``targets`` linear layers as int8 codes plus a float32 scale per
            block (:func:`grassopt.qlinear.weight_bytes`), the rest (and gradients, activations) bf16;
            ``"int8-fp32"``: the same with float32 around them.
        state_dtype: the optimizer state's dtype, priced by :func:`param_state_bytes`. ``"fp32"``
            (the default): what :class:`grassopt.SubspaceAdamW` allocates by default; ``"int8"``: its
            8-bit moments (any codec of :data:`grassopt.codecs.CODECS` is priced as it lays its moments
            out; ``Q`` and the other state stay float32); ``"bf16"`` (a dtype that is no codec's
            name): every state element in 2 bytes, the convention of papers' "BF16" tables.
        layerwise: layer-wise updates (:mod:`grassopt.layerwise`): the gradients total is the largest
            single gradient, the only one alive at once (with one micro-batch per step).
        checkpoint_activations: activation checkpointing per block (see :func:`activation_bytes`).
        batch_size, seq_len: the shape of one micro-batch, for the saved activations
            (``seq_len`` defaults to the config's ``max_seq_len``).
        mode: ``None``, ``"estimator"`` or ``"rso"`` (activation-saving layers of ``grassopt.sketch``,
            on the same ``targets``) with ``sketch_rank`` (an int, or a fraction of each layer's
            ``in_features``). With ``"rso"`` the covered weights are frozen (no gradient, no
            optimizer state) and each gets ``B`` (``m x r``, float32 like its gradient) and
            float32 Adam moments (``2 m r``); the ``preset`` then applies to the other parameters
            only through AdamW (RSO trains them with AdamW). Sketch matrices ``P`` (float32, one per
            group of layers reading the same input) are reported apart.
    """
    cfg = load_config(config, vocab_size)
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    int8 = dtype in ("int8", "int8-fp32")  # int8 linear weights (grassopt.qlinear), bf16 or fp32 around them
    if int8 and mode is not None:
        raise ValueError(f"dtype={dtype!r} weights and mode={mode!r}: the sketched layers read full-precision weights")
    wlabel = ""
    if isinstance(dtype, str) and int8:
        dtype = PARAM_DTYPES[dtype]
        wlabel = f"int8+{_dtype(dtype)}".replace("torch.", "")
    wsize, sdtype = _size(dtype), _state_dtype(state_dtype)
    if isinstance(sdtype, str) and sdtype != "float32" and mode == "rso":
        raise ValueError(f"state_dtype={sdtype!r} is SubspaceAdamW's; RSO (mode='rso') brings its own optimizer, "
                         "with float32 state")
    model = _meta_model(cfg).to(_dtype(dtype))
    notes: list[str] = []
    covered, names_covered, sketch_matrices = _sketched(model, targets, mode, sketch_rank, wsize)
    # the optimizer's groups, resolved exactly as training resolves them
    if mode == "rso":
        plain = [(n, p) for n, p in model.named_parameters() if id(p) not in covered]
        groups: list[dict[str, Any]] = [{"params": plain}]
        label_rank: int | float | str | None = sketch_rank
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            groups = param_groups(model, preset, rank, targets=targets, **overrides)
        notes += [str(w.message) for w in caught]
        label_rank = None if PRESETS[preset] is None else (default_rank(preset) if rank is None else rank)
    own_codec = _own_codecs(groups)
    quantized = {id(mod.weight) for _, mod in select_targets(model, targets)} if int8 else set()
    params = _param_rows(model, _ShapesOnly(groups), covered, quantized, wsize, sdtype, own_codec)
    acts = activation_bytes(cfg, batch_size, seq_len, dtype, mode, sketch_rank,
                            covered=names_covered if mode else None, checkpoint=checkpoint_activations)
    if layerwise:
        big = max(params, key=lambda q: q.gradients)
        notes.append(f"layer-wise: gradients = the largest one ({big.name}, {big.gradients:,} bytes; all of them: "
                     f"{sum(q.gradients for q in params):,}); with one micro-batch per step")
    if mode == "rso":
        notes.append("rso: the covered weights are frozen inside an outer iteration; B and its Adam state are "
                     "counted on the covered rows, P under 'sketch matrices P'")
    if int8:
        notes.append(f"int8 weights: {len(quantized)} linear layers as int8 codes with a float32 scale per "
                     f"{INT8_WEIGHT_BLOCK} elements (grassopt.qlinear); the other parameters, the gradients and the "
                     f"activations {wlabel.partition('+')[2]}")
    label = Path(config).name if isinstance(config, Path) else config if isinstance(config, str) else "config"
    return Estimate(model=label, preset="rso" if mode == "rso" else preset,
                    rank=label_rank, dtype=wlabel if int8 else str(_dtype(dtype)).replace("torch.", ""),
                    state_dtype=str(sdtype).replace("torch.", ""), batch_size=batch_size,
                    seq_len=seq_len, mode=mode, sketch_rank=sketch_rank, params=params, activations=acts,
                    sketch_matrices=sketch_matrices, notes=notes, layerwise=layerwise,
                    checkpoint_activations=checkpoint_activations)
