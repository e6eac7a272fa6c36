"""The memory calculator against what is really allocated: optimizer state (every preset), weights,
gradients, saved activations (autograd's own saved tensors), the sketch modes, and the CLI."""

import json

import pytest
import torch

import grassopt
from grassopt.memory import activation_bytes, estimate, load_config, state_breakdown
from grassopt.memory_cli import main
from grassopt.presets import DEFAULT_RANKS
from grassopt.train.model import Llama, config

VOCAB = 512
RANKS = {"nano": 16, "tiny": 32}


def live_step(cfg, preset, rank, dtype=torch.float32):
    torch.manual_seed(0)
    model = Llama(cfg).to(dtype)
    opt = grassopt.make_optimizer(model, preset, lr=1e-3, rank=rank)
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    model(idx, idx)[1].backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("preset", list(grassopt.PRESETS))
@pytest.mark.parametrize("name", ["nano", "tiny"])
def test_estimate_equals_the_live_optimizer_for_every_preset(name, preset):
    cfg = config(name, vocab_size=VOCAB)
    rank = None if preset in DEFAULT_RANKS else RANKS[name]  # apollo: d/4 per matrix, apollo-mini: 1
    model, opt = live_step(cfg, preset, rank)
    est = estimate(name, preset, rank, "fp32", vocab_size=VOCAB)
    t = est.totals()
    live = state_breakdown(opt)
    assert {k: t[k] for k in live} == live
    assert t["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert t["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    projected = sum(len(g["params"]) for g in opt.param_groups if "rank" in g)
    expected = 0 if preset == "adamw" else 7 * cfg.num_layers
    assert sum(p.kind == "projected" for p in est.params) == projected == expected
    if preset != "adamw":
        assert t["states"] < estimate(name, "adamw", dtype="fp32", vocab_size=VOCAB).totals()["states"]


@pytest.mark.parametrize("preset", ["subtrack++", "apollo", "ldadam"])
def test_bf16_weights_keep_float32_states_in_the_estimate_too(preset):
    cfg = config("nano", vocab_size=VOCAB)
    model, opt = live_step(cfg, preset, 8, torch.bfloat16)
    t = estimate(cfg, preset, 8, "bf16").totals()
    assert {k: t[k] for k in ("bases", "moments", "other")} == state_breakdown(opt)
    assert t["weights"] == t["gradients"] == 2 * sum(p.numel() for p in model.parameters())
    half = estimate(cfg, preset, 8, "bf16", state_dtype="bf16").totals()
    assert half["states"] * 2 == t["states"]  # the papers' "BF16 states" convention


def measured_activations(model, idx, tgt):
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, tgt)[1]
    return sum(saved.values()), loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv", [None, 1], ids=["mha", "gqa"])
def test_activation_count_is_exactly_what_autograd_saves(dtype, kv):
    cfg = config("nano", vocab_size=VOCAB, num_kv_heads=kv)
    model = Llama(cfg).to(dtype)
    g = torch.Generator().manual_seed(0)
    B, T = 3, 24
    idx, tgt = (torch.randint(0, VOCAB, (B, T), generator=g) for _ in range(2))
    measured, loss = measured_activations(model, idx, tgt)
    est = activation_bytes(cfg, B, T, dtype)
    assert sum(est.values()) == measured
    assert est["layers.0"] == est["layers.1"] and est["loss"] == 4 * VOCAB * B * T + 4
    loss.backward()  # the graph was a real one


def test_sketch_modes_match_grassopt_sketch_measurements():
    gs = pytest.importorskip("grassopt.sketch")
    g = torch.Generator().manual_seed(0)
    B, T = 2, 16
    idx, tgt = (torch.randint(0, VOCAB, (B, T), generator=g) for _ in range(2))
    cfg = config("nano", vocab_size=VOCAB)
    for dtype in (torch.float32, torch.bfloat16):
        plain = sum(activation_bytes(cfg, B, T, dtype).values())
        for mode, rank in (("estimator", 8), ("estimator", 0.25), ("rso", 8)):
            torch.manual_seed(0)
            model = Llama(cfg).to(dtype)
            opt = gs.rso(model, rank=rank, inner_steps=2, lr=1e-3) if mode == "rso" else None
            if mode == "estimator":
                gs.sketch(model, rank=rank, mode="estimator", seed=0)
            rep = gs.saved_activation_bytes(model, lambda: model(idx, tgt)[1])
            est = estimate(cfg, "adamw", dtype=dtype, batch_size=B, seq_len=T, mode=mode, sketch_rank=rank)
            assert est.totals()["activations"] == rep.total, (dtype, mode, rank)
            assert rep.total < plain
            rep.output.backward()
            matrices = {q.untyped_storage().data_ptr(): q.numel() * q.element_size()
                        for _, layer in gs.sketched_layers(model) for q in layer.group.cached_matrices()}
            assert est.sketch_matrices == sum(matrices.values())  # P: float32, plus a 16-bit cast
            if opt is not None:  # RSO's optimizer, weights (frozen W + float32 B) and gradients
                opt.step()
                t = est.totals()
                assert {k: t[k] for k in ("bases", "moments", "other")} == state_breakdown(opt)
                assert t["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
                assert t["gradients"] == sum(p.grad.numel() * p.grad.element_size()
                                             for p in model.parameters() if p.grad is not None)


def test_7b_costs_nothing_and_counts_llama_7b():
    est = estimate("7b", "adamw", dtype="bf16", batch_size=1, seq_len=2048)
    n = sum(p.weights for p in est.params) // 2
    assert n == 6_738_415_616  # LLaMA-7B
    t = est.totals()
    assert t["gradients"] == t["weights"] == 2 * n and t["moments"] == 8 * n
    galore = estimate("7b", "galore", 1024, "bf16").totals()
    per_layer = 4 * (4096 * 1024 + 2 * 4096 * 1024) + 3 * (4096 * 1024 + 2 * 11008 * 1024)
    plain = 2 * 32000 * 4096 + 65 * 4096  # embeddings, head, 65 norms
    assert galore["states"] == 4 * (32 * per_layer + 2 * plain)


def test_hugging_face_config_json_gives_the_same_numbers(tmp_path):
    cfg = config("tiny", vocab_size=VOCAB)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": cfg.hidden_size,
                                "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
                                "num_hidden_layers": cfg.num_layers, "num_key_value_heads": cfg.num_heads,
                                "vocab_size": VOCAB, "max_position_embeddings": 1024, "tie_word_embeddings": False}))
    assert load_config(str(path)) == cfg
    a = estimate(str(path), "galore", 32, seq_len=64).totals()
    b = estimate("tiny", "galore", 32, seq_len=64, vocab_size=VOCAB).totals()
    assert a == b
    bad = tmp_path / "gpt2.json"
    bad.write_text(json.dumps({"n_embd": 768, "n_layer": 12}))
    with pytest.raises(ValueError, match="not a LLaMA-style config, missing"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="unknown model config 'huge'"):
        load_config("huge")


def test_cli_json_table_per_layer_and_errors(capsys):
    assert main(["tiny", "--preset", "apollo", "--seq-len", "64", "--batch-size", "2", "--json", "--per-layer"]) == 0
    out = json.loads(capsys.readouterr().out)
    est = estimate("tiny", "apollo", None, "fp32", batch_size=2, seq_len=64)
    assert out["totals"] == est.totals() and out["rank"] == "d/4"
    assert set(out["per_layer"]) == {"embed_tokens", "layers.0", "layers.1", "layers.2", "layers.3", "norm",
                                     "lm_head", "loss", "inputs"}
    assert sum(r["moments"] for r in out["per_layer"].values()) == est.totals()["moments"]
    assert main(["60m", "--preset", "adamw", "galore", "ldadam", "--rank", "128", "--dtype", "bf16"]) == 0
    text = capsys.readouterr().out
    assert "galore (rank 128)" in text and "ldadam (rank 128)" in text
    assert main(["nano", "--preset", "galore", "--rank", "d/4", "--per-layer", "--activations", "estimator",
                 "--sketch-rank", "0.25"]) == 0
    text = capsys.readouterr().out
    assert "layers.1" in text and "sketch matrices P" in text and "rank d/4" in text
    assert main(["huge"]) == 2
    assert "unknown model config 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["nano", "--rank", "d/zero"])
    assert "rank='d/zero'" in capsys.readouterr().err


def test_tensor_peak_counts_allocations_live_at_once():
    from grassopt.memory import TensorPeak
    w = torch.randn(256, 128, requires_grad=True)  # exists before the block: not counted
    with TensorPeak() as tp:
        a = torch.zeros(1000)                   # 4000 B
        b = a[10:].view(-1, 10)                 # a view: shares a's storage
        a.add_(1.0)                             # in place: nothing new
        c = torch.ones(500, dtype=torch.float64)  # 4000 B: 8000 B live
        del a, b, c                             # freed
        d = torch.empty(100, dtype=torch.int16)  # 200 B
    assert tp.peak == 8000 and tp.live == 200
    x = torch.randn(32, 256)
    with TensorPeak() as tp:
        (x @ w).square().sum().backward()       # the gradient stays; so do no activations
    assert tp.live == w.numel() * 4 == w.grad.untyped_storage().nbytes()
    assert tp.peak >= w.numel() * 4 + 32 * 128 * 4  # gradient and the saved product at once
