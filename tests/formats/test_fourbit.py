"""NF4 / FP4: our storage and dequantization equal bitsandbytes' own, bit for bit (CPU backend)."""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_quant.formats.fourbit import fake_quantize_4bit, quantize_4bit

from ..conftest import bits

BLOCKS = st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096])


def _bnb_roundtrip(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    return packed, bnbF.dequantize_4bit(packed, state)


@st.composite
def weights(draw):
    """Shapes bitsandbytes' CPU kernel handles exactly: 1-D of any size, 2-D with whole blocks per row."""
    blocksize = draw(BLOCKS)
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 3 * blocksize + 7)),)
    else:
        shape = (draw(st.integers(1, 6)), blocksize * draw(st.integers(1, 3)))
    kind = draw(st.sampled_from(["normal", "zeros", "huge", "denormal", "ties", "sparse"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(shape, generator=g) * draw(st.floats(1e-3, 1e3))
    if kind == "zeros":
        w = torch.zeros(shape)
    elif kind == "huge":
        w.view(-1)[draw(st.integers(0, w.numel() - 1))] = 1e30
    elif kind == "denormal":
        w = w / w.abs().max() * 1e-39
    elif kind == "ties":
        # Values on the grid and on midpoints between code entries.
        w = torch.randint(-8, 9, shape, generator=g).float() / 8
    elif kind == "sparse":
        w[torch.rand(shape, generator=g) < 0.7] = 0
    return w, blocksize


@settings(max_examples=120, deadline=None)
@given(data=weights(), quant_type=st.sampled_from(["nf4", "fp4"]), double_quant=st.booleans())
def test_dequantize_matches_bitsandbytes_bit_for_bit(data, quant_type, double_quant):
    w, blocksize = data
    packed, reference = _bnb_roundtrip(w, quant_type, blocksize, double_quant)
    ours = quantize_4bit(w, quant_type, blocksize, double_quant)
    assert torch.equal(ours.packed().view(-1), packed.view(-1))
    assert torch.equal(bits(ours.dequantize()), bits(reference.reshape(w.shape)))
    # The fake quantizer's forward value is the same dequantized weight.
    assert torch.equal(
        bits(fake_quantize_4bit(w, quant_type, blocksize, double_quant)), bits(reference.reshape(w.shape))
    )


def test_absmax_statistics_match_bitsandbytes():
    w = torch.randn(16, 256)
    for double_quant in (False, True):
        _, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        ours = quantize_4bit(w, "nf4", 64, double_quant)
        if double_quant:
            assert torch.equal(ours.nested_absmax, state.state2.absmax)
            assert torch.equal(ours.offset, state.offset)
            assert torch.equal(ours.nested_codes, state.absmax)
        else:
            assert torch.equal(ours.absmax, state.absmax)


def test_storage_bytes():
    q = quantize_4bit(torch.randn(64, 128), "nf4", 64, double_quant=False)
    assert q.nbytes() == 64 * 128 // 2 + 4 * 128
    dq = quantize_4bit(torch.randn(64, 128), "nf4", 64, double_quant=True)
    assert dq.nbytes() == 64 * 128 // 2 + 128 + 4 * 1 + 4


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_an_error(value):
    w = torch.randn(4, 64)
    w[2, 3] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_4bit(w)


def test_multiplier_clips_and_stays_exact_through_requantization():
    """A block multiplier < 1 clips; quantizing the clipped result again gives the same values."""
    w = torch.randn(4, 128)
    multiplier = torch.full((8,), 0.8)
    clipped = quantize_4bit(w, "nf4", 64, multiplier=multiplier).dequantize()
    assert clipped.abs().amax() < w.abs().amax()
    again = quantize_4bit(clipped, "nf4", 64).dequantize()
    assert torch.equal(bits(again), bits(clipped))


def test_estimators_gradients():
    w = torch.randn(2, 64, requires_grad=True)
    multiplier = torch.full((2,), 0.5, requires_grad=True)
    out = fake_quantize_4bit(w, "nf4", 64, multiplier=multiplier, estimator="lsq")
    out.pow(2).sum().backward()
    assert multiplier.grad is not None and multiplier.grad.abs().sum() > 0
    # Weights beyond the clipped range get no gradient under LSQ / clipped STE.
    outside = w.detach().abs() > 0.5 * w.detach().abs().amax(dim=1, keepdim=True)
    assert outside.any()
    assert torch.all(w.grad[outside] == 0)
    w2 = w.detach().clone().requires_grad_()
    fake_quantize_4bit(w2, "nf4", 64, estimator="ste").sum().backward()
    assert torch.all(w2.grad == 1)
