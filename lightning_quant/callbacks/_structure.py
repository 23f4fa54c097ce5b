"""Keep a model's layer types in step with the checkpoints loaded into it.

A callback turns ``nn.Linear`` into ``FakeQuantLinear`` and later into bitsandbytes layers, so a checkpoint may
hold any of the three while the live model holds another: ``trainer.test(ckpt_path="best")`` after conversion
loads a fake-quant checkpoint into bitsandbytes layers, a fresh process loads a converted checkpoint into a
freshly prepared model. Lightning loads the model's weights *before* it calls any callback's
``on_load_checkpoint``, so the swap happens in a ``load_state_dict`` pre-hook on the LightningModule, which torch
runs before it descends into the children. The layer kind a checkpoint holds is read from its keys:
bitsandbytes ``Linear4bit`` saves ``weight.quant_state.bitsandbytes__<nf4|fp4>``, ``Linear8bitLt`` saves ``SCB``.

``Linear4bit`` cannot load its own state dict (bitsandbytes 0.50 reports the quant-state keys as unexpected), so
4-bit layers are rebuilt from those keys with ``Params4bit.from_prequantized``, which is what transformers does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import nn

from lightning_quant.config import QuantRecipe
from lightning_quant.modules import FakeQuantLinear, LayerSpec, replace_module
from lightning_quant.rules import is_quantized_module, plan_layers

__all__ = ["StructureHook", "dequantized_weight", "replace_module", "unconvert", "converted_layers"]

_4BIT_KEY = "weight.quant_state.bitsandbytes__"


def _live_kind(module: nn.Module) -> str | None:
    if isinstance(module, FakeQuantLinear):
        return "fake"
    name = type(module).__name__
    if is_quantized_module(module):
        return {"Linear4bit": "4bit", "Linear8bitLt": "int8"}.get(name)
    return "linear" if isinstance(module, nn.Linear) else None


def _stored_kind(keys: set[str], key: str) -> str | None:
    if key + "weight" not in keys:
        return None
    if any(k.startswith(key + _4BIT_KEY) for k in keys):
        return "4bit"
    if key + "SCB" in keys:
        return "int8"
    return "float"


def converted_layers(model: nn.Module, names: set[str] | dict[str, Any]) -> list[str]:
    """Names in ``names`` whose module in ``model`` is a bitsandbytes layer."""
    modules = dict(model.named_modules())
    return [n for n in names if n in modules and _live_kind(modules[n]) in ("4bit", "int8")]


def dequantized_weight(module: Any) -> torch.Tensor:
    """The float weight a converted bitsandbytes layer computes with."""
    weight = module.weight
    if type(module).__name__ == "Linear4bit":
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).float()
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB  # moved there by Linear8bitLt.forward
    return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)


def _zero_bias(module: Any) -> nn.Parameter | None:
    """A bias shaped like ``module``'s, to be filled from the state dict (None when it has none)."""
    if module.bias is None:
        return None
    bias = torch.zeros(module.out_features, device=module.bias.device)
    return nn.Parameter(bias, requires_grad=module.bias.requires_grad)


def _shell(module: Any, spec: LayerSpec, name: str, weight: torch.Tensor | None = None) -> FakeQuantLinear:
    """A ``FakeQuantLinear`` shaped like ``module`` (a bitsandbytes layer), holding ``weight`` if given."""
    device = module.weight.device
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=device)
    with torch.no_grad():
        if weight is not None:
            linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.float())
    return FakeQuantLinear(linear, spec, name)


def unconvert(model: nn.Module, specs: dict[str, LayerSpec]) -> list[str]:
    """Turn converted layers named in ``specs`` back into trainable ``FakeQuantLinear`` layers, in place.

    Their weights start from the dequantized stored weights (re-quantizing those gives the same codes), since the
    full-precision weights were not kept after conversion.
    """
    names = converted_layers(model, specs)
    for name in names:
        module = model.get_submodule(name)
        replace_module(model, name, _shell(module, specs[name], name, dequantized_weight(module)))
    return names


def _linear4bit(module: Any, spec: LayerSpec, state_dict: MutableMapping[str, Any], key: str) -> nn.Module:
    import bitsandbytes as bnb

    prefix = key + "weight."
    stats = {k[len(prefix) :]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    device = module.weight.device
    data = state_dict[key + "weight"]
    quant_type = next(k for k in stats if k.startswith("quant_state.")).rpartition("__")[2]
    new = bnb.nn.Linear4bit(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        compute_dtype=spec.torch_compute_dtype,
        quant_type=quant_type,
        device="meta",
    )
    # The packed codes stay in `state_dict` and load as usual; the statistics are consumed here.
    new.weight = bnb.nn.Params4bit.from_prequantized(data, stats, requires_grad=False, device=device, module=new)
    new.register_parameter("bias", _zero_bias(module))
    # Keep the float32 arithmetic training simulated (see lightning_quant._bnb).
    new.support_avx512bf16_for_cpu = False
    return new


def _linear8bit(module: Any, spec: LayerSpec) -> nn.Module:
    import bitsandbytes as bnb

    device = module.weight.device
    new = bnb.nn.Linear8bitLt(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        has_fp16_weights=False,
        threshold=spec.threshold,
        device="meta",
    )
    codes = torch.zeros(module.out_features, module.in_features, dtype=torch.int8, device=device)
    scb = torch.zeros(module.out_features, dtype=torch.float32, device=device)
    # CB shares storage with the parameter, so the checkpoint's codes load into both; SCB loads by bitsandbytes.
    new.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)
    new.register_parameter("bias", _zero_bias(module))
    return new


class StructureHook:
    """``load_state_dict`` pre-hook that swaps layer types to match the incoming state dict.

    Args:
        specs: layer name -> spec for layers the callback prepared or converted (shared, updated by the callback).
        recipe: gives the spec of layers still plain ``nn.Linear``.

    Only layers with a known spec are touched; anything else in the model is the user's business.
    """

    def __init__(self, specs: dict[str, LayerSpec], recipe: QuantRecipe) -> None:
        self.specs = specs
        self.recipe = recipe

    def _spec_lookup(self, model: nn.Module) -> Callable[[str], LayerSpec | None]:
        planned: dict[str, LayerSpec] | None = None

        def lookup(name: str) -> LayerSpec | None:
            nonlocal planned
            if name in self.specs:
                return self.specs[name]
            if planned is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    planned = {p.name: p.spec for p in plan_layers(model, self.recipe) if p.spec is not None}
            return planned.get(name)

        return lookup

    def __call__(self, model: nn.Module, state_dict: MutableMapping[str, Any], prefix: str, *args: Any) -> None:
        keys = set(state_dict)
        spec_of = self._spec_lookup(model)
        for name, module in list(model.named_modules()):
            live = _live_kind(module)
            key = f"{prefix}{name}." if name else prefix
            stored = _stored_kind(keys, key) if live is not None else None
            if stored is None:
                continue
            spec = spec_of(name)
            if spec is None or (live, stored) in (("fake", "float"), ("linear", "float"), ("int8", "int8")):
                if live == "linear" and stored == "float" and spec is not None and self._has_quantizer_keys(keys, key):
                    # A fake-quant checkpoint into a plain layer: prepare the layer so its quantizer state loads.
                    replace_module(model, name, FakeQuantLinear(module, spec, name))  # type: ignore[arg-type]
                continue
            if stored == "4bit":
                new = _linear4bit(module, spec, state_dict, key)
            elif stored == "int8":
                new = _linear8bit(module, spec)
            else:
                new = _shell(module, spec, name)
            self.specs.setdefault(name, spec)
            replace_module(model, name, new)

    @staticmethod
    def _has_quantizer_keys(keys: set[str], key: str) -> bool:
        return key + "weight_multiplier" in keys or any(k.startswith(key + "input_observer.") for k in keys)
