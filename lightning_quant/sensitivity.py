"""Per-layer sensitivity and mixed precision under a size budget.

``sensitivity`` quantizes one layer at a time to each candidate format (the rest of the model in
full precision) and measures how much the model's output moves: the KL divergence of its logits
by default, or the drop of a user metric such as validation accuracy. ``allocate`` then picks one
format per layer minimising the summed sensitivity with the model's bytes under a budget: a
multiple-choice knapsack solved exactly (dynamic programming over the Pareto frontier of
(bytes, sensitivity) partial solutions). Bytes are counted as the converted bitsandbytes layers
store them (codes, absmax, double-quantized statistics, int8 row scales, biases).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    >>> table = sensitivity(model, {"weight": {"format": "nf4"}}, [torch.randn(4, 64)])
    >>> plan = allocate(table, budget_ratio=0.5)
    >>> sorted(plan.formats) == ["0", "2"] and plan.total_bytes <= plan.budget_bytes
    True
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lightning_quant.calibration import forward_batch, to_device
from lightning_quant.config import QuantRecipe, RecipeError, RuleConfig
from lightning_quant.modules import FakeQuantLinear, LayerSpec, QuantizationError, replace_module
from lightning_quant.rules import _check_layer, layer_spec, plan_layers

__all__ = [
    "SensitivityRow",
    "SensitivityTable",
    "Allocation",
    "sensitivity",
    "allocate",
    "model_nbytes",
    "storage_nbytes",
    "kl_divergence",
]

RecipeLike = QuantRecipe | Mapping[str, Any] | str | Path


def storage_nbytes(spec: LayerSpec | str, shape: Sequence[int], bias: int = 0) -> int:
    """Bytes a converted layer stores for a ``[out, in]`` weight (+ ``bias`` bytes), without quantizing.

    Same count as ``FourBitWeight.nbytes()`` / ``Int8Weight.nbytes()``: 4-bit packs two codes a
    byte plus a float32 absmax per block (double quantization: a uint8 code per block, a float32
    absmax per 256 blocks and a float32 offset); int8 stores a byte per weight and a float32 scale
    per row.

    Example:
        >>> storage_nbytes(LayerSpec("nf4", block_size=64), (64, 64))
        2304
    """
    spec = LayerSpec(spec) if isinstance(spec, str) else spec
    out_features, in_features = shape
    n = out_features * in_features
    if spec.is_4bit:
        blocks = -(-n // spec.block_size)
        stats = blocks + 4 * -(-blocks // 256) + 4 if spec.double_quant else 4 * blocks
        return (n + 1) // 2 + stats + bias
    return n + 4 * out_features + bias


def _tensor_nbytes(tensor: torch.Tensor) -> int:
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes Params4bit
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        if state.state2 is not None:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
            total += 4  # the float32 offset of the double-quantized absmax
    scb = getattr(tensor, "SCB", None)  # bitsandbytes Int8Params: CB is the data, SCB the row scales
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    return total


def model_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``, bitsandbytes layers as they store them.

    Counts packed 4-bit codes with their absmax (and double-quantization statistics) and int8
    weights with their row scales, from the real tensors; shared tensors are counted once.
    """
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for tensor in chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += _tensor_nbytes(tensor)
    return total


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean ``KL(softmax(reference) || softmax(other))`` over all positions (last dim = classes)."""
    # Float64: the KL of nearly equal logits is tiny and float32 rounding would swamp it.
    log_p = F.log_softmax(reference.double(), dim=-1)
    log_q = F.log_softmax(other.double(), dim=-1)
    return max(0.0, float((log_p.exp() * (log_p - log_q)).sum(-1).mean()))


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]  # type: ignore[no-any-return]
    if hasattr(output, "logits"):
        return output.logits  # type: ignore[no-any-return]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"sensitivity() could not find logits in a {type(output).__name__}; pass `metric=` to score the model yourself"
    )


@dataclass
class SensitivityRow:
    """One (layer, format) measurement: the output change and the bytes the layer would store."""

    name: str
    format: str
    sensitivity: float
    nbytes: int


@dataclass
class SensitivityTable:
    """What :func:`sensitivity` measured, ready for :func:`allocate`.

    Attributes:
        rows: one row per candidate layer and format (``keep``: sensitivity 0, full-precision bytes).
        fixed_bytes: bytes of everything that is not a candidate layer (embeddings, norms, kept
            heads, buffers), counted once in every allocation.
        full_bytes: bytes of the full-precision model.
        kept: layers the recipe keeps in full precision (task heads, ``keep`` rules).
        overrides: per layer, the ``block_size`` / ``double_quant`` of the recipe rule it matched.
        metric: ``kl`` or the user metric's name; ``baseline``: its full-precision value.
        notes: formats a layer cannot take (shape), and why.
    """

    rows: list[SensitivityRow]
    fixed_bytes: int
    full_bytes: int
    kept: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = "kl"
    baseline: float | None = None
    notes: list[str] = field(default_factory=list)

    def layers(self) -> list[str]:
        """Candidate layer names in model order."""
        return list(dict.fromkeys(row.name for row in self.rows))

    def options(self, name: str) -> dict[str, SensitivityRow]:
        """The rows of one layer, by format."""
        return {row.format: row for row in self.rows if row.name == name}

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{layer: {format: sensitivity}}`` (what ``QuantReport.plot`` draws)."""
        return {name: {f: r.sensitivity for f, r in self.options(name).items()} for name in self.layers()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self) -> str:
        """One line per layer: sensitivity and bytes of each format."""
        formats = list(dict.fromkeys(row.format for row in self.rows))
        lines = ["| layer | " + " | ".join(formats) + " |", "|---|" + "---|" * len(formats)]
        for name in self.layers():
            options = self.options(name)
            cells = [f"{options[f].sensitivity:.3g} ({options[f].nbytes} B)" if f in options else "" for f in formats]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _bias_bytes(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel() * bias.element_size()


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    recipe: RecipeLike,
    batches: Iterable[Any] | None = None,
    metric: Callable[[nn.Module], float] | None = None,
    formats: Sequence[str] = ("nf4", "fp4", "int8", "keep"),
    *,
    num_batches: int | None = None,
    higher_is_better: bool = True,
) -> SensitivityTable:
    """Quantize one layer at a time to each format and measure the change of the model's output.

    The model is restored after every measurement. Layers the recipe quantizes are candidates;
    layers it keeps (task heads, ``keep`` rules) stay in full precision. Activation quantization
    follows the recipe (``int8`` includes bitsandbytes' per-token int8 activations); static ranges
    are not calibrated here.

    Args:
        model: a full-precision (unprepared) model, in eval mode during the measurement.
        recipe: sets block size, double quantization, rules; a :class:`QuantRecipe`, dict or path.
        batches: inputs (as for :func:`~lightning_quant.calibration.calibrate`); needed for the
            default metric: ``KL(softmax(fp32 logits) || softmax(quantized logits))``.
        metric: ``metric(model) -> float``, e.g. validation accuracy; the sensitivity is its drop
            from full precision (its rise when ``higher_is_better`` is False).
        formats: candidates among ``nf4``, ``fp4``, ``int8``, ``llm_int8``, ``keep``.
        num_batches: batches used (default: ``recipe.calibration.num_batches``).

    Returns:
        A :class:`SensitivityTable`.

    Raises:
        ValueError: a prepared model, no batches without a metric, or an unknown format.
    """
    recipe = QuantRecipe.coerce(recipe)  # type: ignore[arg-type]
    allowed = ("nf4", "fp4", "int8", "llm_int8", "keep")
    bad = [f for f in formats if f not in allowed]
    if bad or not formats:
        raise ValueError(f"`formats` must be a non-empty subset of {', '.join(allowed)}; got {list(formats)!r}")
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("sensitivity() measures a full-precision model; call it before prepare()")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if metric is None:
        if batches is None:
            raise ValueError("sensitivity() needs `batches` for the default KL metric, or a `metric` function")
        data = [to_device(b, device) for b in islice(batches, num_batches or recipe.calibration.num_batches)]
        if not data:
            raise ValueError("sensitivity() got no batches; pass a non-empty DataLoader or list of batches")
        references = [_logits(forward_batch(model, b)) for b in data]

        def score(m: nn.Module) -> float:
            return sum(kl_divergence(r, _logits(forward_batch(m, b))) for r, b in zip(references, data)) / len(data)

        baseline = None
    else:
        sign = 1.0 if higher_is_better else -1.0
        baseline = float(metric(model))

        def score(m: nn.Module) -> float:
            return sign * (baseline - float(metric(m)))

    plans = plan_layers(model, _probe_recipe(recipe))
    full_bytes = model_nbytes(model)
    table = SensitivityTable([], full_bytes, full_bytes, metric=getattr(metric, "__name__", "kl") if metric else "kl")
    table.baseline = baseline
    try:
        for plan in plans:
            if plan.spec is None:
                table.kept.append(plan.name)
                continue
            _measure_layer(model, recipe, plan.name, plan.module, plan.spec, formats, score, table)
    finally:
        model.train(was_training)
    return table


def _probe_recipe(recipe: QuantRecipe) -> QuantRecipe:
    """The recipe with every quantizing format set to int8 (valid for any shape): finds the candidate
    layers and their rule settings even where the recipe's own 4-bit format cannot apply."""
    data = recipe.to_dict()  # a deep copy: QuantRecipe.__post_init__ may adjust nested configs
    data["weight"]["format"] = "int8"
    for rule in data.get("rules", []):
        if rule["format"] != "keep":
            rule["format"] = "int8"
    return QuantRecipe.from_dict(data)


def _measure_layer(
    model: nn.Module,
    recipe: QuantRecipe,
    name: str,
    module: nn.Module,
    planned: LayerSpec,
    formats: Sequence[str],
    score: Callable[[nn.Module], float],
    table: SensitivityTable,
) -> None:
    assert isinstance(module, nn.Linear)
    # Keep the block size / double quantization a rule gave this layer, for every candidate format.
    overrides: dict[str, Any] = {}
    if planned.block_size != recipe.weight.block_size:
        overrides["block_size"] = planned.block_size
    if planned.double_quant != recipe.weight.double_quant:
        overrides["double_quant"] = planned.double_quant
    full = module.weight.numel() * module.weight.element_size() + _bias_bytes(module)
    table.fixed_bytes -= full
    if overrides:
        table.overrides[name] = overrides
    for fmt in formats:
        if fmt == "keep":
            table.rows.append(SensitivityRow(name, "keep", 0.0, full))
            continue
        spec = layer_spec(recipe, RuleConfig(name, fmt, **overrides))
        try:
            _check_layer(name, module, spec)
        except (RecipeError, QuantizationError) as err:
            table.notes.append(f"`{name}` cannot take {fmt}: {err}")
            continue
        layer = FakeQuantLinear(module, spec, name)
        layer.eval()
        replace_module(model, name, layer)
        try:
            value = score(model)
            nbytes = layer.quantized_weight().nbytes() + _bias_bytes(module)
        finally:
            replace_module(model, name, module)
        table.rows.append(SensitivityRow(name, fmt, value, nbytes))


@dataclass
class Allocation:
    """One format per layer, chosen by :func:`allocate`.

    Attributes:
        formats: layer name -> format (``keep`` = full precision).
        total_bytes: model bytes after conversion with these formats.
        budget_bytes: the budget it satisfies.
        total_sensitivity: the summed sensitivity it minimises.
        full_bytes: model bytes in full precision.
        rules: recipe rules (plain dicts, YAML-ready) that produce these formats.
        llm_int8_skip_modules: modules left in full precision, for transformers'
            ``BitsAndBytesConfig(llm_int8_skip_modules=...)``.
    """

    formats: dict[str, str]
    total_bytes: int
    budget_bytes: int
    total_sensitivity: float
    full_bytes: int
    rules: list[dict[str, Any]]
    llm_int8_skip_modules: list[str]

    def to_recipe(self, recipe: RecipeLike) -> QuantRecipe:
        """``recipe`` with these rules put first (they name every candidate layer exactly)."""
        base = QuantRecipe.coerce(recipe)  # type: ignore[arg-type]
        return base.replace(rules=[RuleConfig(**rule) for rule in self.rules] + list(base.rules))

    def counts(self) -> dict[str, int]:
        """How many layers got each format."""
        counts: dict[str, int] = {}
        for fmt in self.formats.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _frontier_search(options: list[list[tuple[int, float]]], capacity: int) -> tuple[list[int], int, float] | None:
    """Exact multiple-choice knapsack: one option per group, bytes <= capacity, least total cost.

    Dynamic programming over the Pareto frontier: after each group only partial solutions that no
    other one beats in both bytes and cost survive; any optimal solution extends one of them.
    """
    sizes = np.zeros(1, dtype=np.int64)
    costs = np.zeros(1, dtype=np.float64)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for group in options:
        option_sizes = np.array([o[0] for o in group], dtype=np.int64)
        option_costs = np.array([o[1] for o in group], dtype=np.float64)
        new_sizes = (sizes[:, None] + option_sizes[None, :]).ravel()
        new_costs = (costs[:, None] + option_costs[None, :]).ravel()
        parent = np.repeat(np.arange(sizes.size), option_sizes.size)
        choice = np.tile(np.arange(option_sizes.size), sizes.size)
        fits = new_sizes <= capacity
        if not fits.any():
            return None
        new_sizes, new_costs, parent, choice = new_sizes[fits], new_costs[fits], parent[fits], choice[fits]
        order = np.lexsort((new_costs, new_sizes))  # by bytes, then cost
        new_sizes, new_costs, parent, choice = new_sizes[order], new_costs[order], parent[order], choice[order]
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(new_costs)[:-1]])
        keep = new_costs < best_before
        sizes, costs = new_sizes[keep], new_costs[keep]
        back.append((parent[keep], choice[keep]))
    # The frontier's costs fall as bytes grow: the last state is the cheapest (fewest bytes on ties).
    state = sizes.size - 1
    picks: list[int] = []
    for parent, choice in reversed(back):
        picks.append(int(choice[state]))
        state = int(parent[state])
    picks.reverse()
    return picks, int(sizes[-1]), float(costs[-1])


def allocate(table: SensitivityTable, budget_bytes: int | None = None, budget_ratio: float | None = None) -> Allocation:
    """Choose a format per layer minimising total sensitivity with the converted model within budget.

    Args:
        table: from :func:`sensitivity`.
        budget_bytes: the most bytes the converted model may take (parameters and buffers, as
            :func:`model_nbytes` counts them).
        budget_ratio: or a fraction of the full-precision model's bytes.

    Returns:
        An :class:`Allocation` (exact optimum; ties prefer fewer bytes).

    Raises:
        ValueError: neither or both budgets, or a budget below the smallest reachable size (the
            message says what that is).

    Example:
        >>> table = SensitivityTable(
        ...     [SensitivityRow("a", "nf4", 0.5, 10), SensitivityRow("a", "keep", 0.0, 40),
        ...      SensitivityRow("b", "nf4", 0.1, 10), SensitivityRow("b", "keep", 0.0, 40)],
        ...     fixed_bytes=0, full_bytes=80)
        >>> allocate(table, budget_bytes=50).formats
        {'a': 'keep', 'b': 'nf4'}
    """
    if (budget_bytes is None) == (budget_ratio is None):
        raise ValueError("allocate() takes exactly one of `budget_bytes` or `budget_ratio`")
    if budget_ratio is not None:
        if not budget_ratio > 0:
            raise ValueError(f"`budget_ratio` must be > 0; got {budget_ratio!r}")
        budget_bytes = int(budget_ratio * table.full_bytes)
    assert budget_bytes is not None
    names = table.layers()
    choices = [list(table.options(name).values()) for name in names]
    options = [[(row.nbytes, row.sensitivity) for row in rows] for rows in choices]
    smallest = table.fixed_bytes + sum(min(size for size, _ in group) for group in options)
    found = _frontier_search(options, budget_bytes - table.fixed_bytes)
    if found is None:
        raise ValueError(
            f"`budget_bytes` {budget_bytes} is below the smallest reachable model size {smallest} bytes "
            f"({smallest / table.full_bytes:.3f} of full precision); raise the budget"
        )
    picks, layer_bytes, cost = found
    formats = {name: rows[k].format for name, rows, k in zip(names, choices, picks)}
    rules = []
    for name, fmt in formats.items():
        # glob.escape keeps a name with [, * or ? from matching other modules.
        rule: dict[str, Any] = {"pattern": glob.escape(name), "format": fmt}
        if fmt != "keep":
            rule.update(table.overrides.get(name, {}))
        rules.append(rule)
    skip = table.kept + [name for name, fmt in formats.items() if fmt == "keep"]
    return Allocation(
        formats=formats,
        total_bytes=table.fixed_bytes + layer_bytes,
        budget_bytes=budget_bytes,
        total_sensitivity=cost,
        full_bytes=table.full_bytes,
        rules=rules,
        llm_int8_skip_modules=sorted(skip),
    )
