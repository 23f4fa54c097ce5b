"""Weight clipping for bitsandbytes formats: one multiplier in ``[lsq_min, 1]`` per scale group.

A multiplier ``m`` scales the absmax a group is quantized with (a 4-bit block, an int8 row), so
values beyond ``m * absmax`` saturate at the outermost code and everything inside gets a finer
grid. The converted bitsandbytes layer stores exactly those codes and scales (conversion stays
bit-exact), so the clipping is real, not simulated.

Each calibration method has a weight-side rule:
- ``minmax`` / ``moving_average``: no clipping (``None``).
- ``percentile``: the group's ``p``-th percentile of ``|w|`` over its absmax.
- ``mse``: per group, the candidate with the smallest quantization error, measured on the exact
  bitsandbytes grid: either the weight error ``||w - q(w)||**2`` or the output error
  ``(w - q(w))^T H (w - q(w))`` with ``H = X^T X`` of the calibration inputs (block-diagonal).
- ``entropy``: one multiplier for the layer, minimising the KL divergence between the histogram of
  the block-normalised weights and its quantized version (TensorRT's criterion on the code book).

Example:
    >>> from torch import nn
    >>> from lightning_quant.modules import FakeQuantLinear, LayerSpec
    >>> layer = FakeQuantLinear(nn.Linear(64, 4), LayerSpec("nf4"))
    >>> search_weight_clipping(layer, "mse").shape
    torch.Size([4])
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_quant.formats.fourbit import code_table
from lightning_quant.modules import FakeQuantLinear

__all__ = ["CLIPPING_STEPS", "group_errors", "input_hessian", "search_weight_clipping", "hessian_chunk"]

# Candidate multipliers per search: a 16-level code book gains little from a finer search.
CLIPPING_STEPS = 20


def hessian_chunk(layer: FakeQuantLinear) -> int:
    """Width of the diagonal blocks of ``X^T X`` kept for the output-error objective.

    4-bit blocks that lie inside one row get their exact block; otherwise the widest power of two
    up to 64 that divides ``in_features`` (1 = diagonal only).
    """
    in_features = layer.in_features
    if layer.spec.is_4bit and in_features % layer.spec.block_size == 0 and layer.spec.block_size <= 256:
        return layer.spec.block_size
    return next(c for c in (64, 32, 16, 8, 4, 2, 1) if in_features % c == 0)


def input_hessian(inputs: torch.Tensor, chunk: int) -> torch.Tensor:
    """Diagonal blocks ``[in / chunk, chunk, chunk]`` of ``X^T X`` for rows ``inputs [n, in]``."""
    rows = inputs.reshape(inputs.shape[0], -1, chunk).double()
    return torch.einsum("nkc,nkd->kcd", rows, rows)


def _per_group(contrib: torch.Tensor, layer: FakeQuantLinear) -> torch.Tensor:
    """Sum per-element contributions ``[out, in]`` over the layer's scale groups."""
    groups = layer.num_scale_groups()
    if groups == layer.out_features:
        return contrib.sum(dim=1)
    flat = contrib.reshape(-1)
    size = layer.spec.block_size
    pad = groups * size - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(groups, size).sum(dim=1)


def group_errors(
    layer: FakeQuantLinear, multiplier: torch.Tensor | None, hessian: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantization error of each scale group with this multiplier, on the exact bitsandbytes grid.

    Args:
        layer: a prepared layer.
        multiplier: per-group multiplier to try (None: no clipping).
        hessian: output-error weighting from :func:`input_hessian` (None: plain weight error).
    """
    storage = layer.quantized_weight(multiplier)
    weight = layer.weight.detach().float()
    delta = (weight - storage.dequantize(torch.float32)).double()
    if hessian is None:
        contrib = delta**2
    else:
        chunk = hessian.shape[-1]
        blocks = delta.reshape(delta.shape[0], -1, chunk)
        # d_i * (H d)_i summed over a chunk is that chunk's d^T H d.
        contrib = (blocks * torch.einsum("okc,kcd->okd", blocks, hessian.to(delta.device))).reshape_as(delta)
    return _per_group(contrib, layer)


def _grouped_abs(layer: FakeQuantLinear) -> torch.Tensor:
    """``|w|`` arranged ``[groups, group size]`` (a partial last block padded with zeros)."""
    weight = layer.weight.detach().float().abs()
    if layer.num_scale_groups() == layer.out_features:
        return weight
    flat = weight.reshape(-1)
    groups, size = layer.num_scale_groups(), layer.spec.block_size
    return torch.nn.functional.pad(flat, (0, groups * size - flat.numel())).view(groups, size)


def _percentile_multiplier(layer: FakeQuantLinear, percentile: float) -> torch.Tensor:
    grouped = _grouped_abs(layer)
    absmax = grouped.amax(dim=1).clamp(min=1e-30)
    return torch.quantile(grouped, percentile / 100.0, dim=1) / absmax


def _mse_multiplier(layer: FakeQuantLinear, hessian: torch.Tensor | None, steps: int) -> torch.Tensor:
    groups = layer.num_scale_groups()
    candidates = torch.linspace(layer.spec.lsq_min, 1.0, steps)
    best_error = torch.full((groups,), float("inf"), dtype=torch.float64, device=layer.weight.device)
    best = torch.ones(groups, device=layer.weight.device)
    # From 1 downwards, so that a tie keeps the wider (unclipped) range.
    for value in candidates.flip(0).tolist():
        multiplier = torch.full((groups,), value, device=layer.weight.device)
        error = group_errors(layer, multiplier, hessian)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, multiplier, best)
    return best


def _levels(layer: FakeQuantLinear) -> np.ndarray:
    if layer.spec.is_4bit:
        return np.sort(code_table(layer.spec.format).numpy().astype(np.float64))
    return np.arange(-127, 128, dtype=np.float64) / 127.0


def _entropy_multiplier(layer: FakeQuantLinear, steps: int, bins: int = 2048) -> torch.Tensor:
    """One multiplier for the layer: the smallest KL(P || Q) on the block-normalised weights."""
    grouped = _grouped_abs(layer)
    signed = layer.weight.detach().float()
    if layer.num_scale_groups() != layer.out_features:
        flat = signed.reshape(-1)
        signed = torch.nn.functional.pad(flat, (0, grouped.numel() - flat.numel())).view_as(grouped)
    normalised = (signed / grouped.amax(dim=1, keepdim=True).clamp(min=1e-30)).reshape(-1).cpu().numpy()
    hist, edges = np.histogram(normalised, bins=bins, range=(-1.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    levels = _levels(layer)
    midpoints = (levels[:-1] + levels[1:]) / 2
    nonzero = hist > 0
    best, best_kl = 1.0, float("inf")
    for value in np.linspace(layer.spec.lsq_min, 1.0, steps):
        inside = np.abs(centers) <= value
        level = np.searchsorted(midpoints, np.clip(centers / value, -1, 1))
        # P: clipped tails folded into the outermost bins kept; Q: each level's mass spread evenly
        # over its non-empty bins (tails excluded, which is what penalises clipping).
        reference = np.where(inside, hist, 0.0)
        kept = np.flatnonzero(inside)
        reference[kept[0]] += hist[centers < -value].sum()
        reference[kept[-1]] += hist[centers > value].sum()
        mass = np.bincount(level[inside], hist[inside], levels.size)
        count = np.bincount(level[inside], nonzero[inside], levels.size)
        quantized = np.where(inside & nonzero, mass[level] / np.maximum(count[level], 1), 0.0)
        p = reference / reference.sum()
        q = quantized / max(quantized.sum(), 1e-300)
        q = np.where((q == 0) & (p > 0), 1e-4 / q.size, q)
        mask = p > 0
        kl = float((p[mask] * np.log(p[mask] / q[mask])).sum())
        if kl < best_kl - 1e-12:
            best, best_kl = float(value), kl
    return torch.full((layer.num_scale_groups(),), best, device=layer.weight.device)


@torch.no_grad()
def search_weight_clipping(
    layer: FakeQuantLinear,
    method: str,
    *,
    percentile: float = 99.99,
    hessian: torch.Tensor | None = None,
    steps: int = CLIPPING_STEPS,
) -> torch.Tensor | None:
    """The clipping multiplier per scale group that a calibration method chooses for ``layer``.

    Args:
        layer: a prepared layer (4-bit: one group per block; int8: one per row).
        method: ``minmax``, ``moving_average``, ``percentile``, ``mse`` or ``entropy``.
        percentile: for ``percentile``.
        hessian: for ``mse``: block-diagonal ``X^T X`` (:func:`input_hessian`) to minimise the
            output error; None minimises the weight error.
        steps: candidate multipliers between ``lsq_min`` and 1.

    Returns:
        float32 multipliers clamped to ``[lsq_min, 1]``, or None (no clipping).

    Raises:
        ValueError: an unknown method.
    """
    if method in ("minmax", "moving_average"):
        return None
    if method == "percentile":
        multiplier = _percentile_multiplier(layer, percentile)
    elif method == "mse":
        multiplier = _mse_multiplier(layer, hessian, steps)
    elif method == "entropy":
        multiplier = _entropy_multiplier(layer, steps)
    else:
        raise ValueError(
            f"`calibration.method` must be one of minmax, moving_average, percentile, mse, entropy; got {method!r}"
        )
    return multiplier.float().clamp(layer.spec.lsq_min, 1.0)
