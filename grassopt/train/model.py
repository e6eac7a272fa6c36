"""A LLaMA-style decoder-only transformer in plain PyTorch.

Each of the ``num_layers`` blocks is::

    h = x + self_attn(input_layernorm(x))          # causal attention with rotary positions
    y = h + mlp(post_attention_layernorm(h))       # SwiGLU: down(silu(gate(h)) * up(h))

followed by a final RMSNorm and the ``lm_head`` projection to the vocabulary. Linear layers
have no biases. Module names follow Hugging Face's LLaMA (``layers.0.self_attn.q_proj``,
``layers.0.mlp.gate_proj``, ...), so target selection by name or regex treats both alike.

Rotary embeddings use the "rotate half" layout of Hugging Face LLaMA (dimension ``i`` is
paired with ``i + head_dim/2``). Their tables are computed in each forward pass on the
input's device, so the module owns no buffers and can be built on the ``meta`` device
(``with torch.device("meta"): Llama(config("7b"))``) to count parameters without memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CONFIGS", "Llama", "LlamaConfig", "config", "rotary_tables", "apply_rotary"]


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a :class:`Llama` model.

    ``num_kv_heads`` enables grouped-query attention (``None`` means ``num_heads``).
    ``tie_embeddings`` shares the input embedding with ``lm_head``.
    ``lean_activations`` makes RMSNorm and SwiGLU save less for backward: RMSNorm keeps only its
    input and the per-token ``rsqrt`` (not the normalised tensor), SwiGLU only ``gate`` and ``up``
    (not ``silu(gate)``); both recompute the rest in backward. The forward pass is bit-identical;
    gradients agree to float rounding. Per token and block this saves ``2 d + f`` floats, which is
    most of what sketching (``grassopt.sketch``) cannot reach.
    ``checkpoint_activations`` checkpoints each decoder block (``torch.utils.checkpoint``, non-reentrant):
    in training mode with autograd on, a block saves only its input for backward and recomputes its
    own activations when backward reaches it. Losses and gradients are bit-identical; the forward
    pass of every block runs twice.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    max_seq_len: int = 1024
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    num_kv_heads: int | None = None
    lean_activations: bool = False
    checkpoint_activations: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.kv_heads}."
            )

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``num_heads`` unless grouped-query attention is on)."""
        return self.num_kv_heads or self.num_heads


# name: (vocab_size, hidden_size, intermediate_size, num_heads, num_layers). The small configs
# are meant to take the tokenizer's vocabulary (pass vocab_size=...); the GaLore protocol
# configs (the LLaMA shapes of the GaLore paper) default to LLaMA's 32000.
_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "nano": (8192, 64, 172, 2, 2),
    "tiny": (8192, 256, 688, 4, 4),
    "small": (8192, 384, 1024, 6, 6),
    "60m": (32000, 512, 1376, 8, 8),
    "130m": (32000, 768, 2048, 12, 12),
    "350m": (32000, 1024, 2736, 16, 24),
    "1b": (32000, 2048, 5461, 32, 24),
    "7b": (32000, 4096, 11008, 32, 32),
}
CONFIGS: dict[str, LlamaConfig] = {name: LlamaConfig(*shape) for name, shape in _SHAPES.items()}
CONFIGS["7b"] = replace(CONFIGS["7b"], max_seq_len=2048)
# the larger LLaMA shapes, for grassopt memory (13B: LLaMA-1; 70B: LLaMA-2, grouped-query attention, 8 KV heads)
CONFIGS["13b"] = LlamaConfig(32000, 5120, 13824, 40, 40, max_seq_len=2048)
CONFIGS["70b"] = LlamaConfig(32000, 8192, 28672, 64, 80, max_seq_len=4096, num_kv_heads=8)


def config(name: str, vocab_size: int | None = None, **overrides: Any) -> LlamaConfig:
    """The named config, with ``vocab_size`` and any other field overridden.

    Raises ValueError for an unknown name, listing the known ones.
    """
    if name not in CONFIGS:
        raise ValueError(f"Unknown model config {name!r}; known configs: {', '.join(CONFIGS)}.")
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return replace(CONFIGS[name], **overrides)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision dtypes, else ``dtype`` itself (float32 or float64)."""
    return torch.promote_types(dtype, torch.float32)


def _rms_normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * r, r)`` in the compute dtype, ``r = rsqrt(mean(x^2) + eps)`` over the last dim."""
    xf = x.to(_compute_dtype(x.dtype))
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * r, r


class _LeanRMSNorm(torch.autograd.Function):
    """``weight * (x * r)``, saving only ``x`` and ``r`` (one float per token) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xn, r = _rms_normalise(x, eps)
        ctx.save_for_backward(x, weight, r)
        return weight * xn.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        xn = x.to(r.dtype) * r
        g = grad.to(r.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * xn.to(x.dtype).to(r.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        gxn = g * weight.to(r.dtype)  # d loss / d (x r)
        # d(x r)/dx = r (I - xn xn^T / d): the gradient through r is a projection
        grad_x = r * (gxn - xn * (gxn * xn).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned scale, computed in at least float32.

    ``lean=True`` saves only the input and the per-token ``rsqrt`` for backward (see
    :class:`LlamaConfig`); the output is the same either way.
    """

    def __init__(self, dim: int, eps: float = 1e-6, lean: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.lean = lean
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and torch.is_grad_enabled():
            return _LeanRMSNorm.apply(x, self.weight, self.eps)
        xn, _ = _rms_normalise(x, self.eps)
        return self.weight * xn.to(x.dtype)


class _LeanSwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, saving only ``gate`` and ``up``; ``silu`` is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        cd = _compute_dtype(gate.dtype)
        gf, g = gate.to(cd), grad.to(cd)
        sig = torch.sigmoid(gf)
        grad_up = (g * (gf * sig)).to(up.dtype) if ctx.needs_input_grad[1] else None
        # d silu(x)/dx = s (1 + x (1 - s)), s = sigmoid(x)
        grad_gate = (g * up.to(cd) * sig * (1 + gf * (1 - sig))).to(gate.dtype) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def rotary_tables(
    seq_len: int,
    head_dim: int,
    theta: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` tables of shape ``(seq_len, head_dim)`` for positions 0..seq_len-1.

    Frequency ``j`` (of ``head_dim/2``) is ``theta**(-2j/head_dim)``; each is repeated for both
    halves of the head, matching :func:`apply_rotary`'s "rotate half" pairing. ``dtype`` should
    be float32 (or float64 for float64 models), never a 16-bit type.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=dtype), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(..., seq, head_dim)``: pair ``i`` with ``i + head_dim/2``.

    Computed in the tables' precision, returned in ``x``'s dtype.
    """
    xf = x.to(cos.dtype)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary position embeddings."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        d, kv_dim = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_heads != self.num_heads:  # grouped-query attention
            repeat = self.num_heads // self.kv_heads
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.lean = cfg.lean_activations
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.lean and torch.is_grad_enabled():
            return self.down_proj(_LeanSwiGLU.apply(gate, up))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual connection.

    With ``checkpoint_activations`` (see :class:`LlamaConfig`; the attribute can also be switched on a
    built model) the block runs under ``torch.utils.checkpoint`` in training mode with autograd on:
    only its inputs are kept for backward, and its forward pass is run again when backward needs it.
    The recomputation reproduces the forward exactly: it has no randomness of its own (the RNG state
    is restored anyway), and sketched layers (``grassopt.sketch``) draw ``P`` from their step counter,
    which advances only between optimizer steps, never between a forward pass and its backward.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.checkpoint_activations = cfg.checkpoint_activations
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.lean_activations)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.lean_activations)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            # called from inside the block's own forward, so what the checkpoint keeps (the inputs)
            # is attributed to this block by grassopt.sketch.saved_activation_bytes
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class Llama(nn.Module):
    """LLaMA-style language model: ``forward(idx, targets) -> (logits, loss)``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.lean_activations)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """LLaMA/GPT-2 init: N(0, std) weights, residual projections scaled by 1/sqrt(2L)."""
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (shared tensors counted once); optionally without the embedding."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, T, vocab)`` for token ids ``idx`` ``(B, T)``, and the loss if ``targets``.

        The loss is the float32 cross-entropy of ``targets`` (``(B, T)``, ``-100`` ignored),
        averaged over tokens (``reduction="mean"``) or summed (``"sum"``, for exact
        evaluation over many batches).
        """
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(
                f"Sequence length {T} exceeds max_seq_len={self.config.max_seq_len}; raise "
                "max_seq_len in the config."
            )
        cos, sin = rotary_tables(
            T,
            self.config.head_dim,
            self.config.rope_theta,
            device=idx.device,
            dtype=_compute_dtype(self.embed_tokens.weight.dtype),
        )
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=-100,
                reduction=reduction,
            )
        return logits, loss
