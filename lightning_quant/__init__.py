"""lightning-quant: quantization-aware training that simulates bitsandbytes' own formats.

Example:
    >>> from torch import nn
    >>> from lightning_quant import prepare, convert
    >>> model = nn.Sequential(nn.Linear(64, 64))
    >>> _ = prepare(model, {"weight": {"format": "nf4"}})   # train as usual...
    >>> _ = convert(model)                                   # ...then ship real bnb layers
"""

from lightning_quant.api import (
    calibrate,
    convert,
    fake_quant_layers,
    prepare,
    quantize,
    set_fake_quant,
    set_observers,
)
from lightning_quant.config import (
    ActivationConfig,
    CalibrationConfig,
    EstimatorConfig,
    ExportConfig,
    OptimizerStateConfig,
    QuantRecipe,
    RecipeError,
    RuleConfig,
    ScheduleConfig,
    WeightConfig,
)
from lightning_quant.modules import FakeQuantLinear, LayerSpec, QuantizationError
from lightning_quant.report import LayerReport, QuantReport
from lightning_quant.sensitivity import Allocation, SensitivityTable, allocate, model_nbytes, sensitivity

__version__ = "0.1.0"

__all__ = [
    "ActivationConfig",
    "Allocation",
    "CalibrationConfig",
    "EstimatorConfig",
    "ExportConfig",
    "FakeQuantLinear",
    "LayerReport",
    "LayerSpec",
    "OptimizerStateConfig",
    "QuantRecipe",
    "QuantReport",
    "QuantizationError",
    "RecipeError",
    "RuleConfig",
    "ScheduleConfig",
    "SensitivityTable",
    "WeightConfig",
    "allocate",
    "calibrate",
    "convert",
    "fake_quant_layers",
    "model_nbytes",
    "prepare",
    "quantize",
    "sensitivity",
    "set_fake_quant",
    "set_observers",
]
