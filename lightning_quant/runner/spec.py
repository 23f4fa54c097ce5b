"""The run recipe: model, data, fine-tuning, and the quantized variants to build and compare.

A run recipe is what ``lightning-quant run`` reads. Its ``quantization`` section is a plain
:class:`~lightning_quant.config.QuantRecipe` (what the callbacks read), and every variant may
override parts of it.

Example:
    >>> spec = RunRecipe.from_dict({
    ...     "model": {"path": "bert-base-uncased"},
    ...     "data": {"data_files": "reviews.csv", "text_column": "text", "label_column": "label"},
    ...     "variants": [{"name": "ptq_nf4", "kind": "ptq", "quantization": {"weight": {"format": "nf4"}}}],
    ... })
    >>> spec.variants[0].recipe(spec.quantization).weight.format
    'nf4'
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_quant._schema import RecipeError, build_dataclass, check_choice, to_plain
from lightning_quant.config import RECIPE_VERSION, QuantRecipe

__all__ = [
    "ModelSpec",
    "DataSpec",
    "TrainSpec",
    "DistillSpec",
    "VariantSpec",
    "RunRecipe",
    "QuickSpec",
    "deep_merge",
    "content_hash",
]


@dataclass
class ModelSpec:
    """The pretrained model: a local path, a hub id, or ``package:<distribution>/<path inside it>``."""

    path: str
    num_labels: int = 2
    max_length: int = 64


@dataclass
class DataSpec:
    """Labelled text loaded with ``datasets.load_dataset(builder, data_files=...)``.

    Args:
        data_files: file path (or ``package:<distribution>/<path>``).
        builder: datasets builder (``csv``, ``json``, ``parquet``).
        text_column / label_column: column names.
        labels: label values in class order; rows with other values are dropped. Empty: use the
            distinct values of ``label_column``, sorted.
        group_column: rows sharing a value stay on one side of every split (e.g. one movie).
        test_fraction / validation_fraction: of groups; validation is carved from training data
            and is what hyper-parameters are chosen on.
        train_size: subsample the training split to this many rows (0 = all).
        split_seed: the split is fixed by this seed, independent of the training seeds.
    """

    data_files: str
    text_column: str = "text"
    label_column: str = "label"
    builder: str = "csv"
    labels: list[str] = field(default_factory=list)
    group_column: str | None = None
    test_fraction: float = 0.2
    validation_fraction: float = 0.1
    train_size: int = 0
    split_seed: int = 1234

    def __post_init__(self) -> None:
        check_choice("data.builder", self.builder, ("csv", "json", "parquet"))
        for key in ("test_fraction", "validation_fraction"):
            value = getattr(self, key)
            if not 0 < value < 0.5:
                raise RecipeError(f"`data.{key}` must be in (0, 0.5); got {value!r}")


@dataclass
class DistillSpec:
    """Knowledge distillation from the FP32 model: ``(1 - weight) * CE + weight * T^2 * KL``."""

    weight: float = 0.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise RecipeError(f"`distill.weight` must be in [0, 1]; got {self.weight!r}")
        if self.temperature <= 0:
            raise RecipeError(f"`distill.temperature` must be > 0; got {self.temperature!r}")


@dataclass
class TrainSpec:
    """A training stage (fine-tuning or QAT); ``checkpoint_every`` steps a resumable checkpoint is written."""

    epochs: float = 2.0
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    eval_batch_size: int = 128
    checkpoint_every: int = 50
    distill: DistillSpec = field(default_factory=DistillSpec)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise RecipeError(f"`epochs` must be > 0; got {self.epochs!r}")
        if self.lr <= 0:
            raise RecipeError(f"`lr` must be > 0; got {self.lr!r}")
        if self.batch_size < 1:
            raise RecipeError(f"`batch_size` must be >= 1; got {self.batch_size!r}")


@dataclass
class VariantSpec:
    """One quantized variant.

    Args:
        name: shown in the results table.
        kind: ``ptq`` (calibrate and convert the FP32 model), ``qat`` (train it with fake
            quantization first), or ``optimizer_state`` (fine-tune from the pretrained model with
            the recipe's ``optimizer_state``; no weight quantization).
        quantization: overrides merged into the run's ``quantization`` section.
        train: the QAT / fine-tuning stage (``qat`` and ``optimizer_state`` only).
    """

    name: str
    kind: str
    quantization: dict[str, Any] = field(default_factory=dict)
    train: TrainSpec | None = None

    def __post_init__(self) -> None:
        check_choice("variants[].kind", self.kind, ("ptq", "qat", "optimizer_state"))
        if self.kind != "ptq" and self.train is None:
            raise RecipeError(f"`variants[{self.name}].train` is required for kind {self.kind!r}")

    def recipe(self, base: dict[str, Any]) -> QuantRecipe:
        """The variant's full quantization recipe (base section with this variant's overrides)."""
        return QuantRecipe.from_dict(deep_merge(base, self.quantization))


@dataclass
class QuickSpec:
    """What ``--quick`` shrinks: rows of each split, epochs, seeds."""

    train_size: int = 1000
    eval_size: int = 400
    epochs: float = 2.0  # fewer steps leave MiniLM at the majority class: nothing to compare
    seeds: int = 1


@dataclass
class RunRecipe:
    """A whole run: fine-tune FP32, then build and evaluate every variant, for each seed."""

    model: ModelSpec
    data: DataSpec
    finetune: TrainSpec = field(default_factory=TrainSpec)
    quantization: dict[str, Any] = field(default_factory=dict)
    variants: list[VariantSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    export: str | None = None
    quick: QuickSpec = field(default_factory=QuickSpec)
    name: str = "run"
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"`version` must be {RECIPE_VERSION}; got {self.version!r}")
        if not self.seeds:
            raise RecipeError("`seeds` must list at least one seed, e.g. [0, 1, 2]")
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RecipeError(f"`variants[].name` must be unique; {duplicates} appear twice")
        if "fp32" in names:
            raise RecipeError("`variants[].name` 'fp32' is reserved for the full-precision baseline")
        if self.export is not None and self.export not in (*names, "best"):
            raise RecipeError(f"`export` must be a variant name or 'best'; got {self.export!r}")
        # Validate every variant's quantization recipe now, before any work starts.
        for variant in self.variants:
            try:
                variant.recipe(self.quantization)
            except RecipeError as err:
                raise RecipeError(f"in `variants[{variant.name}].quantization`: {err}") from err

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a run recipe must be a mapping with `model` and `data`; got {data!r}")
        return build_dataclass(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RunRecipe:
        """Read a recipe, apply ``key.path=value`` overrides (values parsed as YAML), validate."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        for override in overrides or []:
            data = apply_override(data, override)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in recursively (lists and scalars replace)."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply ``a.b.c=value`` (value parsed as YAML); list items are addressed by index or name."""
    import yaml

    if "=" not in override:
        raise RecipeError(f"--set needs key.path=value; got {override!r}")
    key_path, raw = override.split("=", 1)
    value = yaml.safe_load(raw)
    data = copy.deepcopy(data)
    node: Any = data
    keys = key_path.split(".")
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            index = _list_index(node, key, key_path)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise RecipeError(f"--set {key_path}: `{'.'.join(keys[:i])}` is not a mapping or list")
    return data


def _list_index(items: list[Any], key: str, key_path: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return index
    raise RecipeError(f"--set {key_path}: no list item {key!r}")


def content_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (stage cache keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
