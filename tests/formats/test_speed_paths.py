"""The fast paths of the fake quantizers compute exactly what the plain definitions compute."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_quant.formats.fourbit import _code_index, _code_values, _tables
from lightning_quant.formats.int8 import _fake_quantize_int8, _per_token_codes, int8_linear, quantize_int8_rowwise


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


@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_projections_of_one_input_share_its_codes(threshold, monkeypatch):
    from lightning_quant.formats import int8

    calls = []
    original = int8._per_token_codes
    monkeypatch.setattr(int8, "_per_token_codes", lambda *args: calls.append(1) or original(*args))
    # q, k and v read the same tensor: the second and third reuse the codes, with the same result.
    x = torch.randn(3, 5, 32) * 2
    weights = [quantize_int8_rowwise(torch.randn(16, 32)) for _ in range(3)]
    shared = [int8_linear(x, w, threshold=threshold) for w in weights]
    assert len(calls) == 1
    fresh = [int8_linear(x.clone(), w, threshold=threshold) for w in weights]
    for a, b in zip(shared, fresh):
        assert torch.equal(a, b)
    # An in-place change of the input (new version) is quantized again, not read from the cache.
    x.mul_(3)
    again = int8_linear(x, weights[0], threshold=threshold)
    assert torch.equal(again, int8_linear(x.clone(), weights[0], threshold=threshold))
    with torch.inference_mode():
        y = torch.randn(4, 32)
        assert torch.equal(int8_linear(y, weights[1]), int8_linear(y.clone(), weights[1]))


def test_cached_codes_are_dropped_with_their_input():
    from lightning_quant.formats import int8

    x = torch.randn(4, 32)
    int8_linear(x, quantize_int8_rowwise(torch.randn(8, 32)))
    assert int8._LAST_INPUT.value is not None
    del x
    assert int8._LAST_INPUT.value is None


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_fused_cells_give_the_plain_codes(seed, quant_type):
    # Unclipped weights take the fused cell path (w * (G / absmax)); the plain definition divides
    # first and bucketizes. Blocks are built from the hard values (midpoints and their neighbours)
    # times a random absmax, so many scaled weights land within an ulp of a decision boundary.
    from lightning_quant.formats.fourbit import fake_quantize_4bit

    g = torch.Generator().manual_seed(seed)
    hard = _hard_values(quant_type)
    blocks = 64
    picks = torch.randint(0, hard.numel(), (blocks, 64), generator=g)
    exponent = torch.randint(-6, 3, (blocks, 1), generator=g).float()
    absmax = (torch.rand(blocks, 1, generator=g) + 0.01) * 10.0**exponent
    w = hard[picks] * absmax
    w[:, 0] = absmax.squeeze(1)  # each block's absmax is present
    w = w.reshape(32, 128)
    code, order, midpoints = _tables(quant_type)
    flat = w.reshape(-1, 64)
    block_max = flat.abs().amax(dim=1, keepdim=True)
    scaled = (flat * (1.0 / block_max)).clamp(-1, 1)
    expected = (code[order][torch.bucketize(scaled, midpoints)] * block_max).reshape_as(w)
    assert torch.equal(bits(fake_quantize_4bit(w, quant_type, 64)), bits(expected))
