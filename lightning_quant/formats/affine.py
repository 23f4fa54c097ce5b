"""Static per-tensor affine int8 fake quantization for activations (a simulation: bitsandbytes
has no static-activation kernel). Reference: Jacob et al. 2018, integer-arithmetic-only inference.
"""

from __future__ import annotations

import torch

__all__ = ["affine_qparams", "fake_quantize_affine"]


def affine_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, signed: bool = True, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale and zero point that map ``[min_val, max_val]`` onto int8 (or uint8).

    The range always includes 0 so that zero (padding, ReLU output) is represented exactly.

    Returns:
        ``(scale float32, zero_point int32, quant_min, quant_max)``.

    Example:
        >>> scale, zp, qmin, qmax = affine_qparams(torch.tensor(-1.0), torch.tensor(3.0))
        >>> qmin, qmax, int(zp)
        (-128, 127, -64)
    """
    qmin, qmax = (-128, 127) if signed else (0, 255)
    lo = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    hi = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        bound = torch.maximum(-lo, hi)
        scale = (2 * bound / (qmax - qmin)).clamp(min=eps)
        zero_point = torch.full_like(scale, 0 if signed else 128, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point, qmin, qmax


def fake_quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int
) -> torch.Tensor:
    """Quantize-dequantize ``x``; the gradient is straight through inside the range, zero outside."""
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), quant_min, quant_max)
