"""``FakeQuantLinear``: an ``nn.Linear`` that computes what its bitsandbytes twin will compute.

It keeps the original ``weight`` and ``bias`` Parameter objects (an optimizer built before
``prepare`` still trains them) and adds, where the recipe asks, a learned or calibrated scale
multiplier (``weight_multiplier``) and an input observer for static activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lightning_quant.formats.affine import affine_qparams, fake_quantize_affine
from lightning_quant.formats.fourbit import FourBitWeight, fake_quantize_4bit, num_blocks, quantize_4bit
from lightning_quant.formats.int8 import Int8LinearSTE, Int8Weight, _fake_quantize_int8, quantize_int8_rowwise
from lightning_quant.observers import Observer, build_observer, matching_observer

__all__ = ["LayerSpec", "FakeQuantLinear", "QuantizationError", "replace_module"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted path) is, in place."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class QuantizationError(ValueError):
    """A layer that cannot be quantized (non-finite weights, unsupported shape); names the layer."""


@dataclass(frozen=True)
class LayerSpec:
    """The resolved quantization settings of one layer (recipe defaults plus the matching rule)."""

    format: str
    block_size: int = 64
    double_quant: bool = False
    compute_dtype: str = "float32"
    threshold: float = 0.0
    activation: str = "none"
    act_signed: bool = True
    act_symmetric: bool = False
    act_observer: str = "minmax"
    estimator: str = "ste"
    lsq_granularity: str = "block"
    lsq_init: float = 1.0
    lsq_min: float = 0.25

    @property
    def is_4bit(self) -> bool:
        return self.format in ("nf4", "fp4")

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FakeQuantLinear(nn.Linear):
    """Linear layer with bitsandbytes-exact fake quantization of its weight (and activations).

    Args:
        linear: the layer to wrap; its ``weight`` and ``bias`` Parameters are reused, not copied.
        spec: resolved settings for this layer.
        name: the module's qualified name (used in error messages and reports).

    Example:
        >>> layer = FakeQuantLinear(nn.Linear(64, 8), LayerSpec("nf4"))
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 8])
    """

    weight_multiplier: torch.Tensor | None

    def __init__(self, linear: nn.Linear, spec: LayerSpec, name: str = "") -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec = spec
        self.layer_name = name
        # Switched by the training schedule (callbacks) and by calibrate().
        self.fake_quant_enabled = True
        self.observer_enabled = True
        self.calibrating = False
        groups = self.num_scale_groups()
        initial = torch.full((groups,), spec.lsq_init, device=linear.weight.device, dtype=torch.float32)
        if spec.estimator == "lsq":
            self.weight_multiplier = nn.Parameter(initial)
        else:
            # Calibrated weight clipping (observers / search) writes here; None means no clipping.
            self.register_buffer("weight_multiplier", None)
        self.input_observer: Observer | None = None
        if spec.activation == "static":
            observer = build_observer(spec.act_observer, symmetric=spec.act_symmetric)
            self.input_observer = observer.to(linear.weight.device)
        # nn.Module.__init__ starts in training mode; keep the wrapped layer's mode, or a model prepared
        # in eval mode would update observers in eval and convert to bnb layers in training mode.
        self.train(linear.training)

    # ---- structure --------------------------------------------------------------------------
    def num_scale_groups(self) -> int:
        """How many scales the stored weight has: blocks for 4-bit, rows for int8 or ``row`` LSQ."""
        if self.spec.is_4bit and self.spec.lsq_granularity == "block":
            return num_blocks(self.weight.numel(), self.spec.block_size)
        return self.out_features

    def _block_multiplier(self, multiplier: torch.Tensor | None = None) -> torch.Tensor | None:
        multiplier = self.weight_multiplier if multiplier is None else multiplier
        if multiplier is None or not self.spec.is_4bit or self.spec.lsq_granularity == "block":
            return multiplier
        # One multiplier per row expands to that row's blocks (rows hold whole blocks; prepare checks).
        return multiplier.repeat_interleave(self.in_features // self.spec.block_size)

    def set_weight_clipping(self, multiplier: torch.Tensor) -> None:
        """Use a fixed clipping multiplier per scale group (from calibration)."""
        multiplier = multiplier.detach().to(self.weight.device, torch.float32).clamp(self.spec.lsq_min, 1.0)
        if isinstance(self.weight_multiplier, nn.Parameter):
            with torch.no_grad():
                self.weight_multiplier.copy_(multiplier)
        else:
            self.weight_multiplier = multiplier

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[no-untyped-def]
        # A calibrated clipping multiplier is a buffer that starts as None; adopt it from checkpoints.
        key = prefix + "weight_multiplier"
        if key in state_dict and self.weight_multiplier is None:
            self.weight_multiplier = torch.empty_like(state_dict[key], device=self.weight.device)
        if self.input_observer is not None:
            # Calibration may have swapped the observer for another kind (method `auto`); match the checkpoint.
            self.input_observer = matching_observer(self.input_observer, state_dict, prefix + "input_observer.")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ---- quantization -----------------------------------------------------------------------
    def _named_error(self, err: ValueError) -> QuantizationError:
        return QuantizationError(f"layer `{self.layer_name or self.__class__.__name__}`: {err}")

    def quantized_weight(self, multiplier: torch.Tensor | None = None) -> FourBitWeight | Int8Weight:
        """The exact storage the converted bitsandbytes layer will hold.

        Args:
            multiplier: a per-scale-group clipping multiplier to use instead of the layer's own
                (calibration searches candidates with it).
        """
        spec = self.spec
        multiplier = self._block_multiplier(multiplier)
        clamped = None if multiplier is None else multiplier.detach().clamp(spec.lsq_min, 1.0)
        try:
            if spec.is_4bit:
                return quantize_4bit(self.weight, spec.format, spec.block_size, spec.double_quant, clamped)
            return quantize_int8_rowwise(self.weight, clamped)
        except ValueError as err:
            raise self._named_error(err) from err

    def _static_input(self, x: torch.Tensor) -> torch.Tensor:
        observer = self.input_observer
        assert observer is not None
        if self.observer_enabled and (self.training or self.calibrating):
            observer(x)
        if self.calibrating or not observer.has_data:
            return x
        lo, hi = observer.range()
        scale, zero_point, qmin, qmax = affine_qparams(lo, hi, self.spec.act_signed, self.spec.act_symmetric)
        return fake_quantize_affine(x, scale, zero_point, qmin, qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return F.linear(x, self.weight, self.bias)
        spec = self.spec
        if self.input_observer is not None:
            x = self._static_input(x)
        try:
            if spec.is_4bit:
                return self._forward_4bit(x)
            weight_fq, storage = _fake_quantize_int8(self.weight, self.weight_multiplier, spec.estimator, spec.lsq_min)
        except ValueError as err:
            raise self._named_error(err) from err
        if spec.activation == "per_token":
            return Int8LinearSTE.apply(x, weight_fq, self.bias, storage, spec.threshold)  # type: ignore[no-any-return]
        return F.linear(x, weight_fq, self.bias)

    def _forward_4bit(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        weight_fq = fake_quantize_4bit(
            self.weight,
            spec.format,
            spec.block_size,
            spec.double_quant,
            self._block_multiplier(),
            spec.estimator,
            spec.lsq_min,
        )
        # Linear4bit casts input, dequantized weight and bias to its compute dtype, then back.
        dtype = spec.torch_compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), weight_fq.to(dtype), bias).to(x.dtype)

    def extra_repr(self) -> str:
        spec = self.spec
        details = f"format={spec.format}"
        if spec.is_4bit:
            details += f", block_size={spec.block_size}, double_quant={spec.double_quant}"
        if spec.threshold:
            details += f", threshold={spec.threshold}"
        details += f", activation={spec.activation}, estimator={spec.estimator}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {details}"
