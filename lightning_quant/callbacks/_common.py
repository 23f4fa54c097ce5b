"""Small pieces the Lightning callbacks share: state keys, logging, per-layer stats, calibration data."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_quant.config import QuantRecipe
from lightning_quant.formats.fourbit import FourBitWeight, num_blocks
from lightning_quant.modules import FakeQuantLinear
from lightning_quant.rules import plan_layers

__all__ = [
    "recipe_digest",
    "log_metrics",
    "layer_stats",
    "distributed",
    "calibration_dataloader",
    "unprepared_layers",
]

DATALOADERS = ("train", "val")


def recipe_digest(recipe: QuantRecipe) -> str:
    """A short, stable digest of a recipe, for ``state_key`` (the full recipe would make an unwieldy key)."""
    text = json.dumps(recipe.to_dict(), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Send ``metrics`` to every attached logger at the current optimizer step (as ``LearningRateMonitor`` does)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


@torch.no_grad()
def layer_stats(layer: FakeQuantLinear) -> dict[str, float]:
    """Per-layer quantization numbers: SQNR of the stored weight, its mean scale, the share of clipped weights.

    ``clip_fraction`` counts weights beyond the range the (learned or calibrated) multiplier keeps; ``scale`` is
    the mean absmax per scale group that the deployed layer multiplies by.
    """
    weight = layer.weight.detach().float()
    storage = layer.quantized_weight()
    dequantized = storage.dequantize(torch.float32)
    noise = (weight - dequantized).pow(2).sum()
    signal = weight.pow(2).sum()
    sqnr = float("inf") if noise == 0 else float(10 * torch.log10(signal / noise))
    if isinstance(storage, FourBitWeight):
        scales = storage.scales().float()
        group_absmax = _block_absmax(weight, layer.spec.block_size)
    else:
        scales = storage.SCB.float()
        group_absmax = weight.abs().amax(dim=1)
    # A weight is clipped when its group's stored scale is below its magnitude.
    per_element_limit = _expand(scales, weight, storage)
    clipped = (weight.abs() > per_element_limit * (1 + 1e-6)).float().mean()
    stats = {
        "sqnr_db": sqnr,
        "scale": float(scales.mean()),
        "clip_fraction": float(clipped),
        "clip_ratio": float((scales / group_absmax.clamp_min(1e-12)).mean()),
    }
    observer = layer.input_observer
    if observer is not None and observer.has_data:
        lo, hi = observer.range()
        stats.update(input_min=float(lo), input_max=float(hi))
    return stats


def _block_absmax(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = weight.reshape(-1)
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    return torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, block_size).amax(dim=1)


def _expand(scales: torch.Tensor, weight: torch.Tensor, storage: Any) -> torch.Tensor:
    if isinstance(storage, FourBitWeight):
        block = storage.blocksize
        return scales.repeat_interleave(block)[: weight.numel()].view_as(weight)
    return scales.unsqueeze(1).expand_as(weight)


def calibration_dataloader(trainer: pl.Trainer, pl_module: pl.LightningModule, source: str) -> Iterable[Any]:
    """The ``train`` or ``val`` dataloader: the one the trainer holds, else the datamodule's or module's hook.

    Raises:
        ValueError: when no such dataloader can be found, naming what to pass.
    """
    if source == "train":
        loader: Any = trainer.train_dataloader
    else:
        loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
    hook = f"{source}_dataloader"
    if loader is None:
        datamodule = getattr(trainer, "datamodule", None)  # a property Lightning adds at runtime
        owners = [datamodule, pl_module] if datamodule is not None else [pl_module]
        for owner in owners:
            if is_overridden(hook, owner):
                loader = getattr(owner, hook)()
                break
    if loader is None:
        raise ValueError(
            f"`dataloader={source!r}`: the trainer holds no {source} dataloader at this point and neither the "
            f"datamodule nor the LightningModule defines `{hook}()`; define it, or pick the other dataloader"
        )
    return loader  # type: ignore[no-any-return]


def unprepared_layers(model: torch.nn.Module, recipe: QuantRecipe) -> list[str]:
    """Names of plain ``nn.Linear`` layers the recipe would quantize (not yet prepared or converted)."""
    with warnings.catch_warnings():
        # A rule that matches nothing was already reported by prepare().
        warnings.simplefilter("ignore")
        plans = plan_layers(model, recipe)
    return [p.name for p in plans if p.spec is not None and not isinstance(p.module, FakeQuantLinear)]
