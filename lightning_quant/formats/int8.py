"""Row-wise int8 weights and LLM.int8 matmuls exactly as bitsandbytes' ``Linear8bitLt`` computes them.

Reference: Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at
Scale". What bitsandbytes does on its CPU backend (reproduced op for op):
- weights: cast to float16, ``SCB`` = row absmax, ``CB = round(W * 127 / SCB)`` (``Int8Params``);
- inference: inputs cast to float16; with ``threshold > 0`` every column holding a value with
  ``|x| >= threshold`` is taken out of the int8 product and computed from the original inputs
  against the dequantized weight columns; the rest is absmax-quantized per token (row),
  multiplied in integers, and rescaled by ``SCA * SCB / 127**2``.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from functools import cache

import torch

__all__ = [
    "Int8Weight",
    "quantize_int8_rowwise",
    "fake_quantize_int8",
    "quantize_per_token",
    "int8_linear",
    "Int8LinearSTE",
]

# bitsandbytes' constants: 1 / 127**2 and 1 / 127 as float literals.
_INV_127_SQUARED = 6.200124e-05
_INV_127 = 7.874015718698502e-3


@dataclass
class Int8Weight:
    """A weight in bitsandbytes' int8 storage: int8 codes ``CB`` and float32 row scales ``SCB``."""

    CB: torch.Tensor
    SCB: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``CB * SCB / 127`` (the weight bitsandbytes multiplies by outside its int8 kernel)."""
        return (self.CB.to(dtype) * (self.SCB.unsqueeze(1) * (1.0 / 127.0))).to(dtype)

    def nbytes(self) -> int:
        """Bytes the deployed layer stores for this weight."""
        return self.CB.numel() + 4 * self.SCB.numel()


def quantize_int8_rowwise(weight: torch.Tensor, multiplier: torch.Tensor | None = None) -> Int8Weight:
    """Quantize a 2-D weight as ``Int8Params`` does (through float16).

    Args:
        weight: ``[out_features, in_features]``.
        multiplier: optional per-row factor in (0, 1] on the absmax (clipping); clipped values
            saturate at +-127.

    Raises:
        ValueError: non-finite weights (also after the float16 cast).

    Example:
        >>> q = quantize_int8_rowwise(torch.randn(4, 8))
        >>> q.CB.dtype, q.SCB.shape
        (torch.int8, torch.Size([4]))
    """
    codes, scb = _rowwise_codes(weight, multiplier)
    return Int8Weight(codes.to(torch.int8), scb)


def _rowwise_codes(weight: torch.Tensor, multiplier: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``Int8Params``' codes as float32 integers (no int8 round trip in the simulated matmul) and ``SCB``."""
    weight16 = weight.detach().to(torch.float16).float()
    absmax = weight16.abs().amax(dim=1)
    if not torch.isfinite(absmax).all():
        raise ValueError("weight contains NaN or Inf (or values beyond float16's range); cannot quantize it")
    scb = absmax if multiplier is None else absmax * multiplier.detach().float()
    inverse = 127.0 / scb.unsqueeze(1)
    codes = weight16.mul_(inverse).round_()
    if not bool(torch.isfinite(inverse).all()):
        # All-zero rows give 0/0 here; bitsandbytes' cast turns those into 0, so do it explicitly.
        codes.nan_to_num_(0.0)
    # Clipped values (multiplier < 1) saturate; + 0.0 turns -0.0 into the +0 an int8 code reads back as.
    return codes.clamp_(-127, 127).add_(0.0), scb


class _FakeQuantInt8(torch.autograd.Function):
    """Forward: ``CB * SCB / 127`` plus float codes and ``SCB``. Backward: the chosen estimator.

    Keeps for the backward only what the estimator reads: nothing for ``ste``, the in-range mask
    for ``clipped_ste``, and the mask and ``q - x`` for ``lsq``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, weight: torch.Tensor, multiplier: torch.Tensor | None, estimator: str, min_multiplier: float
    ):
        clamped = None if multiplier is None else multiplier.clamp(min_multiplier, 1.0)
        codes, scb = _rowwise_codes(weight, clamped)
        ctx.has_multiplier, ctx.estimator = multiplier is not None, estimator
        if estimator != "ste":
            normed = weight.detach().to(torch.float16).float() / scb.unsqueeze(1)
            inside = normed.abs() <= 1.0
            if clamped is not None:
                # LSQ (Esser et al. 2019): d(q * a)/da = q - x inside the range, +-1 outside, per row.
                lsq_term = codes / 127.0 - normed * inside
                ctx.save_for_backward(inside, lsq_term, scb, clamped)
            else:
                ctx.save_for_backward(inside)
        ctx.mark_non_differentiable(codes, scb)
        return (codes * (scb.unsqueeze(1) * (1.0 / 127.0))).to(weight.dtype), codes, scb

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_cb, _grad_scb):  # type: ignore[override]
        if ctx.estimator == "ste":
            return grad, None, None, None
        inside = ctx.saved_tensors[0]
        grad_weight = grad * inside
        grad_multiplier = None
        if ctx.has_multiplier:
            _, lsq_term, scb, clamped = ctx.saved_tensors
            per_row = (grad.float() * lsq_term).sum(dim=1)
            scale = (grad.shape[1] * 127) ** -0.5
            grad_multiplier = (per_row * (scb / clamped) * scale).to(clamped.dtype)
        return grad_weight, grad_multiplier, None, None


def _fake_quantize_int8(
    weight: torch.Tensor, multiplier: torch.Tensor | None, estimator: str, min_multiplier: float
) -> tuple[torch.Tensor, Int8Weight]:
    """:func:`fake_quantize_int8` with the storage's codes left as float32 integers (what the
    simulated int8 matmul multiplies by; ``int8_linear`` accepts either)."""
    if estimator == "lsq" and multiplier is None:
        raise ValueError("estimator `lsq` needs a per-row `multiplier` tensor")
    values, codes, scb = _FakeQuantInt8.apply(weight, multiplier, estimator, min_multiplier)
    return values, Int8Weight(codes, scb)


def fake_quantize_int8(
    weight: torch.Tensor,
    multiplier: torch.Tensor | None = None,
    estimator: str = "ste",
    min_multiplier: float = 0.25,
) -> tuple[torch.Tensor, Int8Weight]:
    """Differentiable row-wise int8 fake quantization and the storage it corresponds to.

    Args:
        weight: ``[out_features, in_features]``.
        multiplier: per-row factor on the absmax, clamped to ``[min_multiplier, 1]``.
        estimator: ``ste``, ``clipped_ste`` or ``lsq`` (``lsq`` needs ``multiplier``).

    Example:
        >>> w = torch.randn(4, 8, requires_grad=True)
        >>> w_fq, storage = fake_quantize_int8(w)
        >>> torch.equal(w_fq.detach(), storage.dequantize())
        True
    """
    values, storage = _fake_quantize_int8(weight, multiplier, estimator, min_multiplier)
    return values, Int8Weight(storage.CB.to(torch.int8), storage.SCB)


def quantize_per_token(
    x16: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Absmax int8 per row of a 2-D float16 tensor, with LLM.int8 outlier columns zeroed.

    Returns:
        ``(CA int8, SCA float32 per row, outlier column indices or None)``.
    """
    codes, row_absmax, outlier_cols = _per_token_codes(x16, threshold)
    return codes.to(torch.int8), row_absmax, outlier_cols


@cache
def _float16_threshold(threshold: float) -> float:
    """bitsandbytes compares the float16 magnitudes to the threshold in float16."""
    return float(torch.tensor(threshold, dtype=torch.float16))


def _outlier_columns(values: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """Columns holding a value with ``|x| >= threshold`` (float32 copy of float16 values), or None.

    Two column reductions instead of a full-size mask: LLM.int8 outliers are rare, so the mask is
    only built on the few columns that have one.
    """
    column_max = values.amax(dim=0).maximum(values.amin(dim=0).neg())
    if not bool(torch.isfinite(column_max).all()):
        # NaN hides a column's other values from amax; ask every element instead.
        flagged = (values.abs() >= _float16_threshold(threshold)).any(dim=0)
    else:
        flagged = column_max >= _float16_threshold(threshold)
    if not bool(flagged.any()):
        return None
    return torch.argwhere(flagged).view(-1)


def _per_token_codes(x16: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`quantize_per_token` with the codes as float32 integers (what the matmul multiplies).

    Works in float32 on the float16 values (exact: every float16 is a float32), because float16
    elementwise ops are not vectorized on CPUs; max(amax, -amin) skips an ``abs`` copy.
    """
    outlier_cols = None
    values = x16.to(torch.float32, copy=True)  # never alias a float32 input: codes are built in place
    if threshold > 0.0:
        outlier_cols = _outlier_columns(values, threshold)
        if outlier_cols is not None:
            # Outlier elements (|x| >= threshold) leave the row absmax; they all sit in these columns.
            columns = values[:, outlier_cols]
            values[:, outlier_cols] = columns.masked_fill_(columns.abs() >= _float16_threshold(threshold), 0)
    row_absmax = values.amax(dim=1).maximum(values.amin(dim=1).neg()).abs_()  # abs_: -0.0 -> +0
    # + 0.0 turns -0.0 into the +0 an int8 code reads back as.
    codes = values.mul_(127.0 / row_absmax.unsqueeze(-1)).round_().add_(0.0)
    if not bool((torch.isfinite(row_absmax) & (row_absmax > 0)).all()):
        # Zero rows (0/0) and rows with Inf or NaN: the int8 cast bitsandbytes does turns those into 0.
        codes = codes.nan_to_num_(0.0, posinf=0.0, neginf=0.0)
    if outlier_cols is not None and x16.shape[0] > 1:
        codes[:, outlier_cols] = 0
    return codes, row_absmax, outlier_cols


class _LastInputCodes(threading.local):
    """Per-token codes of the last input, reused while the same tensor comes in unchanged.

    Attention's query, key and value projections quantize the very same hidden states; keeping
    one entry (a weak reference to the input and its version counter) quantizes them once.
    """

    def __init__(self) -> None:
        self.key: tuple[weakref.ref[torch.Tensor], int, float] | None = None
        self.value: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def codes(
        self, x: torch.Tensor, rows: torch.Tensor, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if x.is_inference():
            # Inference tensors keep no version counter, so a reuse could not be proven safe.
            return _per_token_codes(rows.to(torch.float16), threshold)
        if self.key is not None and self.value is not None:
            ref, version, cached_threshold = self.key
            if ref() is x and version == x._version and cached_threshold == threshold:
                return self.value
        value = _per_token_codes(rows.to(torch.float16), threshold)
        self.key, self.value = (weakref.ref(x, self._forget), x._version, threshold), value
        return value

    def _forget(self, ref: weakref.ref[torch.Tensor]) -> None:
        # The input is gone: drop its codes too (an activation-sized tensor).
        if self.key is not None and self.key[0] is ref:
            self.key = self.value = None


_LAST_INPUT = _LastInputCodes()


def int8_linear(
    x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None, threshold: float = 0.0
) -> torch.Tensor:
    """What ``Linear8bitLt`` returns in inference on bitsandbytes' CPU backend.

    The int8 product is accumulated in float32: exact for integer sums below 2**24, which holds
    for realistic layers (bitsandbytes itself uses ``torch._int_mm`` or a float32 matmul).
    ``weight.CB`` may be int8 or float32 integers (the fake quantizer keeps them as float32).
    """
    shape = x.shape
    if x.numel() == 0:
        return x.new_empty((*shape[:-1], weight.CB.shape[0]))
    rows = x.reshape(-1, shape[-1])
    codes, row_scale, outlier_cols = _LAST_INPUT.codes(x, rows, threshold)
    out = (codes @ weight.CB.float().t()).mul_(row_scale.unsqueeze(-1) * weight.SCB.unsqueeze(0))
    out = out.mul_(_INV_127_SQUARED)
    if bias is not None:
        out += bias
    out = out.to(x.dtype)
    if outlier_cols is not None:
        outlier_weight = weight.CB[:, outlier_cols] * weight.SCB.view(-1, 1) * _INV_127
        out = out.addmm(rows[:, outlier_cols], outlier_weight.to(x.dtype).t())
    return out.reshape(*shape[:-1], weight.CB.shape[0])


class Int8LinearSTE(torch.autograd.Function):
    """Forward: :func:`int8_linear`. Backward: straight through the activation rounding.

    ``weight_fq`` is the differentiable fake-quantized weight (its own estimator handles the
    weight rounding); the input gradient uses it, the weight gradient uses the float input.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight_fq: torch.Tensor,
        bias: torch.Tensor | None,
        weight: Int8Weight,
        threshold: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight_fq)
        ctx.has_bias = bias is not None
        return int8_linear(x, weight, bias, threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight_fq = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad_rows @ weight_fq.to(grad.dtype)).view_as(x) if ctx.needs_input_grad[0] else None
        grad_w = grad_rows.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype) if ctx.needs_input_grad[1] else None
        grad_b = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None
