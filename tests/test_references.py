"""The reference optimizers (grassopt.references): each builds on the nano Llama, steps exactly like
its package's optimizer built by hand, lowers the loss, has its real state bytes counted, and
resumes bit for bit, through state_dict and through `grassopt train --resume`."""

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from grassopt import memory, references
from grassopt.references import REFERENCES
from grassopt.train import cli as train_cli
from grassopt.train.data import TokenizedCorpus
from grassopt.train.loop import TrainConfig, build_optimizer, optimizer_state_bytes, train
from grassopt.train.model import Llama, config

VOCAB = 257  # the smallest BPE vocabulary: 256 bytes + <|endoftext|>
NAMES = list(REFERENCES)
MODULES = {"ref-adam-mini": "adam_mini", "ref-adamw8bit": "bitsandbytes", "ref-torchao-adamw8bit": "torchao",
           "ref-soap": "pytorch_optimizer", "ref-normuon": "pytorch_optimizer", "ref-racs": "pytorch_optimizer"}
#: the references built from a package (ref-scale is written here: checked against its formula below)
PACKAGED = [n for n in NAMES if n != "ref-scale"]


def needs(name):
    """Skip (with the reason) only when the reference's optional package is absent."""
    module = MODULES.get(name)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{name} needs {module}: pip install grassopt[bench]")


@pytest.fixture(autouse=True)
def eager_torchao(monkeypatch):
    """torchao compiles its step per parameter shape (about a minute on a CPU, once); the same
    function runs eagerly here (torchao looks torch.compile up at each step). The compiled path is
    checked by the slow test at the end."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


def nano(seed=0):
    torch.manual_seed(seed)
    return Llama(config("nano", vocab_size=VOCAB))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (4, 32), generator=g)
    return x, x.roll(-1, dims=1)  # predict the next token of a fixed batch: learnable in a few steps


def steps(model, opt, n, sched=None, data=None):
    x, y = data or batch()
    losses = []
    for _ in range(n):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def build(name, model, **kw):
    return build_optimizer(model, TrainConfig(preset=name, lr=kw.pop("lr", 3e-3), weight_decay=kw.pop("wd", 0.1),
                                              options=kw))


def decay_groups(params, wd, **extra):
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd, **extra},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **extra}]


# --------------------------------------------------------------------- the package's optimizer, by hand
class Both:
    """Two optimizers stepped one after the other, as torch's Muon docs show."""

    def __init__(self, *opts):
        self.opts = opts

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def by_hand(name, m, lr=3e-3, wd=0.1):
    betas = (0.9, 0.999)
    if name == "ref-muon":
        hidden = [p for n, p in m.named_parameters() if n.startswith("layers.") and p.dim() == 2]
        rest = [p for n, p in m.named_parameters() if not (n.startswith("layers.") and p.dim() == 2)]
        return Both(torch.optim.Muon(hidden, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw"),
                    torch.optim.AdamW(decay_groups(rest, wd), lr=lr, betas=betas))
    if name == "ref-adafactor":
        return torch.optim.Adafactor(decay_groups(m.parameters(), wd), lr=lr)
    if name == "ref-adam-mini":
        from adam_mini import Adam_mini
        opt = Adam_mini(m.named_parameters(), lr=lr, betas=betas, weight_decay=wd, dim=64, n_heads=2, n_kv_heads=2,
                        verbose=False)
        opt.wv_names = {}  # the README's advice for runs under 10k steps
        return opt
    if name == "ref-adamw8bit":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(decay_groups(m.parameters(), wd), lr=lr, betas=betas, weight_decay=wd)
        # what transformers' Trainer does for adamw_bnb_8bit: embeddings at 32-bit state (the
        # process-wide manager; reset after the test)
        bnb.optim.GlobalOptimManager.get_instance().register_module_override(m.embed_tokens, "weight",
                                                                              {"optim_bits": 32})
        return opt
    if name == "ref-torchao-adamw8bit":
        from torchao.optim import AdamW8bit
        return AdamW8bit(decay_groups(m.parameters(), wd), lr=lr, betas=betas, weight_decay=wd)
    if name == "ref-soap":
        from pytorch_optimizer import SOAP
        vocab = [m.embed_tokens.weight, m.lm_head.weight]
        rest = [p for p in m.parameters() if all(p is not v for v in vocab)]
        return SOAP(decay_groups(rest, wd) + [{"params": vocab, "weight_decay": wd, "max_precondition_dim": 64}],
                    lr=lr, betas=(0.95, 0.95), weight_decay=wd, precondition_frequency=10)
    if name in ("ref-normuon", "ref-racs"):
        import pytorch_optimizer
        hidden = [p for n, p in m.named_parameters() if n.startswith("layers.") and p.dim() == 2]
        rest = [p for n, p in m.named_parameters() if not (n.startswith("layers.") and p.dim() == 2)]
        if name == "ref-normuon":
            first = pytorch_optimizer.NorMuon([{"params": hidden, "use_muon": True}], lr=lr, weight_decay=wd,
                                              update_scale="match_rms")
        else:
            first = pytorch_optimizer.RACS(hidden, lr=lr, weight_decay=wd)
        return Both(first, torch.optim.AdamW(decay_groups(rest, wd), lr=lr, betas=betas))
    raise AssertionError(name)


@pytest.fixture
def clean_bnb_manager():
    yield
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb
        bnb.optim.GlobalOptimManager.get_instance().initialize()


@pytest.mark.parametrize("name", PACKAGED)
def test_reference_steps_exactly_like_its_package_built_by_hand_and_lowers_the_loss(name, clean_bnb_manager):
    needs(name)
    ours_model, hand_model = nano(), nano()
    ours, hand = build(name, ours_model), by_hand(name, hand_model)
    losses = steps(ours_model, ours, 4)
    steps(hand_model, hand, 4)
    for (n, a), b in zip(ours_model.named_parameters(), hand_model.parameters()):
        assert torch.equal(a, b), n
    assert losses[-1] < losses[0] - (0.01 if name == "ref-adafactor" else 0.3), losses  # Adafactor: relative steps
    assert all(not torch.equal(a, b) for a, b in zip(ours_model.parameters(), nano().parameters()))


# --------------------------------------------------------------------- state bytes
def direct_count(opt):
    """Every tensor in the state once (by object), subclasses by their inner tensors: independent of
    optimizer_state_bytes' storage walk."""
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            if type(x).__name__ == "OptimState8bit":  # torchao: uint8 codes, float scales, 256-entry map
                for t in (x.codes, x.scale, x.qmap):
                    walk(t)
            elif id(x) not in seen:
                seen.add(id(x))
                total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for st in opt.state.values():
        walk(st)
    return total


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_are_the_real_bytes_of_the_state_tensors(name):
    needs(name)
    m = nano()
    opt = build(name, m)
    steps(m, opt, 3)
    counted = optimizer_state_bytes(opt)
    assert counted > 0 and counted == direct_count(opt)
    n = sum(p.numel() for p in m.parameters())
    emb = m.embed_tokens.weight.numel()
    if name == "ref-adamw8bit":  # 8-bit matrices, 32-bit embedding, one shared map pair
        st = opt.state[m.layers[0].mlp.up_proj.weight]
        assert st["state1"].dtype == torch.uint8 and st["qmap1"] is opt.state[m.lm_head.weight]["qmap1"]
        assert opt.state[m.embed_tokens.weight]["state1"].dtype == torch.float32
        assert counted < 8 * emb + 0.3 * 8 * (n - emb)
    if name == "ref-torchao-adamw8bit":  # the subclass shows float32 to PyTorch: 4x its real size
        quantized = [st for st in opt.state.values() if type(st["exp_avg"]) is not torch.Tensor]
        assert quantized  # torchao keeps small or block-misaligned tensors in float32
        for st in quantized:
            shown = sum(st[k].numel() * st[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
            n = st["exp_avg"].numel()  # 1-byte codes, a float32 scale per 256-block, a 256-entry map each
            assert references.tensor_bytes([st["exp_avg"], st["exp_avg_sq"]]) <= 2 * (n + 4 * -(-n // 256) + 4 * 256)
            assert references.tensor_bytes([st["exp_avg"], st["exp_avg_sq"]]) < 0.35 * shown
    if name == "ref-muon":  # one momentum per hidden matrix, Adam's two moments elsewhere
        hidden = sum(p.numel() for n_, p in m.named_parameters() if n_.startswith("layers.") and p.dim() == 2)
        assert counted == 4 * hidden + 8 * (n - hidden) + 4 * len(opt.adamw.state)  # (+ AdamW's step counts)
    if name == "ref-soap":  # Adam's two moments plus each side's statistics and eigenbasis
        up = opt.state[m.layers[0].mlp.up_proj.weight]  # 172 x 64
        assert [tuple(t.shape) for t in up["GG"]] == [(172, 172), (64, 64)] == [tuple(t.shape) for t in up["Q"]]
        head = opt.state[m.lm_head.weight]  # the vocabulary side is not preconditioned
        assert head["GG"][0] == [] and tuple(head["GG"][1].shape) == (64, 64)
        assert counted > 8 * n


def test_state_bytes_of_grassopt_presets_are_unchanged_by_the_storage_walk():
    for preset in ("subtrack++", "apollo", "adamw-torch"):
        m = nano()
        opt = build_optimizer(m, TrainConfig(preset=preset, rank=8, update_interval=2))
        steps(m, opt, 3)
        assert optimizer_state_bytes(opt) == memory.state_bytes(opt)


def test_tensor_bytes_counts_storages_once_and_slices_by_what_they_keep_alive():
    big = torch.zeros(64, 64)
    shared = torch.zeros(256)

    class Projector:  # galore-torch keeps U[:, :rank] of a full SVD: the slice holds all of U
        ortho_matrix = big[:, :8]

    class Opt:
        state = {0: {"exp_avg": torch.zeros(8, 64), "qmap": shared, "projector": Projector()},
                 1: {"GG": [torch.zeros(4, 4), []], "qmap": shared, "step": 3}}

    assert references.tensor_bytes(torch.zeros(3, dtype=torch.uint8)) == 3
    assert optimizer_state_bytes(Opt()) == 4 * (8 * 64 + 256 + 64 * 64 + 16)


# --------------------------------------------------------------------- checkpoints
def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # as grassopt train loads its checkpoints


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_bit_identically(name):
    needs(name)
    extra = {"precondition_frequency": 2} if name == "ref-soap" else {}  # a basis refresh after the reload

    def fresh():
        m = nano()
        opt = build(name, m, **extra)
        return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))

    m, opt, sched = fresh()
    steps(m, opt, 3, sched)
    references.prepare_resume(name)
    ckpt = save_load({"model": m.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    m2, opt2, sched2 = fresh()
    m2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert optimizer_state_bytes(opt2) == optimizer_state_bytes(opt)
    steps(m, opt, 3, sched)
    steps(m2, opt2, 3, sched2)
    for (n, a), b in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n
    assert float(opt2.param_groups[0]["lr"]) == float(opt.param_groups[0]["lr"]) == pytest.approx(3e-3 / 7)


def tiny_corpus():
    """A learnable token stream (a noisy repeating pattern) in the shape of a tokenized corpus."""
    rng = np.random.default_rng(0)
    stream = np.tile(rng.integers(0, VOCAB, 97), 200)
    noise = rng.random(stream.size) < 0.1
    stream[noise] = rng.integers(0, VOCAB, noise.sum())
    stream = stream.astype(np.uint16)
    return TokenizedCorpus(train=stream[:18000], val=stream[18000:], tokenizer=None, vocab_size=VOCAB, eos_id=0,
                           meta={}, from_cache=True, cache_dir=Path("."), source="synthetic")


@pytest.mark.parametrize("name", NAMES)
def test_grassopt_train_resume_equals_one_run_bit_for_bit(name, tmp_path):
    needs(name)
    data = tiny_corpus()

    def cfg(out, **kw):
        return TrainConfig(model="nano", vocab_size=VOCAB, seq_len=32, batch_size=2, steps=5, lr=3e-3, preset=name,
                           eval_every=5, eval_tokens=128, log_every=2, progress=False, plot=False, threads=1,
                           out=str(tmp_path / out), **kw)

    assert_train_resumes(cfg, data, tmp_path)
    logged = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert all(isinstance(r["lr"], float) for r in logged if "lr" in r)


def test_resume_with_a_tuple_setting_on_the_command_line(tmp_path, monkeypatch):
    needs("ref-adam-mini")
    data = tiny_corpus()
    monkeypatch.setattr(train_cli, "train", lambda c: train(c, dataset=data))
    argv = ["--preset", "ref-adam-mini", "--opt", "betas=(0.9,0.95)", "--model", "nano", "--vocab-size", str(VOCAB),
            "--seq-len", "32", "--batch-size", "2", "--steps", "4", "--eval-every", "4", "--eval-tokens", "128",
            "--no-progress", "--no-plot", "--out", str(tmp_path)]
    assert train_cli.main([*argv, "--stop-after", "2"]) == 0
    assert train_cli.main([*argv, "--resume"]) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and {g["beta2"] for g in ckpt["optimizer"]["param_groups"]} == {0.95}


# --------------------------------------------------------------------- how each is configured
def test_muon_gets_the_hidden_matrices_and_shares_the_adamw_learning_rate():
    m = nano()
    opt = build("ref-muon", m)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in muon}
    assert names == {n for n, _ in m.named_parameters()
                     if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert {g["adjust_lr_fn"] for g in opt.muon.param_groups} == {"match_rms_adamw"}
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert {g["lr"] for o in opt.optimizers for g in o.param_groups} == {1.5e-3}  # one schedule drives both
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))]})


def test_adam_mini_recognizes_every_block_of_our_llama():
    needs("ref-adam-mini")
    m = nano()
    opt = build("ref-adam-mini", m)
    steps(m, opt, 1)
    names = {g["name"]: g for g in opt.param_groups}
    assert set(names) == {n.lower() for n, _ in m.named_parameters()}

    def kind(n):
        for label, keys in (("qk", opt.wqk_names), ("embd", opt.embd_names), ("output", opt.output_names),
                            ("v", opt.wv_names), ("attn_proj", opt.attn_proj_names), ("mlp", opt.mlp_names)):
            if any(k in n for k in keys):
                return label
        return "whole"

    for n, p in m.named_parameters():
        expected = ("qk" if "q_proj" in n or "k_proj" in n else "embd" if "embed" in n else
                    "output" if "lm_head" in n else "attn_proj" if "o_proj" in n else
                    "mlp" if ".mlp." in n else "whole")  # v_proj and the norms: one second moment each
        assert kind(n.lower()) == expected, n
        vmean = opt.state[p]["vmean"]
        rows = {"qk": 2, "embd": VOCAB, "output": VOCAB, "attn_proj": 64, "mlp": p.shape[0]}.get(expected)
        assert vmean.numel() == (rows or 1), n
        assert names[n.lower()]["weight_decay"] == (0.0 if "norm" in n else 0.1)


def test_settings_are_checked_and_betas_follow_the_authors_unless_given():
    m = nano()
    with pytest.raises(ValueError, match="unknown setting.*ref-muon.*momentum"):
        build("ref-muon", m, mommentum=0.9)
    assert build("ref-muon", m, momentum=0.9).muon.param_groups[0]["momentum"] == 0.9
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        assert build("ref-soap", m).param_groups[0]["betas"] == (0.95, 0.95)  # the SOAP README's
        assert build("ref-soap", m, betas=(0.9, 0.99)).param_groups[0]["betas"] == (0.9, 0.99)
    assert build("ref-adafactor", m).param_groups[0]["beta2_decay"] == -0.8


def test_layerwise_is_refused_for_references(tmp_path):
    with pytest.raises(ValueError, match="ref-muon.*optimizer.step"):
        TrainConfig(preset="ref-muon", layerwise=True, clip=0).validate()


# --------------------------------------------------------------------- missing packages, versions
def test_a_missing_package_is_one_line_naming_it_and_the_extra(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == "adam_mini" else real(mod, *a))
    with pytest.raises(references.MissingPackageError) as e:
        build("ref-adam-mini", nano())
    assert str(e.value) == "ref-adam-mini needs the package adam-mini: pip install grassopt[bench]"
    code = train_cli.main(["--preset", "ref-adam-mini", "--model", "nano", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err == "grassopt train: error: ref-adam-mini needs the package adam-mini: pip install " \
                                "grassopt[bench]\n"
    from grassopt.bench import cli as bench_cli
    assert not bench_cli._available("ref-adam-mini") and bench_cli._available("ref-muon")
    assert "ref-adam-mini needs the package adam-mini" in bench_cli._missing("ref-adam-mini")


def test_an_old_bitsandbytes_is_named_with_its_version(monkeypatch):
    needs("ref-adamw8bit")
    monkeypatch.setattr(references.importlib.metadata, "version", lambda dist: "0.45.5")
    with pytest.raises(references.MissingPackageError, match=r"ref-adamw8bit needs bitsandbytes >= 0.50 "
                                                             r"\(installed: 0.45.5\): pip install -U grassopt\[bench\]"):
        references.require("ref-adamw8bit")


def test_reference_versions_are_the_installed_ones():
    from importlib.metadata import version
    v = references.reference_versions()
    assert v["torch"] == torch.__version__
    for dist, module in (("adam-mini", "adam_mini"), ("bitsandbytes", "bitsandbytes"), ("torchao", "torchao"),
                         ("pytorch-optimizer", "pytorch_optimizer")):
        if importlib.util.find_spec(module) is not None:
            assert v[dist] == version(dist)
    assert set(references.reference_versions(["ref-muon", "subtrack++"])) == {"torch"}


def test_bench_report_prints_the_package_versions(tmp_path, capsys, monkeypatch):
    from grassopt.bench import cli as bench_cli
    data = tiny_corpus()
    monkeypatch.setattr(bench_cli, "train", lambda c: train(c, dataset=data))
    monkeypatch.setattr("grassopt.bench.report._plot", lambda runs, out: [])  # no PNGs: not what is tested
    out = tmp_path / "bench"
    argv = ["--model", "nano", "--vocab-size", str(VOCAB), "--seq-len", "32", "--batch-size", "2", "--steps", "2",
            "--eval-every", "2", "--eval-tokens", "128", "--threads", "1", "--no-progress", "--no-refs",
            "--presets", "ref-muon", "--out", str(out)]
    assert bench_cli.main(argv) == 0
    assert f"packages: torch {torch.__version__}" in capsys.readouterr().out
    assert f"Packages: torch {torch.__version__}" in (out / "report.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert res["versions"] == {"torch": torch.__version__}
    assert [r["preset"] for r in res["rows"]] == ["ref-muon"]


# --------------------------------------------------------------------- torchao, compiled
@pytest.mark.slow
def test_torchao_compiled_step_agrees_with_its_eager_step(monkeypatch):
    needs("ref-torchao-adamw8bit")
    monkeypatch.undo()  # the real torch.compile
    m, e = nano(), nano()
    opt = build("ref-torchao-adamw8bit", m)
    steps(m, opt, 3)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    opt_e = build("ref-torchao-adamw8bit", e)
    steps(e, opt_e, 3)
    # fused float rounding can move a moment across an 8-bit code boundary: a rare element then
    # differs by a fraction of one step (lr = 3e-3), never more
    for a, b in zip(m.parameters(), e.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        assert (a - b).abs().gt(1e-6).float().mean() < 0.01


def assert_train_resumes(cfg, data, tmp_path):
    """``train(cfg("a"))`` straight through, and ``cfg("b")`` stopped after 3 steps then resumed, end with
    the same eval loss, the same weights bit for bit and the same state bytes."""
    full = train(cfg("a"), dataset=data)
    assert train(cfg("b", stop_after=3), dataset=data)["steps"] == 3
    resumed = train(cfg("b", resume=True), dataset=data)
    assert resumed["finished"] and resumed["final_eval_loss"] == full["final_eval_loss"]
    a, b = (torch.load(tmp_path / o / "checkpoint.pt", weights_only=True)["model"] for o in ("a", "b"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["optimizer_state_bytes"] == resumed["optimizer_state_bytes"] > 0



# --------------------------------------------------------------------- SCALE, against its formula
@pytest.mark.parametrize("rest", ["scale", "adamw"])
def test_scale_follows_the_papers_update_in_float64(rest):
    """Each matrix SCALE holds moves by -lr M / rms(M) after decoupled decay, M the gradient (the head: its
    momentum, 0.9), rms over the input side (an embedding table: over the vocabulary), recomputed here in
    float64 from the gradients the run saw; the norms (AdamW) and, with rest=adamw, embedding and head are
    not SCALE's."""
    lr, wd = 3e-3, 0.1
    m = nano()
    opt = build("ref-scale", m, lr=lr, wd=wd, rest=rest)
    head, emb = m.lm_head.weight, m.embed_tokens.weight
    mine = [p for p in m.parameters() if p.dim() == 2 and (rest == "scale" or (p is not head and p is not emb))]
    momentum = {id(head): torch.zeros_like(head, dtype=torch.float64)}
    x, y = batch()
    losses = []
    for _ in range(3):
        before = {id(p): p.detach().double().clone() for p in mine}
        _, loss = m(x, y)
        loss.backward()
        grads = {id(p): p.grad.double().clone() for p in mine}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        for p in mine:
            g = grads[id(p)]
            if p is head:
                g = momentum[id(head)] = 0.9 * momentum[id(head)] + 0.1 * g
            dim = 0 if p is emb else 1
            rms = g.pow(2).mean(dim=dim, keepdim=True).sqrt().clamp_min(1e-8)
            want = before[id(p)] * (1 - lr * wd) - lr * g / rms
            assert torch.allclose(p.detach().double(), want, rtol=0, atol=1e-6), tuple(p.shape)
    assert losses[-1] < losses[0] - 0.3, losses
    held = {id(p) for g in opt.hidden_optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in mine}
    kept = [p for p in opt.hidden_optimizer.state if opt.hidden_optimizer.state[p]]
    assert [id(p) for p in kept] == ([id(head)] if rest == "scale" else [])  # the only state SCALE keeps


def test_scale_state_is_the_heads_momentum_and_the_norms_moments():
    m = nano()
    opt = build("ref-scale", m)
    steps(m, opt, 2)
    norms = [p for p in m.parameters() if p.dim() < 2]
    # the head's momentum, and AdamW's two moments and step count on each norm
    assert optimizer_state_bytes(opt) == 4 * m.lm_head.weight.numel() + sum(8 * p.numel() + 4 for p in norms)


def test_scale_refuses_a_bad_rest():
    with pytest.raises(ValueError, match="ref-scale: rest='sgd' is not one of"):
        build("ref-scale", nano(), rest="sgd")


# --------------------------------------------------------------------- peers built in the registry
@pytest.mark.parametrize("name", ["ref-alice", "ref-galore-adafactor"])
def test_registry_peers_step_exactly_like_their_package_built_by_hand(name):
    """Alice (pytorch-optimizer) and GaLoreAdafactor (galore-torch) on the hidden matrices at the rank and
    update interval, torch's AdamW on the rest: equal to the packages built by hand, and the loss falls."""
    from grassopt import registry
    ours_model, hand_model = nano(), nano()
    ours = registry.build(name, ours_model, lr=3e-3, weight_decay=0.1, rank=8, update_interval=2)
    hidden = [p for n, p in hand_model.named_parameters() if n.startswith("layers.") and p.dim() == 2]
    rest = [p for n, p in hand_model.named_parameters() if not (n.startswith("layers.") and p.dim() == 2)]
    if name == "ref-alice":
        from pytorch_optimizer import Alice
        first = Alice([{"params": hidden, "rank": 8, "update_interval": 2, "leading_basis": 8}], lr=3e-3,
                      weight_decay=0.1)
    else:
        from galore_torch import GaLoreAdafactor
        first = GaLoreAdafactor([{"params": hidden, "rank": 8, "update_proj_gap": 2, "scale": 0.25,
                                  "proj_type": "std"}], lr=3e-3, weight_decay=0.1, relative_step=False,
                                scale_parameter=False, warmup_init=False)
    hand = Both(first, torch.optim.AdamW(decay_groups(rest, 0.1), lr=3e-3))
    losses = steps(ours_model, ours, 5)
    steps(hand_model, hand, 5)
    for (n, a), b in zip(ours_model.named_parameters(), hand_model.parameters()):
        assert torch.equal(a, b), n
    assert losses[-1] < losses[0] - 0.3, losses
