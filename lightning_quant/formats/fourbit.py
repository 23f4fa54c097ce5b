"""NF4 / FP4 block-wise weights exactly as bitsandbytes stores and dequantizes them.

References: QLoRA (Dettmers et al. 2023) for NF4, block-wise absmax and double quantization;
bitsandbytes' CPU backend for the arithmetic reproduced here: each block is scaled by the
*reciprocal* of its absmax (the last, partial block by a division), clamped to [-1, 1], and
rounded to the code entry whose midpoint interval holds it (a value exactly on a midpoint goes
to the lower entry). Dequantization is ``code[q] * absmax`` in float32.

A learned per-block multiplier ``s`` in (0, 1] (LSQ or a calibrated clipping ratio) scales the
absmax: it only ever tightens the range, so the largest weight of a block still lands on code
+-1 and the stored layer reproduces ``code[q] * s * absmax`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from lightning_quant.formats.dynamic8 import (
    NESTED_BLOCK_SIZE,
    dequantize_blockwise_dynamic,
    quantize_blockwise_dynamic,
)

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "FourBitWeight",
    "code_table",
    "quantize_4bit",
    "fake_quantize_4bit",
]

# NormalFloat4: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, appendix E).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in bitsandbytes' bit order, before
# normalisation by its largest magnitude (12).
FP4_CODE = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# Smallest absmax bitsandbytes divides by (keeps all-zero blocks finite).
_TINY = 1e-38
# Below this absmax, ``1 / absmax`` overflows float32 and a zero weight in the block becomes NaN.
_MIN_INVERTIBLE = 1.0 / torch.finfo(torch.float32).max


@cache
def _tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if quant_type == "nf4":
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
    elif quant_type == "fp4":
        raw = torch.tensor(FP4_CODE, dtype=torch.float32)
        code = raw / raw.abs().max()
    else:
        raise ValueError(f"`quant_type` must be one of nf4, fp4; got {quant_type!r}")
    # Stable order keeps +0 (entry 0) before -0 (entry 8) for FP4, as bitsandbytes' argsort does.
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    return code, order, midpoints


# Cells per unit of the lookup grid over [-1, 1]: narrower than the closest midpoints (FP4's, 1/384
# apart), so a cell holds at most one midpoint and one comparison finishes the search.
_GRID = 1024


@cache
def _lookup(quant_type: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Lookup tables per grid cell: sorted entries below it, the midpoint inside it (+inf if none),
    the code order, and the code values below and above that midpoint.

    Cell ``k`` covers ``[(k - G - 1/2) / G, (k - G + 1/2) / G)`` for ``G = _GRID``. The grid is built
    so that no midpoint lies within 1e-6 of a cell edge, far more than float32 rounding moves a
    value's cell (1.2e-7): a value put in a neighbouring cell still gets the same count.
    """
    code, order, midpoints = _tables(quant_type)
    mids = midpoints.double()
    lower = (torch.arange(2 * _GRID + 1, dtype=torch.float64) - _GRID - 0.5) / _GRID
    edges = torch.cat([lower, lower[-1:] + 1.0 / _GRID])
    if (mids.unsqueeze(0) - edges.unsqueeze(1)).abs().min() < 1e-6:
        raise AssertionError(f"a {quant_type} midpoint lies on the lookup grid; change _GRID")
    inside = (mids.unsqueeze(0) > lower.unsqueeze(1)) & (mids.unsqueeze(0) < lower.unsqueeze(1) + 1.0 / _GRID)
    if int(inside.sum(dim=1).max()) > 1:
        raise AssertionError(f"two {quant_type} midpoints share a lookup cell; raise _GRID")
    below = (mids.unsqueeze(0) < lower.unsqueeze(1)).sum(dim=1)
    threshold = torch.full((lower.numel(),), float("inf"), dtype=torch.float32)
    has = inside.any(dim=1)
    threshold[has] = midpoints[inside[has].float().argmax(dim=1)]
    ordered = code[order]
    value_below, value_above = ordered[below.clamp(max=15)], ordered[(below + 1).clamp(max=15)]
    # Entry 2k: cell k's value below its midpoint; 2k + 1: above it (one gather per weight).
    pairs = torch.stack([value_below, value_above], dim=1).reshape(-1)
    return tuple(t.to(device) for t in (below, threshold, order, pairs))


def _code_index(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Index into the *sorted* code of each value of ``scaled`` (finite, in [-1, 1]).

    Equals ``torch.bucketize(scaled, midpoints)`` (a value on a midpoint takes the lower entry), in
    a few vectorised passes instead of a per-element binary search.
    """
    below, threshold = _lookup(quant_type, scaled.device)[:2]
    cell = _cell(scaled)
    return below.index_select(0, cell).add_(scaled > threshold.index_select(0, cell))


def _code_values(scaled: torch.Tensor, quant_type: str, cell: torch.Tensor | None = None) -> torch.Tensor:
    """``sorted_code[_code_index(scaled)]`` without the index: two table reads.

    ``cell`` may be given when it was computed along the way (see :func:`_cell_of_weights`).
    """
    _, threshold, _, pairs = _lookup(quant_type, scaled.device)
    cell = _cell(scaled) if cell is None else cell
    above = scaled > threshold.index_select(0, cell)
    return pairs.index_select(0, torch.add(above, cell, alpha=2))


# Block absmax from which ``_GRID / absmax`` is finite; smaller ones take the general path.
_MIN_FAST_ABSMAX = 1e-30


def _cell_of_weights(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor | None:
    """Grid cells of ``flat / absmax`` in one fused pass, or None where the general path is needed.

    ``w * (G / absmax) + G + 1/2`` differs from :func:`_cell`'s ``(w * (1 / absmax)) * G + G + 1/2``
    by a few float32 ulps (< 5e-7 in units of the scaled weight), well inside the 1e-6 the grid
    keeps between cell edges and midpoints, so it gives the same codes. Needs whole blocks, no
    clipping (``|w / absmax| <= 1`` up to rounding keeps the cell in range) and invertible absmax.
    """
    if flat.numel() % blocksize or not bool((absmax >= _MIN_FAST_ABSMAX).all()):
        return None
    factor = (_GRID / absmax).view(-1, 1)
    offset = torch.full((), _GRID + 0.5, device=flat.device)
    return torch.addcmul(offset, flat.view(-1, blocksize), factor).view(-1).to(torch.int32)


def _cell(scaled: torch.Tensor) -> torch.Tensor:
    # >= 0.5, so truncation is floor; int32 indices halve the memory traffic of int64 ones.
    return (scaled * _GRID).add_(_GRID + 0.5).to(torch.int32)


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 code values of ``nf4`` or ``fp4`` indexed by their 4-bit code (a fresh copy)."""
    return _tables(quant_type)[0].to(device, copy=True)


@dataclass
class FourBitWeight:
    """A weight in bitsandbytes' 4-bit storage (codes unpacked, one per element).

    Attributes:
        codes: uint8 code per element, flattened in row-major order.
        absmax: float32 absmax per block (already multiplied by any learned multiplier).
        shape: the weight's shape.
        quant_type: ``nf4`` or ``fp4``.
        blocksize: elements per block.
        nested_codes / nested_absmax / offset: the double-quantized absmax (None without it).
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    quant_type: str
    blocksize: int
    nested_codes: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_codes is not None

    def scales(self) -> torch.Tensor:
        """Per-block absmax the dequantization multiplies by (after double quantization)."""
        if self.nested_codes is None:
            return self.absmax
        assert self.nested_absmax is not None and self.offset is not None
        return dequantize_blockwise_dynamic(self.nested_codes, self.nested_absmax) + self.offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``code[q] * absmax`` in float32, reshaped, then cast to ``dtype`` (bitsandbytes' order)."""
        values = code_table(self.quant_type, self.codes.device)[self.codes.long()]
        return _per_block(values, self.scales(), self.blocksize, torch.mul).view(self.shape).to(dtype)

    def packed(self) -> torch.Tensor:
        """Two codes per byte, first in the high nibble, shape ``[(n + 1) // 2, 1]`` (bitsandbytes' layout)."""
        codes = self.codes
        if codes.numel() % 2:
            # bitsandbytes pads with a quantized 0.0 before packing.
            zero_code = int(quantize_4bit(torch.zeros(1), self.quant_type, self.blocksize).codes[0])
            codes = torch.nn.functional.pad(codes, (0, 1), value=zero_code)
        return ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)

    def nbytes(self) -> int:
        """Bytes the deployed layer stores for this weight (codes and statistics)."""
        size = (self.codes.numel() + 1) // 2
        if self.nested_codes is None:
            return size + 4 * self.absmax.numel()
        assert self.nested_absmax is not None
        return size + self.nested_codes.numel() + 4 * self.nested_absmax.numel() + 4


def _per_block(values: torch.Tensor, per_block: torch.Tensor, blocksize: int, op) -> torch.Tensor:
    """Apply ``op(block_values, block_scalar)`` to full blocks and the partial tail separately."""
    n = values.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    head = op(values[:full].view(blocks, blocksize), per_block[:blocks].view(-1, 1)).reshape(-1)
    if full == n:
        return head
    return torch.cat([head, op(values[full:], per_block[blocks])])


def _block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    # max(amax, -amin): no |w| copy; abs_ turns an all-(-0.0) block's -0.0 into the +0 bitsandbytes stores.
    absmax = blocks.amax(dim=1).maximum(blocks.amin(dim=1).neg()).abs_()
    if full < n:
        # bitsandbytes stores the partial block's absmax after clamping it away from zero.
        absmax = torch.cat([absmax, flat[full:].abs().amax().clamp(min=_TINY).unsqueeze(0)])
    return absmax


def num_blocks(numel: int, blocksize: int) -> int:
    """Blocks a tensor of ``numel`` elements occupies."""
    return -(-numel // blocksize)


def _normalise(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Weights divided by their block absmax, the way bitsandbytes computes it (not yet clamped)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    head = flat[:full].view(blocks, blocksize) * (1.0 / absmax[:blocks].clamp(min=_TINY).view(-1, 1))
    if full == n:
        return head.reshape(-1)
    tail = flat[full:] / absmax[blocks].clamp(min=_TINY)
    return torch.cat([head.reshape(-1), tail])


def _scale_blocks_(values: torch.Tensor, per_block: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values * per_block`` block by block, in place (same rounding as :func:`_per_block` with mul)."""
    n = values.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    values[:full].view(blocks, blocksize).mul_(per_block[:blocks].view(-1, 1))
    if full < n:
        values[full:].mul_(per_block[blocks])
    return values


def _scaled_weight(
    weight: torch.Tensor, blocksize: int, multiplier: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block absmax (times ``multiplier``), the weights divided by it (not yet clamped), and the
    flat float32 weights they came from."""
    flat = weight.detach().reshape(-1).float()
    absmax = _block_absmax(flat, blocksize)
    if not torch.isfinite(absmax).all():
        raise ValueError("weight contains NaN or Inf; cannot quantize it")
    if multiplier is not None:
        absmax = absmax * multiplier.detach().float()
    return absmax, _normalise(flat, absmax, blocksize), flat


def _clamp_(scaled: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] in place; where ``1 / absmax`` overflowed, NaN (0 * inf) goes to code +1 as in bitsandbytes."""
    scaled.clamp_(-1, 1)
    if bool((absmax.clamp(min=_TINY) < _MIN_INVERTIBLE).any()):
        scaled.nan_to_num_(nan=1.0)
    return scaled


def quantize_4bit(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    multiplier: torch.Tensor | None = None,
) -> FourBitWeight:
    """Quantize ``weight`` to bitsandbytes' 4-bit storage.

    Args:
        weight: any shape; flattened row-major into blocks of ``blocksize``.
        quant_type: ``nf4`` or ``fp4``.
        blocksize: elements per block.
        double_quant: quantize the absmax with the 8-bit dynamic code (bitsandbytes
            ``compress_statistics``).
        multiplier: optional per-block factor in (0, 1] applied to the absmax (clipping).

    Raises:
        ValueError: non-finite weights.

    Example:
        >>> w = torch.randn(8, 64)
        >>> q = quantize_4bit(w, "nf4", 64)
        >>> q.dequantize().shape
        torch.Size([8, 64])
    """
    absmax, scaled, _ = _scaled_weight(weight, blocksize, multiplier)
    order = _lookup(quant_type, scaled.device)[2]
    codes = order.index_select(0, _code_index(_clamp_(scaled, absmax), quant_type)).to(torch.uint8)
    result = FourBitWeight(codes, absmax, weight.shape, quant_type, blocksize)
    if double_quant:
        result.nested_codes, result.nested_absmax, result.offset = _double_quantize(absmax)
    return result


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The absmax minus its mean, in the 8-bit dynamic code: ``(codes, nested absmax, offset)``."""
    offset = absmax.mean()
    codes, nested_absmax = quantize_blockwise_dynamic(absmax - offset, NESTED_BLOCK_SIZE)
    return codes, nested_absmax, offset


class _FakeQuant4bit(torch.autograd.Function):
    """Forward: the exact dequantized weight. Backward: the chosen estimator.

    The forward goes straight from the scaled weight to code values (no code indices, no second
    lookup) and keeps for the backward only what the estimator reads: nothing for ``ste``, the
    in-range mask for ``clipped_ste``, and the mask and ``code[q] - x`` for ``lsq``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        weight: torch.Tensor,
        multiplier: torch.Tensor | None,
        quant_type: str,
        blocksize: int,
        double_quant: bool,
        estimator: str,
        min_multiplier: float,
    ) -> torch.Tensor:
        clamped = None if multiplier is None else multiplier.clamp(min_multiplier, 1.0)
        absmax, scaled, flat = _scaled_weight(weight, blocksize, clamped)
        inside = scaled.abs() <= 1.0 if estimator != "ste" else None
        cell = None
        if clamped is None:
            # Unclipped weights need no clamp (|w / absmax| <= 1 but for rounding) when the fused
            # cell computation applies; otherwise the general path below clamps.
            cell = _cell_of_weights(flat, absmax, blocksize)
        if cell is None:
            _clamp_(scaled, absmax)
        values = _code_values(scaled, quant_type, cell)
        ctx.estimator, ctx.blocksize, ctx.has_multiplier = estimator, blocksize, multiplier is not None
        if inside is not None and clamped is not None:
            # LSQ (Esser et al. 2019) for a code book: d(code[q] * a)/da = code[q] - x inside the
            # range and code[+-1] outside (``scaled`` is x inside and +-1 outside after the clamp).
            lsq_term = torch.where(inside, values - scaled, values)
            ctx.save_for_backward(inside, lsq_term, absmax, clamped)
        elif inside is not None:
            ctx.save_for_backward(inside)
        if double_quant:
            nested_codes, nested_absmax, offset = _double_quantize(absmax)
            absmax = dequantize_blockwise_dynamic(nested_codes, nested_absmax) + offset
        return _scale_blocks_(values, absmax, blocksize).view(weight.shape).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if ctx.estimator == "ste":
            return grad, None, None, None, None, None, None
        inside = ctx.saved_tensors[0]
        grad_flat = grad.reshape(-1).float()
        grad_weight = (grad_flat * inside).view_as(grad).to(grad.dtype)
        grad_multiplier = None
        if ctx.has_multiplier:
            _, lsq_term, absmax, clamped = ctx.saved_tensors
            per_block = _block_sum(grad_flat * lsq_term, ctx.blocksize)
            raw_absmax = absmax / clamped
            # Gradient scale 1/sqrt(block elements * levels per side), as the paper prescribes.
            scale = (ctx.blocksize * 7) ** -0.5
            grad_multiplier = (per_block * raw_absmax * scale).to(clamped.dtype)
        return grad_weight, grad_multiplier, None, None, None, None, None


def _block_sum(values: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    full = n - n % blocksize
    sums = values[:full].view(-1, blocksize).sum(dim=1)
    if full < n:
        sums = torch.cat([sums, values[full:].sum().unsqueeze(0)])
    return sums


def fake_quantize_4bit(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    multiplier: torch.Tensor | None = None,
    estimator: str = "ste",
    min_multiplier: float = 0.25,
) -> torch.Tensor:
    """Differentiable fake quantization whose value equals bitsandbytes' dequantized weight bit for bit.

    Args:
        weight: the full-precision weight.
        quant_type / blocksize / double_quant: the storage format.
        multiplier: per-block learned or calibrated factor on the absmax, clamped to
            ``[min_multiplier, 1]`` (gradient passes straight through the clamp).
        estimator: ``ste``, ``clipped_ste`` or ``lsq`` (``lsq`` needs ``multiplier``).

    Example:
        >>> w = torch.randn(4, 64, requires_grad=True)
        >>> fake_quantize_4bit(w, "nf4").sum().backward()
        >>> bool((w.grad == 1).all())
        True
    """
    if estimator == "lsq" and multiplier is None:
        raise ValueError("estimator `lsq` needs a per-block `multiplier` tensor")
    result = _FakeQuant4bit.apply(weight, multiplier, quant_type, blocksize, double_quant, estimator, min_multiplier)
    return result  # type: ignore[no-any-return]
