"""The fast paths of the fake quantizers compute exactly what the plain definitions compute."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_quant.formats.fourbit import _code_index, _code_values, _tables
from lightning_quant.formats.int8 import _fake_quantize_int8, _per_token_codes, quantize_int8_rowwise


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw float32 bit patterns: unlike ``conftest.bits``, -0.0 and +0.0 differ here."""
    return t.detach().float().contiguous().view(torch.int32)


def _hard_values(quant_type: str) -> torch.Tensor:
    """Midpoints, their float32 neighbours, code values, signed zeros, the ends of the range."""
    code, _, midpoints = _tables(quant_type)
    around = torch.cat([midpoints, code, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    up = torch.nextafter(around, torch.tensor(2.0))
    down = torch.nextafter(around, torch.tensor(-2.0))
    return torch.cat([around, up, down]).clamp(-1, 1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_grid_lookup_equals_bucketize_on_hard_values(quant_type):
    code, order, midpoints = _tables(quant_type)
    x = torch.cat([_hard_values(quant_type), torch.linspace(-1, 1, 200_001)])
    expected = torch.bucketize(x, midpoints)
    assert torch.equal(_code_index(x, quant_type), expected)
    # Same bits, so -0.0 (FP4 entry 8) stays distinct from +0.0 (entry 0).
    assert torch.equal(bits(_code_values(x, quant_type)), bits(code[order][expected]))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_grid_lookup_equals_bucketize_on_random_values(seed, quant_type):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(4096, generator=g) * 2 - 1) * torch.rand(1, generator=g)
    _, _, midpoints = _tables(quant_type)
    assert torch.equal(_code_index(x, quant_type), torch.bucketize(x, midpoints))


@pytest.mark.parametrize("estimator", ["ste", "clipped_ste", "lsq"])
def test_int8_float_codes_are_the_int8_codes(estimator):
    w = torch.randn(9, 40) * 0.01
    w[2] = 0  # a zero row: 0/0 must read back as +0, as the int8 cast gives
    w[3, :5] = -1e-6  # rounds to -0.0 before the cast
    multiplier = torch.full((9,), 0.6) if estimator == "lsq" else None
    values, storage = _fake_quantize_int8(w, multiplier, estimator, 0.25)
    reference = quantize_int8_rowwise(w, None if multiplier is None else multiplier)
    assert storage.CB.dtype == torch.float32
    assert torch.equal(bits(storage.CB), bits(reference.CB.float()))
    assert torch.equal(bits(values), bits(reference.dequantize()))


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_per_token_float_codes_are_the_int8_codes(threshold):
    x = torch.randn(6, 32) * 2
    x[1] = 0
    x[2, :4] = -1e-4
    x[3, 3] = float("inf")
    codes, scale, _ = _per_token_codes(x.half(), threshold)
    x16 = x.half()
    row_absmax = x16.abs().amax(dim=1).float()
    if threshold:
        masked = x16.masked_fill(x16.abs() >= threshold, 0)
        row_absmax = masked.abs().amax(dim=1).float()
        x16 = masked
    reference = torch.round(x16 * (127.0 / row_absmax.unsqueeze(-1))).to(torch.int8)
    if threshold:
        reference[:, (x.half().abs() >= threshold).any(dim=0)] = 0
    assert torch.equal(bits(codes), bits(reference.float()))
    assert torch.equal(scale, row_absmax)


def test_per_token_codes_leave_their_input_alone():
    # The codes are built in place on a float32 copy; a float32 input must not be that copy.
    x = torch.randn(4, 16)
    before = x.clone()
    _per_token_codes(x, 0.0)
    _per_token_codes(x, 1.0)
    assert torch.equal(x, before)
