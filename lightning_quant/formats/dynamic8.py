"""bitsandbytes' signed 8-bit dynamic code, used to double-quantize the 4-bit absmax.

Reference: Dettmers, "8-Bit Approximations for Parallelism in Deep Learning" (the dynamic tree
code); QLoRA (double quantization of the 4-bit absmax with this code, in blocks of 256).

The code *values* are built here (and tested equal to bitsandbytes' table). The choice of code
index is delegated to bitsandbytes' own ``quantize_blockwise``: its CPU kernel uses a bucketed
search that does not always return the nearest entry (measured: about 5 % of uniformly spread
inputs land 1-4 entries away), so only calling the kernel reproduces its storage bit for bit.
The dequantization that the deployed layer runs (``code[q] * absmax``) is computed here.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = ["NESTED_BLOCK_SIZE", "dynamic_code", "quantize_blockwise_dynamic", "dequantize_blockwise_dynamic"]

# bitsandbytes double-quantizes the 4-bit absmax in blocks of 256 (its only supported nested size).
NESTED_BLOCK_SIZE = 256


@cache
def _dynamic_code_cpu() -> torch.Tensor:
    values: list[float] = [0.0, 1.0]
    exponent_bits = 7
    for i in range(exponent_bits):
        # Each exponent step holds twice as many evenly spaced fractions as the one before.
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        magnitude = 10 ** (-(exponent_bits - 1) + i)
        values += (magnitude * mids).tolist()
        values += (-magnitude * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry signed dynamic code, sorted, as stored in bitsandbytes' quantization state."""
    return _dynamic_code_cpu().to(device, copy=True)


def quantize_blockwise_dynamic(
    values: torch.Tensor, blocksize: int = NESTED_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a flat float32 tensor to 8-bit dynamic codes per block, as bitsandbytes stores them.

    Returns:
        ``(codes uint8 [n], absmax float32 [blocks])``.
    """
    from bitsandbytes.functional import quantize_blockwise

    flat = values.reshape(-1).float().contiguous()
    codes, state = quantize_blockwise(flat, code=dynamic_code(flat.device), blocksize=blocksize)
    return codes, state.absmax


def dequantize_blockwise_dynamic(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCK_SIZE
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_dynamic` (``code[q] * absmax`` in float32)."""
    n = codes.numel()
    code = dynamic_code(codes.device)
    return code[codes.long()] * absmax.repeat_interleave(blocksize)[:n]
