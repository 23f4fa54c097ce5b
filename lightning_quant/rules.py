"""Which layers a recipe quantizes, and how: fnmatch rules, first match wins.

Example:
    >>> from torch import nn
    >>> from lightning_quant.config import QuantRecipe
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    >>> recipe = QuantRecipe.from_dict({"weight": {"format": "nf4"}, "rules": [{"pattern": "2", "format": "keep"}]})
    >>> [(p.name, p.spec.format if p.spec else "keep") for p in plan_layers(model, recipe)]
    [('0', 'nf4'), ('2', 'keep')]
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from lightning_quant.config import DEFAULT_KEEP_PATTERNS, QuantRecipe, RecipeError, RuleConfig, warn_or_raise
from lightning_quant.modules import FakeQuantLinear, LayerSpec, QuantizationError

__all__ = ["LayerPlan", "plan_layers", "is_quantized_module", "layer_spec"]


@dataclass
class LayerPlan:
    """A linear layer and what the recipe does with it (``spec`` None = kept in full precision)."""

    name: str
    module: nn.Module
    spec: LayerSpec | None
    reason: str


def is_quantized_module(module: nn.Module) -> bool:
    """True for bitsandbytes layers (checked by module path, so bitsandbytes need not be imported)."""
    return type(module).__module__.startswith("bitsandbytes")


def layer_spec(recipe: QuantRecipe, rule: RuleConfig | None) -> LayerSpec:
    """Recipe defaults with a rule's overrides, resolved for one layer."""
    weight = recipe.weight
    fmt = rule.format if rule is not None else weight.format
    block_size = rule.block_size if rule is not None and rule.block_size is not None else weight.block_size
    double_quant = rule.double_quant if rule is not None and rule.double_quant is not None else weight.double_quant
    estimator = recipe.estimator
    granularity = estimator.lsq_granularity if fmt in ("nf4", "fp4") else "row"
    return LayerSpec(
        format=fmt,
        block_size=block_size,
        double_quant=double_quant,
        compute_dtype=weight.compute_dtype,
        threshold=weight.threshold if fmt == "llm_int8" else 0.0,
        activation=recipe.activation.resolve(fmt),
        act_signed=recipe.activation.signed,
        act_symmetric=recipe.activation.symmetric,
        act_observer=recipe.activation.observer,
        estimator=estimator.name,
        lsq_granularity=granularity,
        lsq_init=estimator.lsq_init,
        lsq_min=estimator.lsq_min,
    )


def _weight_readers(model: nn.Module) -> dict[str, str]:
    """Linear layers whose ``weight`` torch reads directly, bypassing a replacement module.

    ``nn.MultiheadAttention`` always passes ``out_proj.weight`` to its functional kernel;
    ``nn.TransformerEncoderLayer`` does the same with ``linear1`` / ``linear2`` in its fused eval fast
    path, unless ``torch.backends.mha.set_fastpath_enabled(False)`` turned that path off.
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    readers = {}
    for parent_name, parent in model.named_modules():
        children: tuple[str, ...] = ()
        if isinstance(parent, nn.MultiheadAttention):
            children = ("out_proj",)
        elif isinstance(parent, nn.TransformerEncoderLayer) and fast_path:
            children = ("linear1", "linear2")
        for child in children:
            readers[f"{parent_name}.{child}" if parent_name else child] = type(parent).__name__
    return readers


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def plan_layers(model: nn.Module, recipe: QuantRecipe, check_weights: bool = True) -> list[LayerPlan]:
    """Resolve every ``nn.Linear`` of ``model`` against the recipe's rules, without touching it.

    Args:
        model: the model to plan for (its weights may be on the meta device with ``check_weights=False``).
        recipe: the recipe.
        check_weights: also reject non-finite weights (needs real weights).

    Raises:
        RecipeError: a rule that matches nothing when the recipe is ``strict``.
        QuantizationError: a layer whose weight is not finite, or whose shape the format's
            bitsandbytes kernel cannot hold exactly.
    """
    plans: list[LayerPlan] = []
    used_rules: set[int] = set()
    readers = _weight_readers(model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_quantized_module(module):
            continue
        rule_index = next((i for i, r in enumerate(recipe.rules) if _matches(name, r.pattern)), None)
        if rule_index is not None:
            used_rules.add(rule_index)
        if isinstance(module, FakeQuantLinear):
            plans.append(LayerPlan(name, module, module.spec, "already prepared"))
        elif name in readers:
            reason = f"kept: torch's {readers[name]} reads this layer's weight directly, bypassing a replacement"
            if readers[name] == "TransformerEncoderLayer":
                reason += " (in its fast path: torch.backends.mha.set_fastpath_enabled(False) lets it be quantized)"
            plans.append(LayerPlan(name, module, None, reason))
        elif rule_index is not None:
            rule = recipe.rules[rule_index]
            if rule.format == "keep":
                plans.append(LayerPlan(name, module, None, f"rule `{rule.pattern}` keeps it"))
            else:
                plans.append(LayerPlan(name, module, layer_spec(recipe, rule), f"rule `{rule.pattern}`"))
        elif recipe.keep_heads and any(_matches(name, p) for p in DEFAULT_KEEP_PATTERNS):
            plans.append(LayerPlan(name, module, None, "task head kept in full precision (keep_heads)"))
        else:
            plans.append(LayerPlan(name, module, layer_spec(recipe, None), "recipe default"))
    for index, rule in enumerate(recipe.rules):
        if index not in used_rules:
            warn_or_raise(
                f"`rules[{index}].pattern` {rule.pattern!r} matches no nn.Linear module of "
                f"{type(model).__name__}; check the module names (model.named_modules())",
                recipe.strict,
            )
    for plan in plans:
        if plan.spec is not None and not isinstance(plan.module, FakeQuantLinear):
            _check_layer(plan.name, plan.module, plan.spec, check_weights, recipe.deploy_device)
    return plans


def blocks_straddle_rows(shape: torch.Size | tuple[int, ...], block_size: int) -> bool:
    """True when 4-bit blocks cross weight rows: only bitsandbytes' CUDA kernel dequantizes those right."""
    rows, in_features = shape[0], shape[-1]
    return bool(in_features % block_size and in_features % 2 == 0 and rows > 1)


def _check_layer(
    name: str, module: nn.Module, spec: LayerSpec, check_weights: bool = True, deploy_device: str = "any"
) -> None:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if check_weights and not torch.isfinite(weight).all():
        raise QuantizationError(
            f"layer `{name}` has NaN or Inf in its weight; fix the checkpoint or keep the layer "
            f"with a rule {{pattern: '{name}', format: keep}}"
        )
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise QuantizationError(f"layer `{name}` has weight dtype {weight.dtype}; expected float32/16 or bfloat16")
    if not spec.is_4bit:
        return
    in_features = weight.shape[1]
    divisors = [b for b in (32, 64, 128, 256, 512, 1024, 2048, 4096) if in_features % b == 0]
    if blocks_straddle_rows(weight.shape, spec.block_size) and deploy_device != "cuda":
        # bitsandbytes' CPU dequantize kernel indexes the absmax as row * (in_features // block)
        # + column // block, which is only right when blocks do not straddle rows.
        raise RecipeError(
            f"`weight.block_size` {spec.block_size} does not divide in_features={in_features} of layer "
            f"`{name}`; bitsandbytes' CPU kernel would dequantize it with the wrong block scales. "
            f"Use a block size in {divisors or 'none (keep this layer)'}, a rule for this layer, or "
            "`deploy_device: cuda` if the model will only run on CUDA (its kernel handles this)"
        )
    if spec.estimator == "lsq" and spec.lsq_granularity == "row" and in_features % spec.block_size:
        raise RecipeError(
            f"`estimator.lsq_granularity` row needs whole blocks per row, but layer `{name}` has "
            f"in_features={in_features} and block_size={spec.block_size}; use `block` granularity"
        )
