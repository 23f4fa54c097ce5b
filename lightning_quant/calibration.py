"""Calibration: forward passes that set activation ranges and weight clipping, with no labels needed.

One pass over the batches records, for every prepared layer, the statistics each candidate method
needs (running min/max, a moving average, one histogram shared by percentile / mse / entropy) and
a sample of the layer's input rows. Then, per layer, every candidate method proposes an activation
range (static activations) and a weight clipping multiplier (``weight_clipping``); the layer's
output on the sampled rows is compared with the full-precision output, and with ``auto`` the
method with the smallest error wins. Under ``torch.distributed`` every statistic and every error is
all-reduced, so all ranks make the same choices and end with identical ranges.

Example:
    >>> from torch import nn
    >>> from lightning_quant.api import prepare
    >>> model = nn.Sequential(nn.Linear(64, 64))
    >>> _ = prepare(model, {"weight": {"format": "int8"}, "activation": {"mode": "static"}})
    >>> report = calibrate(model, [torch.randn(8, 64) for _ in range(4)], config={"method": "auto"})
    >>> report.layer("0").metrics["calibration_method"] in ("minmax", "moving_average", "percentile", "mse", "entropy")
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lightning_quant.clipping import hessian_chunk, input_hessian, search_weight_clipping
from lightning_quant.config import CalibrationConfig, QuantRecipe, RecipeError
from lightning_quant.modules import FakeQuantLinear, QuantizationError
from lightning_quant.observers import OBSERVER_METHODS, HistogramObserver, Observer, build_observer
from lightning_quant.report import LayerReport, QuantReport, sqnr_db, weight_error_metrics

__all__ = ["calibrate", "fake_quant_layers", "forward_batch", "to_device"]

# Input rows kept per layer to score methods and measure output error: enough for a stable
# estimate, small enough (a few MB per layer) for 37 layers of a BERT.
_ROWS_PER_BATCH = 128
_MAX_ROWS = 2048
# Relative output-error margin by which `auto` prefers an earlier method (see _finish_layer).
_TOLERANCE = 0.01


def fake_quant_layers(model: nn.Module) -> list[tuple[str, FakeQuantLinear]]:
    """Every prepared layer of ``model`` with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch: a dict (keyword arguments, labels dropped), a tuple/list, or a tensor."""
    if isinstance(batch, Mapping):
        # Calibration needs no labels; passing them would only make the model compute a loss.
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        return model(**inputs)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if _distributed():
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor


@dataclass
class _LayerStats:
    """What one pass records for one layer."""

    name: str
    layer: FakeQuantLinear
    methods: tuple[str, ...]
    observers: dict[str, Observer] = field(default_factory=dict)
    samples: list[torch.Tensor] = field(default_factory=list)
    rows: int = 0

    def record(self, x: torch.Tensor) -> None:
        for observer in self.observers.values():
            observer(x)
        if self.rows >= _MAX_ROWS:
            return
        flat = x.detach().reshape(-1, x.shape[-1])
        stride = max(1, math.ceil(flat.shape[0] / _ROWS_PER_BATCH))
        rows = flat[::stride][: _MAX_ROWS - self.rows].float().clone()
        self.samples.append(rows)
        self.rows += rows.shape[0]


def _resolve_config(
    config: CalibrationConfig | Mapping[str, Any] | None, recipe: QuantRecipe | Mapping[str, Any] | str | Path | None
) -> CalibrationConfig | None:
    if config is not None and recipe is not None:
        raise RecipeError("calibrate() takes `config=` or `recipe=`, not both; pass recipe.calibration as config")
    if recipe is not None:
        return QuantRecipe.coerce(recipe).calibration  # type: ignore[arg-type]
    if isinstance(config, Mapping):
        return QuantRecipe.from_dict({"calibration": dict(config)}).calibration
    return config


def _candidate_observers(
    layer: FakeQuantLinear, methods: tuple[str, ...], config: CalibrationConfig
) -> dict[str, Observer]:
    if layer.spec.activation != "static":
        return {}
    options = {"momentum": config.momentum, "percentile": config.percentile, "symmetric": layer.spec.act_symmetric}
    observers: dict[str, Observer] = {}
    for method in methods:
        if method in ("percentile", "mse", "entropy"):
            # One histogram serves every histogram method; see _proposals.
            method = "percentile"
        if method not in observers:
            observers[method] = build_observer(method, **options).to(layer.weight.device)
    return observers


def _proposals(
    stats: _LayerStats, config: CalibrationConfig, hessian: torch.Tensor | None
) -> dict[str, tuple[Observer | None, torch.Tensor | None]]:
    """Per method: the activation observer (None: weight-only layer) and the weight clipping multiplier."""
    layer = stats.layer
    for recorded in stats.observers.values():
        recorded.sync()
    histogram = stats.observers.get("percentile")
    proposals: dict[str, tuple[Observer | None, torch.Tensor | None]] = {}
    for method in stats.methods:
        observer: Observer | None = None
        if stats.observers:
            if method in ("mse", "entropy"):
                assert isinstance(histogram, HistogramObserver)
                observer = histogram.as_method(method, percentile=config.percentile)
            else:
                observer = stats.observers[method]
        multiplier = layer.weight_multiplier
        if config.weight_clipping:
            multiplier = search_weight_clipping(layer, method, percentile=config.percentile, hessian=hessian)
        proposals[method] = (observer, multiplier)
    return proposals


@contextmanager
def _installed(layer: FakeQuantLinear, observer: Observer | None, multiplier: torch.Tensor | None) -> Iterator[None]:
    """Temporarily give ``layer`` an observer and a clipping multiplier (to score a method)."""
    old_observer, old_multiplier = layer.input_observer, layer.weight_multiplier
    saved = None if old_multiplier is None else old_multiplier.detach().clone()
    old_flags = (layer.fake_quant_enabled, layer.calibrating, layer.training)
    _install(layer, observer, multiplier)
    layer.fake_quant_enabled, layer.calibrating = True, False
    layer.eval()
    try:
        yield
    finally:
        layer.input_observer = old_observer
        if isinstance(old_multiplier, nn.Parameter):
            assert saved is not None
            old_multiplier.data.copy_(saved)
        else:
            layer.weight_multiplier = old_multiplier
        layer.fake_quant_enabled, layer.calibrating = old_flags[0], old_flags[1]
        layer.train(old_flags[2])


def _install(layer: FakeQuantLinear, observer: Observer | None, multiplier: torch.Tensor | None) -> None:
    if observer is not None:
        layer.input_observer = observer
    if isinstance(layer.weight_multiplier, nn.Parameter):
        # LSQ starts from the calibrated clipping; "no clipping" is a multiplier of 1.
        value = torch.ones_like(layer.weight_multiplier) if multiplier is None else multiplier
        layer.weight_multiplier.data.copy_(value.clamp(layer.spec.lsq_min, 1.0))
    elif multiplier is None:
        layer.weight_multiplier = None
    else:
        layer.set_weight_clipping(multiplier)


def _output_errors(layer: FakeQuantLinear, inputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``[sum of squared error, sum of squared reference, max abs error]`` of the layer's output."""
    out = layer(inputs).float()
    diff = out - reference
    return torch.stack([diff.double().pow(2).sum(), reference.double().pow(2).sum(), diff.abs().max().double()])


@torch.no_grad()
def _finish_layer(stats: _LayerStats, config: CalibrationConfig, batches: int) -> LayerReport:
    """Choose the method for one layer, install its range and clipping, and measure the result."""
    layer = stats.layer
    inputs = torch.cat(stats.samples).to(layer.weight.device)
    reference = F.linear(inputs, layer.weight.float(), None if layer.bias is None else layer.bias.float())
    hessian = None
    if config.weight_clipping and config.weight_clipping_objective == "output" and "mse" in stats.methods:
        hessian = _all_reduce(input_hessian(inputs, hessian_chunk(layer)))
    proposals = _proposals(stats, config, hessian)
    scores = {}
    for method, (observer, multiplier) in proposals.items():
        with _installed(layer, observer, multiplier):
            scores[method] = _output_errors(layer, inputs, reference)
    # Every rank sums the same errors, so every rank picks the same method.
    stacked = torch.stack(list(scores.values()))
    sums = _all_reduce(stacked[:, :2].contiguous())
    max_abs = _all_reduce(stacked[:, 2].contiguous(), "max")
    errors = {m: (float(sums[i, 0]), float(sums[i, 1]), float(max_abs[i])) for i, m in enumerate(scores)}
    # A later method must beat every earlier (simpler) one by more than _TOLERANCE: smaller
    # differences are noise on a few thousand rows, and minmax, moving_average, percentile, mse,
    # entropy is also the order of increasing cost and assumption.
    best = min(e[0] for e in errors.values())
    winner = next(m for m in proposals if errors[m][0] <= best * (1 + _TOLERANCE))
    _install(layer, *proposals[winner])
    error, signal, worst = errors[winner]
    metrics: dict[str, Any] = {
        "calibration_batches": batches,
        "calibration_method": winner,
        "output_sqnr_db": sqnr_db(signal, error),
        "output_max_abs_error": worst,
    }
    if len(proposals) > 1:
        metrics["calibration_scores"] = {m: e[0] / max(e[1], 1e-30) for m, e in errors.items()}
    if layer.input_observer is not None:
        lo, hi = layer.input_observer.range()
        metrics.update(input_min=float(lo), input_max=float(hi))
    if layer.weight_multiplier is not None:
        metrics["weight_clipping_mean"] = float(layer.weight_multiplier.detach().float().mean())
    metrics.update(weight_error_metrics(layer.weight, layer.quantized_weight().dequantize(torch.float32)))
    return LayerReport(stats.name, layer.spec.format, "calibrated", metrics=metrics)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    config: CalibrationConfig | Mapping[str, Any] | None = None,
    recipe: QuantRecipe | Mapping[str, Any] | str | Path | None = None,
) -> QuantReport:
    """Set every prepared layer's activation range and (optionally) weight clipping from data, in place.

    Runs forward passes in eval mode with a progress bar; needs no labels. The method comes from
    ``config`` (or ``recipe.calibration``): ``minmax``, ``moving_average``, ``percentile``,
    ``mse``, ``entropy``, or ``auto`` (per layer, the method whose output on the calibration
    batches is closest to full precision). Without either, each layer uses the observer its recipe
    named (``activation.observer``) and no weight clipping. The ranges come from these batches
    only (earlier observer statistics are replaced). Under ``torch.distributed`` statistics and
    scores are all-reduced, so every rank ends with identical ranges and choices.

    Args:
        model: a prepared model.
        batches: any iterable of batches: a DataLoader, dicts for a transformers model, tensors
            or tuples for a plain module.
        num_batches: stop after this many batches (default: ``config.num_batches`` when a config
            or recipe is given, else all).
        config: a :class:`CalibrationConfig` or its dict.
        recipe: a recipe (or dict / YAML path) whose ``calibration`` section is used.

    Returns:
        A report with, per layer: the method chosen, input range, output SQNR (dB) and max abs
        error on the calibration inputs, weight SQNR and clipping.

    Raises:
        ValueError: an unprepared model, or no batches.
        QuantizationError: a batch that produced NaN/Inf activations, naming the layer.
        RecipeError: an invalid config, or both ``config`` and ``recipe``.

    Example:
        >>> from lightning_quant.api import prepare
        >>> model = nn.Sequential(nn.Linear(64, 64))
        >>> _ = prepare(model, {"weight": {"format": "nf4"}})
        >>> report = calibrate(model, [torch.randn(4, 64)], config={"method": "mse", "weight_clipping": True})
        >>> report.count("calibrated")
        1
    """
    resolved = _resolve_config(config, recipe)
    layers = fake_quant_layers(model)
    if not layers:
        raise ValueError("calibrate() needs a prepared model: call prepare(model, recipe) first")
    if num_batches is None and resolved is not None:
        num_batches = resolved.num_batches
    settings = resolved or CalibrationConfig()
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    seen = 0
    stats: list[_LayerStats] = []
    for name, layer in layers:
        method = resolved.method if resolved is not None else layer.spec.act_observer
        methods = OBSERVER_METHODS if method == "auto" else (method,)
        stats.append(_LayerStats(name, layer, methods, _candidate_observers(layer, methods, settings)))

    def check(layer: FakeQuantLinear, tensor: torch.Tensor, what: str) -> None:
        if not torch.isfinite(tensor).all():
            raise QuantizationError(
                f"layer `{layer.layer_name}`: calibration batch {seen + 1} {what} NaN/Inf activations; "
                "check the data and the model in full precision first"
            )

    def pre_hook(entry: _LayerStats):
        def hook(layer: FakeQuantLinear, args: tuple[Any, ...]) -> None:
            check(layer, args[0], "gave it")
            entry.record(args[0])

        return hook

    def post_hook(layer: FakeQuantLinear, args: tuple[Any, ...], output: torch.Tensor) -> None:
        check(layer, output, "made it output")

    hooks = []
    flags = {name: (layer.observer_enabled, layer.calibrating) for name, layer in layers}
    for entry in stats:
        hooks.append(entry.layer.register_forward_pre_hook(pre_hook(entry)))
        hooks.append(entry.layer.register_forward_hook(post_hook))
        # Inputs pass unquantized and the layer's own observer rests: the candidates observe.
        entry.layer.calibrating, entry.layer.observer_enabled = True, False
    was_training = model.training
    model.eval()
    try:
        total = num_batches
        if hasattr(batches, "__len__"):
            total = len(batches) if total is None else min(total, len(batches))  # type: ignore[arg-type]
        for batch in tqdm(batches, total=total, desc="calibrate", leave=False):
            if num_batches is not None and seen >= num_batches:
                break
            forward_batch(model, to_device(batch, device))
            seen += 1
    finally:
        for hook in hooks:
            hook.remove()
        for name, layer in layers:
            layer.observer_enabled, layer.calibrating = flags[name]
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate() got no batches; pass a non-empty DataLoader or list of batches")
    report = QuantReport("calibrate")
    for entry in stats:
        if not entry.samples:
            report.notes.append(f"`{entry.name}` was not called by the model's forward; left uncalibrated")
            continue
        report.layers.append(_finish_layer(entry, settings, seen))
    winners = sorted({line.metrics["calibration_method"] for line in report.layers})
    report.notes.append(f"calibrated on {seen} batches; methods chosen: {', '.join(winners)}")
    return report
