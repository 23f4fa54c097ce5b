"""Calibration: forward passes that let observers record ranges, with no labels needed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_quant.modules import FakeQuantLinear, QuantizationError
from lightning_quant.report import LayerReport, QuantReport

__all__ = ["calibrate", "fake_quant_layers", "forward_batch", "to_device"]


def fake_quant_layers(model: nn.Module) -> list[tuple[str, FakeQuantLinear]]:
    """Every prepared layer of ``model`` with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


def forward_batch(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        # Calibration needs no labels; passing them would only make the model compute a loss.
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        return model(**inputs)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None) -> QuantReport:
    """Run forward passes so observers record activation ranges; needs no labels.

    Args:
        model: a prepared model.
        batches: any iterable of batches: a DataLoader, dicts for a transformers model, tensors
            or tuples for a plain module.
        num_batches: stop after this many batches (default: all).

    Raises:
        ValueError: an unprepared model, or no batches.
        QuantizationError: a batch that produced NaN/Inf activations, naming the layer.
    """
    layers = fake_quant_layers(model)
    if not layers:
        raise ValueError("calibrate() needs a prepared model: call prepare(model, recipe) first")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seen = 0

    def check_inputs(layer: FakeQuantLinear, args: tuple[Any, ...]) -> None:
        if not torch.isfinite(args[0]).all():
            raise QuantizationError(
                f"layer `{layer.layer_name}`: calibration batch {seen + 1} produced NaN/Inf inputs; "
                "check the data and the model in full precision first"
            )

    hooks = [layer.register_forward_pre_hook(check_inputs) for _, layer in layers]
    for _, layer in layers:
        layer.calibrating = True
        layer.observer_enabled = True
    try:
        for batch in tqdm(batches, total=num_batches, desc="calibrate", leave=False):
            if num_batches is not None and seen >= num_batches:
                break
            forward_batch(model, to_device(batch, device))
            seen += 1
    finally:
        for hook in hooks:
            hook.remove()
        for _, layer in layers:
            layer.calibrating = False
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate() got no batches; pass a non-empty DataLoader or list of batches")
    report = QuantReport("calibrate")
    for name, layer in layers:
        metrics: dict[str, Any] = {"calibration_batches": seen}
        if layer.input_observer is not None:
            layer.input_observer.sync()
            lo, hi = layer.input_observer.range()
            metrics.update(
                input_min=float(lo), input_max=float(hi), calibration_method=layer.spec.act_observer
            )
        report.layers.append(LayerReport(name, layer.spec.format, "calibrated", metrics=metrics))
    return report
