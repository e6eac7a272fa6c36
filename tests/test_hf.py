"""Hugging Face Trainer: a transformers LlamaForCausalLM (built from a config, nothing downloaded)
fine-tuned on SOTU text with subtrack++; the loss falls and a Trainer checkpoint resumes exactly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import grassopt  # noqa: E402
from grassopt.hf import make_optimizer, optimizer_cls_and_kwargs  # noqa: E402
from grassopt.presets import default_rank  # noqa: E402
from grassopt.targets import hf_target_names, resolve_rank  # noqa: E402

SEQ = 64
RANK = 8


def _llama(vocab: int):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


class _Windows(torch.utils.data.Dataset):
    def __init__(self, tokens, n: int):
        ids = torch.from_numpy(tokens[:n * SEQ].astype("int64")).view(n, SEQ)
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=16, per_device_train_batch_size=4, learning_rate=3e-3,
                lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01, logging_steps=1,
                save_strategy="steps", save_steps=8, report_to="none", use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True, optim_target_modules=["self_attn", "mlp"])
    base.update(kw)
    return transformers.TrainingArguments(**base)


class _StateAtStart(transformers.TrainerCallback):
    """Keep a copy of the optimizer state as training (re)starts, after any checkpoint was loaded."""

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            w = b["state"][i][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (i, k)


def test_targets_follow_hugging_face_rules():
    model = _llama(300)
    assert hf_target_names(model, None) == "all-linear"
    names = hf_target_names(model, ["self_attn", "mlp"])
    assert len(names) == 2 * 7 and all("lm_head" not in n for n in names)
    # a string is a full-match regex, not a substring
    assert hf_target_names(model, r".*\.mlp\.down_proj") == ["model.layers.0.mlp.down_proj",
                                                                 "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="no linear module"):
        hf_target_names(model, "mlp")
    opt = make_optimizer(model, _args("unused"), rank=RANK)
    projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    assert len(projected) == 14
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["eps"] == 1e-8
    assert all(g["weight_decay"] == (0.01 if g["params"][0].dim() == 2 else 0.0) for g in opt.param_groups)


@pytest.mark.parametrize("preset", ["apollo-mini", "apollo", "galore"])
def test_without_a_rank_each_preset_gets_its_own_default_rank(preset):
    """One rank policy: grassopt.hf gives a preset the rank grassopt.presets.default_rank names
    (apollo-mini: rank 1; apollo: d/4), not a rank of its own."""
    model = _llama(300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore's 128 >= 64: every matrix falls back to AdamW, with a warning
        opt = make_optimizer(model, _args("unused"), preset=preset)
    ranks = sorted(g["rank"] for g in opt.param_groups if "rank" in g)
    assert ranks == {"apollo-mini": [1], "apollo": [16], "galore": []}[preset]  # d = 64: d/4 = 16
    assert resolve_rank(default_rank(preset), (64, 128)) == (ranks[0] if ranks else 128)
    try:
        _, kwargs = optimizer_cls_and_kwargs(_args("unused"), preset=preset)
    except RuntimeError:  # a transformers without optimizer factories
        return
    assert kwargs["rank"] is None  # the factory defers to the same policy


def test_trainer_finetunes_llama_and_resumes(sotu_1k, tmp_path):
    data = _Windows(sotu_1k.train, 64)
    opt_kw = dict(preset="subtrack++", rank=RANK, update_interval=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # uninterrupted run (the Trainer builds the optimizer through the factory)
        model = _llama(sotu_1k.vocab_size)
        args = _args(tmp_path / "a")
        full = transformers.Trainer(model=model, args=args, train_dataset=data,
                                    optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, **opt_kw))
        full.train()
        opt_full = getattr(full.optimizer, "optimizer", full.optimizer)  # unwrap accelerate's wrapper
        assert isinstance(opt_full, grassopt.SubspaceAdamW)
        assert sum("rank" in g for g in opt_full.param_groups) == 1
        losses = _losses(full)
        assert len(losses) == 16
        assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses

        # resume from the step-8 checkpoint, with an optimizer built by hand (the other recipe)
        model2 = _llama(sotu_1k.vocab_size)
        torch.manual_seed(1)
        for p in model2.parameters():  # a different model: the weights must come from the checkpoint
            nn.init.normal_(p, std=0.1)
        args2 = _args(tmp_path / "a")
        probe = _StateAtStart()
        resumed = transformers.Trainer(model=model2, args=args2, train_dataset=data,
                                       optimizers=(make_optimizer(model2, args2, **opt_kw), None),
                                       callbacks=[probe])
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    saved = torch.load(tmp_path / "a" / "checkpoint-8" / "optimizer.pt", weights_only=True)
    _same_state(probe.state, saved)  # the optimizer state (bases, moments, steps) was restored
    # continuing gives what not stopping gave: the same losses and bit-identical final weights
    assert _losses(resumed)[-8:] == losses[-8:]
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name
    _same_state(opt_full.state_dict(), resumed.optimizer.state_dict())
