"""The 8-bit dynamic code (double quantization of the 4-bit absmax) equals bitsandbytes'."""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch

from lightning_quant.formats.dynamic8 import dequantize_blockwise_dynamic, dynamic_code, quantize_blockwise_dynamic


def test_code_table_equals_bitsandbytes():
    assert torch.equal(dynamic_code().view(torch.int32), bnbF.create_dynamic_map().view(torch.int32))


@pytest.mark.parametrize("n", [1, 5, 256, 300, 1000])
def test_roundtrip_equals_bitsandbytes(n):
    x = torch.randn(n) * 0.3
    codes, state = bnbF.quantize_blockwise(x, blocksize=256)
    ours, absmax = quantize_blockwise_dynamic(x)
    assert torch.equal(ours, codes)
    expected = bnbF.dequantize_blockwise(codes, state)
    assert torch.equal(dequantize_blockwise_dynamic(ours, absmax).view(torch.int32), expected.view(torch.int32))


def test_code_table_is_not_shared_mutable_state():
    dynamic_code()[0] = 123.0
    assert dynamic_code()[0] != 123.0
