"""Shared fixtures: tiny models built from configs, deterministic seeds, offline hub."""

from __future__ import annotations

import os

import pytest
import torch

# Nothing may reach a model hub from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Float32 bit patterns with -0.0 folded into +0.0 (bitsandbytes' CPU kernels disagree on the
    sign of FP4's zero code; the value is the same)."""
    return (t.detach().float() + 0.0).view(torch.int32)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_bert():
    """A 2-layer random BertForSequenceClassification whose widths are multiples of 64."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    model.eval()
    return model


@pytest.fixture
def bert_batch():
    input_ids = torch.randint(1, 128, (4, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
