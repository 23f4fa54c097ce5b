"""Tiny pieces shared by the Trainer tests and the torchrun script: a random BERT, a toy task, arguments.

Not a test module (no ``test_`` prefix); imported by name because pytest and ``torchrun`` both put this
folder on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SEQ_LEN = 12
VOCAB = 128


class ToyTask(torch.utils.data.Dataset):
    """Binary classification a 2-layer BERT learns in a few dozen steps: is the first token >= 66?"""

    def __init__(self, size: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(5, VOCAB, (size, SEQ_LEN), generator=generator)
        self.labels = (self.input_ids[:, 0] >= 66).long()

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": self.labels[index],
        }


def tiny_bert(seed: int = 0) -> Any:
    """A 2-layer random BertForSequenceClassification whose widths are multiples of the 4-bit block (64)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def training_args(output_dir: str | Path, **overrides: Any) -> Any:
    """CPU-only, quiet, deterministic TrainingArguments for a few steps."""
    from transformers import TrainingArguments

    options: dict[str, Any] = {
        "max_steps": 8,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "disable_tqdm": True,
    }
    options.update(overrides)
    return TrainingArguments(str(output_dir), **options)


def losses(trainer: Any) -> dict[int, float]:
    """Logged training loss per step."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def tiny_tokenizer(folder: Path) -> Any:
    """A BERT WordPiece tokenizer over this vocabulary size, built from a vocab file (no hub)."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))
