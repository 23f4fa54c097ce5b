"""The verbs: ``prepare``, ``calibrate``, ``convert`` and ``quantize`` (PTQ in one call).

Each changes the model in place and returns a :class:`~lightning_quant.report.QuantReport`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    >>> report = prepare(model, {"weight": {"format": "nf4"}})
    >>> report.count("fake_quant")
    2
    >>> _ = convert(model)
    >>> type(model[0]).__name__
    'Linear4bit'
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.calibration import calibrate, fake_quant_layers
from lightning_quant.config import QuantRecipe
from lightning_quant.formats.fourbit import FourBitWeight
from lightning_quant.modules import FakeQuantLinear, replace_module
from lightning_quant.report import LayerReport, QuantReport, weight_error_metrics
from lightning_quant.rules import blocks_straddle_rows, plan_layers
from lightning_quant.sensitivity import storage_nbytes

__all__ = [
    "prepare",
    "calibrate",
    "convert",
    "quantize",
    "fake_quant_layers",
    "set_fake_quant",
    "set_observers",
]


RecipeLike = QuantRecipe | dict[str, Any] | str | Path


def _layer_bytes(module: nn.Module) -> int:
    tensors = [getattr(module, "weight", None), getattr(module, "bias", None)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization of every prepared layer on or off (the training schedule's knob)."""
    for _, layer in fake_quant_layers(model):
        layer.fake_quant_enabled = enabled


def set_observers(model: nn.Module, enabled: bool) -> None:
    """Let activation observers update (True) or freeze them (False)."""
    for _, layer in fake_quant_layers(model):
        layer.observer_enabled = enabled


def prepare(model: nn.Module, recipe: RecipeLike) -> QuantReport:
    """Swap matching ``nn.Linear`` layers for :class:`FakeQuantLinear`, in place.

    Everything is validated before the first module is touched. Layers already prepared are left
    as they are (so preparing twice, or fitting twice, is harmless).

    Args:
        model: any ``nn.Module``.
        recipe: a :class:`QuantRecipe`, a dict, or a YAML path.

    Returns:
        A report with one line per linear layer: quantized (and how) or kept (and why).

    Raises:
        RecipeError: an invalid recipe, or (strict recipes) a rule that matches nothing.
        QuantizationError: a layer with NaN/Inf weights, named.
    """
    recipe = QuantRecipe.coerce(recipe)
    plans = plan_layers(model, recipe)
    report = QuantReport("prepare")
    for plan in plans:
        if plan.spec is None:
            size = _layer_bytes(plan.module)
            report.layers.append(LayerReport(plan.name, "keep", "kept", plan.reason, size, size))
            continue
        if not isinstance(plan.module, FakeQuantLinear):
            assert isinstance(plan.module, nn.Linear)
            replace_module(model, plan.name, FakeQuantLinear(plan.module, plan.spec, plan.name))
        action = "already_prepared" if isinstance(plan.module, FakeQuantLinear) else "fake_quant"
        size = _layer_bytes(plan.module)
        # Bytes the converted layer will store: its weight as quantized plus the bias as it is.
        weight = plan.module.weight
        stored = storage_nbytes(plan.spec, weight.shape, size - weight.numel() * weight.element_size())
        report.layers.append(LayerReport(plan.name, plan.spec.format, action, plan.reason, size, stored))
    if not any(plan.spec is not None for plan in plans):
        report.notes.append("no layer was prepared: no nn.Linear matched the recipe")
    return report


def convert(model: nn.Module) -> QuantReport:
    """Swap every :class:`FakeQuantLinear` for a real bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, in place.

    The bitsandbytes layer stores exactly the codes and scales the fake quantizer computed, so in
    eval mode it returns what the prepared model returned (bit for bit for 4-bit).

    Raises:
        ValueError: a model with no prepared layers.
        QuantizationError: a layer whose weight became NaN/Inf during training, named.
    """
    from lightning_quant._bnb import bnb_dequantized_weight, build_bnb_linear

    layers = fake_quant_layers(model)
    if not layers:
        raise ValueError("convert() needs a prepared model: call prepare(model, recipe) first")
    # Quantize every layer before replacing any, so a bad layer leaves the model untouched.
    built = [(name, layer, *build_bnb_linear(layer)) for name, layer in layers]
    report = QuantReport("convert")
    for name, layer, module, storage in built:
        dequantized = storage.dequantize(torch.float32)
        metrics = weight_error_metrics(layer.weight, dequantized)
        if isinstance(storage, FourBitWeight):
            cpu_kernel_wrong = blocks_straddle_rows(layer.weight.shape, layer.spec.block_size)
            if cpu_kernel_wrong:
                report.notes.append(f"`{name}`: block size {layer.spec.block_size} crosses weight rows; run it on CUDA")
            if not cpu_kernel_wrong or layer.weight.is_cuda:
                gap = (bnb_dequantized_weight(module).float() - dequantized).abs().max()
                metrics["conversion_max_abs_diff"] = float(gap)
        if layer.spec.activation == "static":
            report.notes.append(
                f"`{name}`: static activation quantization was simulated only; bitsandbytes has no such kernel"
            )
        bias_bytes = 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
        report.layers.append(
            LayerReport(
                name,
                layer.spec.format,
                "converted",
                bytes_before=_layer_bytes(layer),
                bytes_after=storage.nbytes() + bias_bytes,
                metrics=metrics,
            )
        )
        replace_module(model, name, module)
    return report


def quantize(
    model: nn.Module,
    recipe: RecipeLike,
    calibration_data: Iterable[Any] | None = None,
    num_batches: int | None = None,
) -> QuantReport:
    """Post-training quantization in one call: prepare, calibrate (if data is given), convert.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(64, 64))
        >>> quantize(model, {"weight": {"format": "int8"}}).count("converted")
        1
    """
    recipe = QuantRecipe.coerce(recipe)
    report = prepare(model, recipe)
    if calibration_data is not None:
        batches = num_batches if num_batches is not None else recipe.calibration.num_batches
        report = report.merge(calibrate(model, calibration_data, batches, config=recipe.calibration))
    return report.merge(convert(model), stage="quantize")
