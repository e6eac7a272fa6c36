"""Tests of grassopt.train.model: shapes, causality, a naive reference, init, training."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grassopt.train.model import CONFIGS, Llama, LlamaConfig, apply_rotary, config, rotary_tables

@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread is as fast, and immune to oversubscription (with two
    threads on two busy cores, OpenMP spin-waiting made a 1 s test take 40 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2)


def make(cfg: LlamaConfig = TINY, seed: int = 0, dtype: torch.dtype = torch.float32) -> Llama:
    torch.manual_seed(seed)
    return Llama(cfg).to(dtype)


def random_ids(cfg: LlamaConfig, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(cfg.vocab_size, (batch, seq), generator=g)


# --------------------------------------------------------------------------------------
# An independent float64 reference: explicit mask, explicit rotation matrices.
# --------------------------------------------------------------------------------------


def rotation_matrices(seq: int, head_dim: int, theta: float) -> torch.Tensor:
    """(seq, head_dim, head_dim) block rotations pairing coordinate i with i + head_dim/2."""
    half = head_dim // 2
    mats = torch.zeros(seq, head_dim, head_dim, dtype=torch.float64)
    for pos in range(seq):
        for i in range(half):
            angle = pos * theta ** (-2.0 * i / head_dim)
            c, s = math.cos(angle), math.sin(angle)
            mats[pos, i, i], mats[pos, i, i + half] = c, -s
            mats[pos, i + half, i], mats[pos, i + half, i + half] = s, c
    return mats


def reference_logits(model: Llama, idx: torch.Tensor) -> torch.Tensor:
    """Naive float64 forward pass built from the model's weights."""
    cfg = model.config
    w = {k: v.detach().double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    H, KV, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    rot = rotation_matrices(T, D, cfg.rope_theta)
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x**2).mean(-1, keepdim=True) + cfg.rms_eps) * weight

    x = w["embed_tokens.weight"][idx]
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, D)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, KV, D)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, KV, D)
        q = torch.einsum("tij,bthj->bthi", rot, q)
        k = torch.einsum("tij,bthj->bthi", rot, k)
        out = torch.zeros(B, T, H, D, dtype=torch.float64)
        for head in range(H):
            kv = head // (H // KV)
            scores = q[:, :, head] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D) + mask
            out[:, :, head] = torch.softmax(scores, dim=-1) @ v[:, :, kv]
        x = x + out.reshape(B, T, H * D) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    head_weight = w["embed_tokens.weight"] if cfg.tie_embeddings else w["lm_head.weight"]
    return rms(x, w["norm.weight"]) @ head_weight.T


@pytest.mark.parametrize(
    "cfg",
    [TINY, LlamaConfig(97, 32, 48, num_heads=4, num_layers=2, num_kv_heads=2, tie_embeddings=True)],
    ids=["mha", "gqa-tied"],
)
def test_matches_naive_float64_reference(cfg: LlamaConfig) -> None:
    model = make(cfg).double()
    with torch.no_grad():  # non-trivial norm weights, so the reference checks their use
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
    idx = random_ids(cfg, batch=2, seq=11)
    logits, _ = model(idx)
    torch.testing.assert_close(logits, reference_logits(model, idx), rtol=1e-10, atol=1e-10)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=g, dtype=torch.float64).unbind(0)
    cos, sin = rotary_tables(40, 16, 10000.0)
    seq_q = apply_rotary(q.float().expand(40, 16), cos, sin).double()
    seq_k = apply_rotary(k.float().expand(40, 16), cos, sin).double()
    # <R_m q, R_n k> = <q, R_{n-m} k>: the same for (m, n) = (3, 10) and (20, 27).
    assert seq_q[3] @ seq_k[10] == pytest.approx(float(seq_q[20] @ seq_k[27]), abs=1e-4)
    assert seq_q[3] @ seq_k[10] != pytest.approx(float(seq_q[3] @ seq_k[12]), abs=1e-2)
    torch.testing.assert_close(seq_q[0], q.float().double())  # position 0 is the identity


# --------------------------------------------------------------------------------------
# Shapes, causality, loss
# --------------------------------------------------------------------------------------


def test_output_shapes_and_loss_reductions() -> None:
    model = make()
    idx, targets = random_ids(TINY, 3, 10), random_ids(TINY, 3, 10, seed=2)
    logits, loss = model(idx)
    assert logits.shape == (3, 10, TINY.vocab_size) and loss is None
    logits, mean = model(idx, targets)
    _, total = model(idx, targets, reduction="sum")
    assert mean is not None and total is not None and mean.shape == ()
    torch.testing.assert_close(total, mean * targets.numel())
    expected = F.cross_entropy(logits.view(-1, TINY.vocab_size), targets.view(-1))
    torch.testing.assert_close(mean, expected)
    masked = targets.clone()
    masked[:, :4] = -100  # ignored positions do not count
    _, part = model(idx, masked, reduction="sum")
    _, tail = model(idx[:, :], targets, reduction="none")
    assert tail is not None
    torch.testing.assert_close(part, tail.view(3, 10)[:, 4:].sum())


def test_causal_future_tokens_do_not_change_past_logits() -> None:
    model = make()
    idx = random_ids(TINY, 2, 12)
    t = 5
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % TINY.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-3


def test_max_seq_len_is_enforced() -> None:
    model = make(LlamaConfig(97, 32, 48, 4, 1, max_seq_len=8))
    model(random_ids(TINY, 1, 8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(random_ids(TINY, 1, 9))


def test_module_names_and_no_biases() -> None:
    model = make()
    names = {name for name, _ in model.named_modules()}
    for expected in (
        "embed_tokens",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.k_proj",
        "layers.1.self_attn.v_proj",
        "layers.1.self_attn.o_proj",
        "layers.0.mlp.gate_proj",
        "layers.0.mlp.up_proj",
        "layers.0.mlp.down_proj",
        "layers.0.input_layernorm",
        "layers.0.post_attention_layernorm",
        "norm",
        "lm_head",
    ):
        assert expected in names
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


# --------------------------------------------------------------------------------------
# Initialisation and training
# --------------------------------------------------------------------------------------


def test_init_loss_is_near_log_vocab() -> None:
    cfg = config("nano", vocab_size=1024)
    model = make(cfg)
    _, loss = model(random_ids(cfg, 4, 64), random_ids(cfg, 4, 64, seed=5))
    assert loss is not None and abs(loss.item() - math.log(1024)) < 0.3


def test_init_scales_residual_projections() -> None:
    cfg = config("tiny", vocab_size=512)
    model = make(cfg)
    residual = 0.02 / math.sqrt(2 * cfg.num_layers)
    layer = model.layers[2]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert layer.mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(residual, rel=0.02)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual, rel=0.02)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(model.norm.weight, torch.ones(cfg.hidden_size))


def test_nano_learns_on_sotu(tmp_path_factory: pytest.TempPathFactory) -> None:
    from grassopt.train.data import iter_eval_batches, prepare

    # The same cache folder as tests/test_data.py, so the tokenizer trains once per session.
    cache = tmp_path_factory.getbasetemp() / "grassopt-cache"
    ds = prepare(vocab_size=1024, cache_dir=cache, progress=False)
    cfg = config("nano", vocab_size=ds.vocab_size)
    model = make(cfg)
    sampler = ds.sampler(batch_size=8, seq_len=64, seed=0)
    val = np.asarray(ds.val[: 4 * 64 + 1])

    def val_loss() -> float:
        with torch.no_grad():
            total = count = 0.0
            for x, y in iter_eval_batches(val, batch_size=4, seq_len=64):
                total += model(x, y, reduction="sum")[1].item()  # type: ignore[union-attr]
                count += y.numel()
        return total / count

    before = val_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(50):
        x, y = sampler.next()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    after = val_loss()
    assert abs(before - math.log(ds.vocab_size)) < 0.3
    assert after < before - 1.0, (before, after)


# --------------------------------------------------------------------------------------
# Named configs, parameter counts, meta device, low precision
# --------------------------------------------------------------------------------------


def expected_parameters(cfg: LlamaConfig) -> int:
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = (cfg.num_kv_heads or cfg.num_heads) * (d // cfg.num_heads)
    attention = d * d * 2 + d * kv * 2  # q, o and k, v
    mlp = 3 * d * f
    norms = 2 * d
    embeddings = v * d * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.num_layers * (attention + mlp + norms) + d


def test_named_config_shapes() -> None:
    shapes = {
        "60m": (512, 1376, 8, 8),
        "130m": (768, 2048, 12, 12),
        "350m": (1024, 2736, 16, 24),
        "1b": (2048, 5461, 32, 24),
        "7b": (4096, 11008, 32, 32),
        "tiny": (256, 688, 4, 4),
        "small": (384, 1024, 6, 6),
    }
    for name, (d, f, h, n) in shapes.items():
        cfg = config(name)
        shape = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_layers)
        assert shape == (d, f, h, n)
    assert config("60m").vocab_size == 32000 and config("7b").vocab_size == 32000
    assert config("tiny", vocab_size=1000).vocab_size == 1000
    assert config("small", tie_embeddings=True).tie_embeddings
    with pytest.raises(ValueError, match="known configs: nano, tiny, small, 60m"):
        config("3b")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_counts_match_formula(name: str) -> None:
    for tie in (False, True):
        cfg = config(name, tie_embeddings=tie)
        with torch.device("meta"):
            model = Llama(cfg)
        assert all(p.is_meta for p in model.parameters())
        assert model.num_parameters() == expected_parameters(cfg)
        assert model.num_parameters(exclude_embeddings=True) == (
            expected_parameters(cfg) - cfg.vocab_size * cfg.hidden_size
        )


def test_galore_sizes() -> None:
    with torch.device("meta"):
        m60 = Llama(config("60m"))
        m7b = Llama(config("7b"))
    assert m60.num_parameters() == pytest.approx(58e6, rel=0.03)  # GaLore's "60M" (58M)
    assert m7b.num_parameters() == pytest.approx(6.74e9, rel=0.01)  # LLaMA-7B
    with torch.device("meta"):
        assert Llama(config("13b")).num_parameters() == pytest.approx(13.0e9, rel=0.01)  # LLaMA-13B
        assert Llama(config("70b")).num_parameters() == pytest.approx(68.98e9, rel=0.01)  # LLaMA-2-70B
    logits, _ = m7b(torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert logits.shape == (1, 4, 32000) and logits.is_meta


def test_bf16_parameters_and_autocast() -> None:
    cfg = config("nano", vocab_size=512)
    idx, targets = random_ids(cfg, 2, 32), random_ids(cfg, 2, 32, seed=3)
    ref = make(cfg)
    _, loss32 = ref(idx, targets)

    bf16 = make(cfg, dtype=torch.bfloat16)
    logits, loss = bf16(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss is not None and loss.dtype == torch.float32
    assert loss32 is not None and torch.isfinite(logits).all()
    assert abs(loss.item() - loss32.item()) < 0.05
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in bf16.parameters())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = ref(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss is not None
    assert abs(loss.item() - loss32.item()) < 0.05
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ref.parameters())


def test_matches_hugging_face_llama() -> None:
    """Same weights in transformers' LlamaForCausalLM give the same logits."""
    transformers = pytest.importorskip("transformers")
    cfg = TINY
    ours = make(cfg)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_heads,
        num_hidden_layers=cfg.num_layers,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {
        ("" if k.startswith("lm_head") else "model.") + k: v for k, v in ours.state_dict().items()
    }
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    idx = random_ids(cfg, 2, 9)
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
        mine, _ = ours(idx)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ lean activations (RMSNorm, SwiGLU)
def test_lean_norm_and_swiglu_gradients_match_finite_differences() -> None:
    from grassopt.train.model import _LeanRMSNorm, _LeanSwiGLU

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64, generator=g).add_(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _LeanRMSNorm.apply(a, b, 1e-6), (x, w))
    gate = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_LeanSwiGLU.apply, (gate, up))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lean_activations_same_forward_same_gradients(dtype: torch.dtype) -> None:
    cfg = config("nano", vocab_size=256)
    plain, lean = make(cfg, dtype=dtype), make(config("nano", vocab_size=256, lean_activations=True), dtype=dtype)
    lean.load_state_dict(plain.state_dict())
    with torch.no_grad():  # non-trivial norm weights
        for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
                q.copy_(p)
    idx, targets = random_ids(cfg, 2, 16), random_ids(cfg, 2, 16, seed=3)
    lp, loss_p = plain(idx, targets)
    ll, loss_l = lean(idx, targets)
    assert torch.equal(lp, ll)  # the forward pass is the same computation
    loss_p.backward()
    loss_l.backward()
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-3}
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad.double(), p.grad.double(), msg=name, **tol)
        assert q.grad.dtype == dtype


def test_lean_activations_save_exactly_2d_plus_f_floats_per_token_and_block() -> None:
    from grassopt.sketch import saved_activation_bytes

    cfg = config("nano", vocab_size=256)
    batch, seq = 2, 16
    idx, targets = random_ids(cfg, batch, seq), random_ids(cfg, batch, seq, seed=3)
    saved = {}
    for lean in (False, True):
        model = make(config("nano", vocab_size=256, lean_activations=lean))
        rep = saved_activation_bytes(model, lambda: model(idx, targets)[1])  # noqa: B023  called right away
        rep.output.backward()
        saved[lean] = rep.total
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_token = layers * (2 * d + f) + d  # two norms and one SwiGLU per block, and the final norm
    assert saved[False] - saved[True] == 4 * batch * seq * per_token
