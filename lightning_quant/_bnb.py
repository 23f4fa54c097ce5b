"""Build real bitsandbytes layers from the exact storage the fake quantizer computed.

bitsandbytes is imported here only, lazily, so ``import lightning_quant`` stays light.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_quant.formats.dynamic8 import NESTED_BLOCK_SIZE, dynamic_code
from lightning_quant.formats.fourbit import FourBitWeight, code_table
from lightning_quant.formats.int8 import Int8Weight
from lightning_quant.modules import FakeQuantLinear

__all__ = ["build_bnb_linear", "bnb_dequantized_weight"]


def _import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("convert() needs bitsandbytes: pip install 'bitsandbytes>=0.49'") from err
    return bitsandbytes


def _linear4bit(layer: FakeQuantLinear, storage: FourBitWeight) -> nn.Module:
    bnb = _import_bitsandbytes()
    from bitsandbytes.functional import QuantState

    spec, device = layer.spec, layer.weight.device
    state2 = None
    absmax: torch.Tensor | None = storage.absmax
    if storage.double_quant:
        state2 = QuantState(
            absmax=storage.nested_absmax,
            code=dynamic_code(device),
            blocksize=NESTED_BLOCK_SIZE,
            dtype=torch.float32,
        )
        absmax = storage.nested_codes
    quant_state = QuantState(
        absmax=absmax,
        shape=torch.Size(layer.weight.shape),
        code=code_table(spec.format, device),
        blocksize=spec.block_size,
        quant_type=spec.format,
        dtype=layer.weight.dtype,
        offset=storage.offset,
        state2=state2,
    )
    module = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        compute_dtype=spec.torch_compute_dtype,
        compress_statistics=spec.double_quant,
        quant_type=spec.format,
        quant_storage=torch.uint8,
        device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        data=storage.packed(),
        requires_grad=False,
        quant_state=quant_state,
        blocksize=spec.block_size,
        compress_statistics=spec.double_quant,
        quant_type=spec.format,
        quant_storage=torch.uint8,
        module=module,
        bnb_quantized=True,
    )
    # The AVX512-BF16 CPU path rounds activations to bfloat16; keep the float32 arithmetic that
    # training simulated (a GPU, or a CPU without that extension, never takes that path).
    module.support_avx512bf16_for_cpu = False
    return module


def _linear8bit(layer: FakeQuantLinear, storage: Int8Weight) -> nn.Module:
    bnb = _import_bitsandbytes()
    module = bnb.nn.Linear8bitLt(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        has_fp16_weights=False,
        threshold=layer.spec.threshold,
        device="meta",
    )
    module.weight = bnb.nn.Int8Params(
        storage.CB, requires_grad=False, has_fp16_weights=False, CB=storage.CB, SCB=storage.SCB
    )
    return module


def build_bnb_linear(layer: FakeQuantLinear) -> tuple[nn.Module, FourBitWeight | Int8Weight]:
    """The bitsandbytes layer holding exactly ``layer``'s quantized weight, and that storage."""
    with torch.no_grad():
        storage = layer.quantized_weight()
    if isinstance(storage, FourBitWeight):
        module = _linear4bit(layer, storage)
    else:
        module = _linear8bit(layer, storage)
    module.bias = layer.bias
    module.train(layer.training)
    return module, storage


def bnb_dequantized_weight(module: nn.Module) -> torch.Tensor:
    """What bitsandbytes itself dequantizes a converted 4-bit layer's weight to."""
    from bitsandbytes.functional import dequantize_4bit

    weight: Any = module.weight
    return dequantize_4bit(weight.data, weight.quant_state)
