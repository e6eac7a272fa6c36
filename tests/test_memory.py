"""The memory calculator against what is really allocated: optimizer state (every preset), weights,
gradients, saved activations (autograd's own saved tensors), the sketch modes, and the CLI."""

import json
import math

import pytest
import torch

import grassopt
from grassopt.memory import state_breakdown
from grassopt.train.estimate import activation_bytes, estimate, load_config
from grassopt.train.memory_cli import main
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
            rep = gs.saved_activation_bytes(model, lambda: model(idx, tgt)[1])  # noqa: B023  called right away
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
        d = torch.empty(100, dtype=torch.int16)  # 200 B, held  # noqa: F841
    assert tp.peak == 8000 and tp.live == 200
    x = torch.randn(32, 256)
    with TensorPeak() as tp:
        (x @ w).square().sum().backward()       # the gradient stays; so do no activations
    assert tp.live == w.numel() * 4 == w.grad.untyped_storage().nbytes()
    assert tp.peak >= w.numel() * 4 + 32 * 128 * 4  # gradient and the saved product at once


# ---------------------------------------------------------------------------------------- the 24 GiB options
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", [None, "estimator"], ids=["plain", "sketched"])
def test_checkpointed_activations_match_a_measured_forward(dtype, mode):
    gs = pytest.importorskip("grassopt.sketch")
    cfg = config("nano", vocab_size=VOCAB)
    g = torch.Generator().manual_seed(0)
    B, T = 3, 24
    idx, tgt = (torch.randint(0, VOCAB, (B, T), generator=g) for _ in range(2))
    measured = {}
    for ck in (False, True):
        torch.manual_seed(0)
        model = Llama(config("nano", vocab_size=VOCAB, checkpoint_activations=ck)).to(dtype)
        if mode:
            gs.sketch(model, rank=8, mode=mode, seed=0)
        rep = gs.saved_activation_bytes(model, lambda: model(idx, tgt)[1])  # noqa: B023  called right away
        measured[ck] = rep
        rep.output.backward()
    est = activation_bytes(cfg, B, T, dtype, mode, 8 if mode else None, checkpoint=True)
    plain = activation_bytes(cfg, B, T, dtype, mode, 8 if mode else None)
    a = torch.empty((), dtype=dtype).element_size()
    # what the checkpointed forward pass leaves saved: the block inputs (hidden x tokens), the head, the ids
    assert est["layers.0"] == est["layers.1"] == a * cfg.hidden_size * B * T
    assert sum(est.values()) - est["recompute"] == measured[True].total
    assert measured[True].prefixed("layers.1") == est["layers.1"]
    # the recomputed block: the full activations of one block, as measured without checkpointing
    assert est["recompute"] == plain["layers.1"] == measured[False].prefixed("layers.1")
    assert measured[True].total < measured[False].total
    e = estimate(cfg, "adamw", dtype=dtype, batch_size=B, seq_len=T, mode=mode, sketch_rank=8 if mode else None,
                 checkpoint_activations=True)
    assert e.totals()["activations"] == sum(est.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layerwise_gradient_term_is_the_largest_gradient_alive(dtype):
    from grassopt.layerwise import LayerwiseUpdater
    cfg = config("nano", vocab_size=VOCAB)
    for layerwise in (False, True):
        torch.manual_seed(0)
        model = Llama(cfg).to(dtype)
        params = list(model.parameters())
        opt = grassopt.make_optimizer(model, "subtrack++", lr=1e-3, rank=8)
        alive = []  # bytes of every gradient alive when each gradient is complete

        def seen(p):
            # (a hook of this iteration's model, run by this iteration's backward)
            alive.append(sum(q.grad.untyped_storage().nbytes() for q in params if q.grad is not None))  # noqa: B023

        for p in params:
            p.register_post_accumulate_grad_hook(seen)
        lw = LayerwiseUpdater(opt) if layerwise else None
        idx = torch.randint(0, VOCAB, (2, 8))
        model(idx, idx)[1].backward()
        if lw is None:
            alive.append(sum(q.grad.untyped_storage().nbytes() for q in params))
        est = estimate(cfg, "subtrack++", 8, dtype, layerwise=layerwise)
        assert est.totals()["gradients"] == max(alive), layerwise
        if layerwise:  # the embedding (and lm_head): VOCAB x hidden
            assert max(alive) == VOCAB * cfg.hidden_size * torch.empty((), dtype=dtype).element_size()
            assert est.largest_gradient().name in ("embed_tokens.weight", "lm_head.weight")
            assert all(p.grad is None for p in params)


def test_bf16_param_dtype_against_a_live_bf16_model(capsys):
    cfg = config("nano", vocab_size=VOCAB)
    torch.manual_seed(0)
    model = Llama(cfg).to(torch.bfloat16)
    idx = torch.randint(0, VOCAB, (1, 8))
    model(idx, idx)[1].backward()
    live_w = sum(p.untyped_storage().nbytes() for p in model.parameters())
    live_g = sum(p.grad.untyped_storage().nbytes() for p in model.parameters())
    for flag in ("--param-dtype", "--dtype"):  # --dtype: the same option, kept for compatibility
        assert main(["nano", "--vocab-size", str(VOCAB), flag, "bf16", "--json"]) == 0
        t = json.loads(capsys.readouterr().out)["totals"]
        assert t["weights"] == live_w == 2 * model.num_parameters()
        assert t["gradients"] == live_g == live_w
    assert main(["nano", "--vocab-size", str(VOCAB), "--param-dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["weights"] == live_w


def test_int8_state_bytes_per_moment_tensor():
    from grassopt.memory import INT8_BLOCK, moment_bytes, param_state_bytes
    assert INT8_BLOCK == 256
    assert [moment_bytes(n, "int8") for n in (1, 255, 256, 257, 1024)] == [5, 259, 260, 265, 1040]
    assert moment_bytes(1000, "fp32") == 4000 and moment_bytes(1000, "bf16") == 2000
    cfg = config("nano", vocab_size=VOCAB)
    r = 8
    est = estimate(cfg, "subtrack++", r, "bf16", state_dtype="int8")
    assert est.state_dtype == "int8"
    bases = moments = other = 0
    for p in est.params:  # by hand: Q (d x r) float32, two k x r int8 moments, recovery's float32 scalar
        n = math.prod(p.shape)
        if p.kind == "projected":
            d, k = min(p.shape), max(p.shape)
            bases += 4 * d * r
            moments += 2 * (k * r + 4 * math.ceil(k * r / 256))
            other += 4
        else:  # embedding, lm_head, norms: two int8 moments of the parameter's shape
            moments += 2 * (n + 4 * math.ceil(n / 256))
    t = est.totals()
    assert (t["bases"], t["moments"], t["other"]) == (bases, moments, other)
    fp32 = estimate(cfg, "subtrack++", r, "bf16").totals()
    assert t["bases"] == fp32["bases"] and t["other"] == fp32["other"] and t["moments"] < fp32["moments"] / 3.9
    assert param_state_bytes((64, 172), {"params": []}, "int8")["moments"] == 2 * (64 * 172 + 4 * 43)
    with pytest.raises(ValueError, match="unknown state dtype 'int3'"):
        estimate(cfg, "adamw", state_dtype="int3")


@pytest.mark.parametrize("preset", list(grassopt.PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_estimate_equals_a_live_int8_optimizer(preset, dtype):
    """SubspaceAdamW(state_dtype="int8"): the live state, byte for byte, for every preset."""
    from grassopt.presets import param_groups
    cfg = config("nano", vocab_size=VOCAB)
    rank = None if preset in DEFAULT_RANKS else 8
    torch.manual_seed(0)
    model = Llama(cfg).to(dtype)
    opt = grassopt.SubspaceAdamW(param_groups(model, preset, rank), lr=1e-3, state_dtype="int8")
    idx = torch.randint(0, VOCAB, (1, 8))
    model(idx, idx)[1].backward()
    opt.step()
    t = estimate(cfg, preset, rank, dtype, state_dtype="int8").totals()
    live = state_breakdown(opt)
    assert {k: t[k] for k in ("bases", "moments", "other")} == live
    assert live["moments"] < estimate(cfg, preset, rank, dtype).totals()["moments"] / 3.9


def test_cli_7b_on_24_gib(capsys):
    argv = ["7b", "--preset", "subtrack++", "--rank", "1024", "--state-dtype", "int8", "--param-dtype", "bf16",
            "--layerwise", "--checkpoint-activations", "--batch-size", "1", "--seq-len", "2048"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for part in ("weights", "gradients (largest one)", "optimizer states", "saved activations (checkpointed)",
                 "one block recomputed", "total", "fits in 24.00 GiB: yes", "states int8", "layer-wise updates",
                 "activation checkpointing", "batch 1 x 2048 tokens"):
        assert part in text, part
    est = estimate("7b", "subtrack++", 1024, "bf16", batch_size=1, seq_len=2048, state_dtype="int8",
                   layerwise=True, checkpoint_activations=True)
    t = est.totals()
    assert f"{t['total']:,}" in text and t["total"] < 24 * 2**30
    assert t["weights"] == 2 * 6_738_415_616 and t["gradients"] == 2 * 32000 * 4096
    h, N, L = 4096, 2048, 32
    assert sum(est.activations[f"layers.{j}"] for j in range(L)) == L * 2 * h * N
    # the same without the options does not fit
    assert main(argv[:5] + ["--param-dtype", "bf16", "--batch-size", "1", "--seq-len", "2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["totals"]["total"] > 24 * 2**30 and out["budget_bytes"] == 24 * 2**30
    assert main(["7b", "--preset", "adamw", "galore", "--rank", "1024", "--layerwise", "--budget", "80"]) == 0
    assert "fits 80 GiB" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nano", "--state-dtype", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["nano", "--budget", "-1"])
    assert "the memory budget must be > 0 GiB" in capsys.readouterr().err
    assert main(["nano", "--state-dtype", "int8", "--activations", "rso"]) == 2
    assert "RSO (mode='rso') brings its own optimizer" in capsys.readouterr().err


@pytest.mark.parametrize("state_dtype,plain,betas", [("int8", "factored", (0.9, 0.999)),
                                                     ("float32", "int8", (0.9, 0.999)),
                                                     ("factored-no-m", "factored-no-m", (0.0, 0.999))])
def test_plain_state_dtype_is_the_plain_groups_own_format_live_and_estimated(state_dtype, plain, betas):
    """plain_state_dtype sets the moment format of the plain groups alone (the projected ones keep
    state_dtype); the estimate prices each group by its own format, byte for byte as the live state, and a
    run in it learns."""
    from grassopt.presets import param_groups
    cfg = config("nano", vocab_size=VOCAB)
    torch.manual_seed(0)
    model = Llama(cfg)
    groups = param_groups(model, "subtrack++", 8, state_dtype=state_dtype, plain_state_dtype=plain)
    assert {g["state_dtype"] for g in groups if "rank" in g} == {state_dtype}
    assert {g["state_dtype"] for g in groups if "rank" not in g} == {plain}
    opt = grassopt.SubspaceAdamW(groups, lr=3e-3, betas=betas)
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(6):
        loss = model(idx, idx.roll(-1, 1))[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    t = estimate(cfg, "subtrack++", 8, state_dtype=state_dtype, plain_state_dtype=plain).totals()
    assert {k: t[k] for k in ("bases", "moments", "other")} == state_breakdown(opt)
    head = opt.state[model.lm_head.weight]
    want = {"factored": {"exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"}, "int8": {"exp_avg", "exp_avg_sq"},
            "factored-no-m": {"exp_avg_sq_row", "exp_avg_sq_col"}}[plain]
    assert want <= set(head) and not {"exp_avg", "exp_avg_sq"} - want & set(head)


def test_plain_state_dtype_is_refused_where_it_does_not_apply():
    from grassopt import registry
    from grassopt.train.loop import TrainConfig
    with pytest.raises(ValueError, match="plain_state_dtype applies to grassopt's presets, not to 'adamw-torch'"):
        registry.build("adamw-torch", Llama(config("nano", vocab_size=VOCAB)), plain_state_dtype="int8")
    with pytest.raises(ValueError, match="plain_state_dtype='int8' applies to grassopt's presets, not to 'ref-muon'"):
        TrainConfig(preset="ref-muon", plain_state_dtype="int8").validate()
    with pytest.raises(ValueError, match="plain_state_dtype='int3' must be one of"):
        TrainConfig(plain_state_dtype="int3").validate()


@pytest.mark.parametrize("param_dtype, compute", [("int8", torch.bfloat16), ("int8-fp32", torch.float32)])
@pytest.mark.parametrize("preset", ["subtrack++", "apollo-mini", "adamw"])
def test_int8_weights_estimate_equals_a_live_int8_model(preset, param_dtype, compute, capsys):
    """--param-dtype int8: the quantized layers' codes, block scales and one-element parameters, the rest bf16;
    gradients bf16; the optimizer's state: byte for byte against a live model after one step."""
    from grassopt.qlinear import Int8Linear, quantize_linears
    cfg = config("nano", vocab_size=VOCAB)
    rank = None if preset in DEFAULT_RANKS else 8
    torch.manual_seed(0)
    model = quantize_linears(Llama(cfg)).to(compute)
    opt = grassopt.make_optimizer(model, preset, lr=1e-3, rank=rank, state_dtype="int8", stochastic_rounding=True)
    idx = torch.randint(0, VOCAB, (1, 8))
    model(idx, idx)[1].backward()
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters())
    opt.step()
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 7 * cfg.num_layers
    live_w = (sum(p.untyped_storage().nbytes() for p in model.parameters())
              + sum(m.codes.untyped_storage().nbytes() + m.scales.untyped_storage().nbytes() for m in layers))
    est = estimate(cfg, preset, rank, param_dtype, state_dtype="int8")
    t = est.totals()
    assert t["weights"] == live_w and t["gradients"] == grads
    assert {k: t[k] for k in ("bases", "moments", "other")} == state_breakdown(opt)
    a = compute.itemsize
    full = estimate(cfg, preset, rank, "bf16" if a == 2 else "fp32", state_dtype="int8").totals()
    n = sum(m.codes.numel() for m in layers)  # by hand: a bytes -> 1 byte + 4 per 256 + the parameter's a
    blocks = sum(math.ceil(m.codes.numel() / 256) for m in layers)
    assert full["weights"] - t["weights"] == (a - 1) * n - 4 * blocks - a * len(layers)
    assert main(["nano", "--vocab-size", str(VOCAB), "--preset", preset, "--param-dtype", param_dtype, "--state-dtype",
                 "int8", "--json"] + (["--rank", "8"] if rank else [])) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["weights"] == live_w


def test_cli_7b_with_int8_weights(capsys):
    argv = ["7b", "--preset", "subtrack++", "--rank", "1024", "--state-dtype", "int8", "--param-dtype", "int8",
            "--layerwise", "--checkpoint-activations", "--batch-size", "1", "--seq-len", "2048"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "weights int8+bfloat16" in text and "224 linear layers as int8 codes" in text
    t = estimate("7b", "subtrack++", 1024, "int8", batch_size=1, seq_len=2048, state_dtype="int8", layerwise=True,
                 checkpoint_activations=True).totals()
    hidden = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert t["weights"] == hidden + 4 * hidden // 256 + 2 * 224 + 2 * (6_738_415_616 - hidden)
    assert f"{t['total']:,}" in text and t["total"] < 16 * 2**30  # issue 28: subtrack++ at rank 1024 under 16 GiB


def test_fsdp_per_rank_bytes_shard_what_fsdp_shards_and_keep_the_projected_state_whole(capsys):
    """grassopt memory --fsdp: weights, gradients and the plain state split N ways (per parameter, rounded
    up), the projected matrices' state whole on every rank (FSDPSubspaceAdamW), the same activations, and
    a gathered transient (the root and two blocks unsharded, or one projected matrix and its gradient)."""
    est = estimate("7b", "subtrack++", 1024, "bf16", state_dtype="int8", checkpoint_activations=True)
    whole = est.totals()
    one = est.per_rank(1)
    assert {k: one[k] for k in ("weights", "gradients", "bases", "moments", "other", "activations")} == \
        {k: whole[k] for k in ("weights", "gradients", "bases", "moments", "other", "activations")}
    assert one["transient"] == 0 and one["total"] == whole["total"]
    eight = est.per_rank(8, owners=False)
    assert eight["weights"] == sum(-(-p.weights // 8) for p in est.params)
    projected = sum(p.bases + p.moments + p.other for p in est.params if p.kind == "projected")
    plain = sum(p.bases + p.moments + p.other for p in est.params if p.kind == "plain")
    assert eight["states"] == projected + sum(-(-(p.moments + p.other) // 8) for p in est.params if p.kind == "plain")
    assert projected > 0 and eight["states"] < projected + plain / 7
    block = sum(p.weights for p in est.params if p.name.startswith("layers.0."))
    root = sum(p.weights for p in est.params if not p.name.startswith("layers."))
    assert eight["transient"] == root + 2 * block
    # with owners (grassopt train --fsdp): each projected matrix's state on one rank, balanced by the cost of
    # its basis update; the fullest rank holds about 1/8 of it, and gathers its owned matrices whole, one at
    # a time: the transient is that of the replicated step (the largest of the gathered blocks or matrices)
    owned = est.per_rank(8)
    plain_share = eight["states"] - projected
    assert projected / 8 <= owned["states"] - plain_share <= projected / 8 * 1.3
    proj = [p for p in est.params if p.kind == "projected"]
    largest = max(p.weights + p.gradients for p in proj)
    assert owned["transient"] == eight["transient"] == max(root + 2 * block, largest)
    assert owned["weights"] == eight["weights"] and owned["gradients"] == eight["gradients"]
    with pytest.raises(ValueError, match="leave out --layerwise"):
        estimate("tiny", "galore", 8, layerwise=True).per_rank(2)
    assert main(["13b", "--fsdp", "--preset", "subtrack++", "--rank", "1024", "--param-dtype", "bf16",
                 "--state-dtype", "int8", "--checkpoint-activations", "--world-size", "4", "8", "--replicated"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("subtrack++")]
    assert [r[3] for r in rows] == ["4", "8"] and [r[-2:] for r in rows] == [["no", "yes"], ["yes", "yes"]]
