"""int8 / LLM.int8: codes, scales and layer outputs equal bitsandbytes' ``Linear8bitLt`` on CPU."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_quant.formats.int8 import fake_quantize_int8, int8_linear, quantize_int8_rowwise


def _bnb_layer(linear: torch.nn.Linear, threshold: float) -> bnb.nn.Linear8bitLt:
    layer = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").eval()  # .to() quantizes the weight (Int8Params)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    scale=st.floats(1e-4, 1e3),
    zero_rows=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_codes_and_scales_equal_int8params(rows, cols, scale, zero_rows, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    if zero_rows:
        w[::3] = 0
    params = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    ours = quantize_int8_rowwise(w)
    assert torch.equal(ours.CB, params.CB)
    assert torch.equal(ours.SCB, params.SCB)


@pytest.mark.parametrize("threshold", [0.0, 6.0, 1.0])
@pytest.mark.parametrize(("features", "shape"), [((64, 32), (3, 7)), ((384, 96), (5,)), ((17, 5), (1,))])
def test_layer_output_equals_linear8bitlt(threshold, features, shape):
    linear = torch.nn.Linear(*features)
    reference_layer = _bnb_layer(linear, threshold)
    x = torch.randn(*shape, features[0]) * 3  # scale so that threshold 1.0 and 6.0 both find outliers
    with torch.no_grad():
        expected = reference_layer(x)
        ours = int8_linear(x, quantize_int8_rowwise(linear.weight), linear.bias, threshold)
    # Equal to float rounding by contract (the int8 product is accumulated in float32 here and in
    # int32 by bitsandbytes: identical while partial sums stay below 2**24); in practice equal.
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours, expected)


def test_non_finite_weight_is_an_error():
    w = torch.randn(4, 8)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int8_rowwise(w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int8_rowwise(torch.full((2, 2), 1e6))  # beyond float16, as Int8Params casts


def test_fake_quant_matches_storage_and_lsq_gets_gradients():
    w = torch.randn(6, 40, requires_grad=True)
    multiplier = torch.full((6,), 0.7, requires_grad=True)
    values, storage = fake_quantize_int8(w, multiplier, estimator="lsq")
    assert torch.equal(values.detach(), storage.dequantize())
    assert storage.CB.abs().max() == 127
    values.pow(2).sum().backward()
    assert multiplier.grad is not None and multiplier.grad.abs().sum() > 0
    assert (w.grad == 0).any()  # clipped weights get no gradient
