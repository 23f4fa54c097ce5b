"""Evaluation shared by every backend: accuracy, agreement with a reference, bytes, speed."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["EvalResult", "evaluate_classifier", "model_bytes", "linear_bytes", "batches"]


@dataclass
class EvalResult:
    accuracy: float
    predictions: list[int]
    seconds_per_1k: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("predictions")
        return data


def batches(dataset: Any, tokenizer: Any, batch_size: int, shuffle: bool = False, seed: int = 0):
    """A DataLoader of padded batches (``input_ids``, ``attention_mask``, ``labels``)."""
    from transformers import DataCollatorWithPadding

    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: Any, tokenizer: Any, batch_size: int = 128) -> EvalResult:
    """Accuracy of a sequence classifier on a tokenized dataset (with a progress bar)."""
    from torchmetrics.classification import MulticlassAccuracy
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", 2))
    metric = MulticlassAccuracy(num_classes=num_labels, average="micro")
    predictions: list[int] = []
    start = time.perf_counter()
    for batch in tqdm(batches(dataset, tokenizer, batch_size), desc="evaluate", leave=False):
        labels = batch.pop("labels")
        logits = model(**batch).logits
        predicted = logits.argmax(-1)
        metric.update(predicted, labels)
        predictions.extend(predicted.tolist())
    elapsed = time.perf_counter() - start
    model.train(was_training)
    return EvalResult(float(metric.compute()), predictions, 1000 * elapsed / max(1, len(dataset)))


def model_bytes(model: nn.Module) -> int:
    """Bytes of everything ``save_pretrained`` stores (bitsandbytes layers' codes and scales included)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers alone (``nn.Linear`` and their bitsandbytes replacements)."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            state = module.state_dict()
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total
