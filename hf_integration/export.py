"""Export a converted model so that plain ``transformers`` loads it: ``from_pretrained(dir)``, nothing else.

The folder holds ``model.safetensors`` with bitsandbytes' own serialisation of each ``Linear4bit`` /
``Linear8bitLt`` (packed codes plus quant-state tensors, or int8 codes plus ``SCB``), a ``config.json``
whose ``quantization_config`` is a transformers ``BitsAndBytesConfig`` describing exactly those layers,
the tokenizer, ``recipe.yaml``, ``quantization_report.json`` and a ``README.md`` model card.

transformers rebuilds the model from ``config.json`` and swaps every ``nn.Linear`` not listed in
``llm_int8_skip_modules`` for a bitsandbytes layer, then loads the stored quant state; each 4-bit layer's
block size and code book travel in its own quant state. One ``BitsAndBytesConfig`` describes one format,
so a model mixing 4-bit and 8-bit layers (or nf4 and fp4, or different double quantization) is refused
with the layers named.

References: transformers ``quantizers/quantizer_bnb_4bit.py`` / ``quantizer_bnb_8bit.py``,
``integrations/bitsandbytes.py`` (``replace_with_bnb_linear``) and ``quantizers_utils.should_convert_module``
(how skip names match: from the start up to a ``.`` boundary, or as a suffix).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lightning_quant.api import fake_quant_layers
from lightning_quant.config import QuantRecipe
from lightning_quant.report import LayerReport, QuantReport

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

__all__ = ["bnb_quantization_config", "save_quantized", "refresh_model_card"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_BASELINE = "fp32"
# Tensors bitsandbytes' Linear4bit adds to the state dict next to the packed weight.
_QUANT_STATE_KEYS = (".weight.quant_map", ".weight.nested_quant_map", ".weight.absmax", ".weight.nested_absmax")


def _bnb_layers(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """``Linear4bit`` and ``Linear8bitLt`` layers by name (typed Any: bitsandbytes has no type hints)."""
    import bitsandbytes as bnb

    four = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    eight = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    return four, eight


def _skip_modules(model: nn.Module) -> list[str]:
    """Layers transformers would quantize on load that this model keeps in full precision."""
    # Mirrors replace_with_bnb_linear: exactly nn.Linear (not subclasses) and GPT-2 style Conv1D.
    return [
        name for name, module in model.named_modules() if type(module) is nn.Linear or type(module).__name__ == "Conv1D"
    ]


def _one_value(layers: Mapping[str, Any], key: str, read: Any) -> Any:
    groups: dict[Any, list[str]] = {}
    for name, module in layers.items():
        groups.setdefault(read(module), []).append(name)
    if len(groups) > 1:
        listed = "; ".join(f"{value!r}: {', '.join(f'`{n}`' for n in names)}" for value, names in groups.items())
        raise ValueError(
            f"the layers disagree on `{key}` ({listed}), but a transformers BitsAndBytesConfig holds one value "
            "for the whole model; give those layers the same setting in the recipe's rules"
        )
    return next(iter(groups))


def bnb_quantization_config(model: nn.Module) -> BitsAndBytesConfig:
    """The transformers ``BitsAndBytesConfig`` that describes ``model``'s bitsandbytes layers.

    Args:
        model: a converted model (``lightning_quant.convert``).

    Raises:
        ValueError: a model that still has fake-quant layers, has no bitsandbytes layer, or mixes
            settings one config cannot describe (4-bit with 8-bit layers, nf4 with fp4, ...), naming the
            layers.

    Example:
        >>> bnb_quantization_config(model).bnb_4bit_quant_type  # doctest: +SKIP
        'nf4'
    """
    from transformers import BitsAndBytesConfig

    pending = [name for name, _ in fake_quant_layers(model)]
    if pending:
        raise ValueError(
            f"`model` still has {len(pending)} fake-quant layers (e.g. `{pending[0]}`); convert it first with "
            "`lightning_quant.convert(model)` or `QuantizationTrainerCallback(..., convert_on_train_end=True)`"
        )
    four, eight = _bnb_layers(model)
    if four and eight:
        raise ValueError(
            "`model` mixes 4-bit layers ("
            + ", ".join(f"`{n}`" for n in four)
            + ") and 8-bit layers ("
            + ", ".join(f"`{n}`" for n in eight)
            + "); a transformers BitsAndBytesConfig holds one format, so `from_pretrained` could not load it. "
            "Use one format family in the recipe (all nf4/fp4, or all int8/llm_int8), or `format: keep`"
        )
    skip = _skip_modules(model)
    if four:
        quant_type = _one_value(four, "bnb_4bit_quant_type", lambda m: m.weight.quant_state.quant_type)
        nested = _one_value(four, "bnb_4bit_use_double_quant", lambda m: bool(m.weight.quant_state.nested))
        compute = _one_value(four, "bnb_4bit_compute_dtype", lambda m: m.compute_dtype or torch.float32)
        storage = _one_value(four, "bnb_4bit_quant_storage", lambda m: m.weight.dtype)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=nested,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=storage,
            llm_int8_skip_modules=skip,
        )
    if eight:
        threshold = _one_value(eight, "llm_int8_threshold", lambda m: float(m.state.threshold))
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=skip)
    raise ValueError("`model` has no bitsandbytes layer; prepare, train or calibrate, and convert it first")


def _unshared_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with the 4-bit quant-state tensors that share storage copied apart.

    Converted 4-bit layers share one code-book tensor, which ``save_pretrained`` rejects as an undeclared
    tied weight; each layer gets its own copy in the file, as bitsandbytes' own quantization produces.
    Declared tied weights (e.g. an LM head tied to the embeddings) are left for transformers to handle.
    """
    seen: set[int] = set()
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        pointer = value.untyped_storage().data_ptr()
        shared = pointer in seen and key.endswith(_QUANT_STATE_KEYS)
        state[key] = value.clone() if shared else value
        seen.add(pointer)
    return state


def _layer_report(model: nn.Module, config: BitsAndBytesConfig) -> QuantReport:
    """One line per linear layer: format and bytes as stored, and as full-precision weights."""
    four, eight = _bnb_layers(model)
    report = QuantReport("export")
    for name, module in {**four, **eight}.items():
        stored = sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if k != "bias")
        if name in four:
            state = module.weight.quant_state
            fmt, dtype = state.quant_type, state.dtype
        else:
            fmt = "llm_int8" if module.state.threshold > 0 else "int8"
            dtype = module.bias.dtype if module.bias is not None else torch.float32
        weight_bytes = module.in_features * module.out_features * torch.empty((), dtype=dtype).element_size()
        bias = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
        report.layers.append(LayerReport(name, fmt, "converted", "", weight_bytes + bias, stored + bias))
    for name in config.llm_int8_skip_modules or []:
        module = model.get_submodule(name)
        size = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        report.layers.append(LayerReport(name, "keep", "kept", "llm_int8_skip_modules", size, size))
    return report


def _model_bytes(model: nn.Module, report: QuantReport) -> tuple[int, int]:
    """Bytes of the whole state dict as exported, and as it would be with full-precision linear weights."""
    exported = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    full = exported - report.bytes_after + report.bytes_before
    return full, exported


def _variant_metrics(metrics: Mapping[str, Any] | None, variant: str) -> dict[str, dict[str, float]]:
    if not metrics:
        return {}
    if all(isinstance(v, Mapping) for v in metrics.values()):
        return {str(k): dict(v) for k, v in metrics.items()}
    # A flat {"accuracy": 0.9} describes the exported model itself.
    return {variant: dict(metrics)}


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"`output_dir` {str(out)!r} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"`output_dir` {str(out)!r} is not empty; pass `overwrite=True` to replace its contents (they are "
            "removed only once the new export is complete) or choose another folder"
        )


def _sibling(out: Path, kind: str) -> Path:
    """An unused hidden path next to ``out`` (same file system, so ``os.replace`` is a rename)."""
    return out.parent / f".{out.name}.{kind}-{uuid.uuid4().hex[:12]}"


def _swap_into_place(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out``; the old ``out`` is restored if that fails."""
    if not out.exists():
        os.replace(staging, out)
        return
    backup = _sibling(out, "old")
    os.replace(out, backup)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def save_quantized(
    model: nn.Module,
    output_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    recipe: QuantRecipe | dict[str, Any] | str | Path | None = None,
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    method: str | None = None,
    report: QuantReport | None = None,
    task: str = "text-classification",
    license: str | None = None,
    model_name: str | None = None,
    exported_variant: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a converted model as a folder that ``AutoModel*.from_pretrained(folder)`` loads as bnb layers.

    Writes ``model.safetensors`` and ``config.json`` (with a transformers ``quantization_config``:
    ``quant_method: bitsandbytes``, 4-bit or 8-bit fields, ``llm_int8_skip_modules`` listing every linear
    layer kept in full precision), the tokenizer, ``recipe.yaml``, ``quantization_report.json`` (per-layer
    formats and bytes, the metrics, the config) and a ``README.md`` model card
    (:func:`hf_integration.model_card.render_model_card`). Everything is written to a temporary sibling
    folder first and moved into place at the end, so a failure leaves ``output_dir`` as it was.

    Loading needs ``transformers`` and ``bitsandbytes`` only. On a CPU with AVX512-BF16, bitsandbytes' 4-bit
    inference path rounds activations to bfloat16 unless ``module.support_avx512bf16_for_cpu = False``.

    Args:
        model: a converted transformers model (``PreTrainedModel`` with bitsandbytes layers).
        output_dir: destination folder (created; parents too).
        tokenizer: saved with ``save_pretrained`` when given.
        recipe: the recipe used; written as ``recipe.yaml`` and shown in the card.
        metrics: ``{variant: {metric: value}}`` (e.g. ``{"fp32": {...}, "ptq_nf4": {...}, "qat_nf4": {...}}``)
            or a flat ``{metric: value}`` for the exported model.
        base_model: hub id or path of the full-precision model (default: ``model.config._name_or_path``).
        datasets: hub ids of the training / evaluation data, for the card.
        method: how it was quantized (``"qat"``, ``"ptq"``), for the card and default variant name.
        report: a :class:`QuantReport` (e.g. ``callback.report``) merged into the report file.
        task: the card's pipeline tag.
        license: the card's license.
        model_name: the card's title (pass the hub repo id when known).
        exported_variant: which ``metrics`` key describes this model (default ``<method>_<format>``).
        overwrite: replace the contents of a non-empty ``output_dir``.

    Returns:
        The output folder, as an absolute path.

    Raises:
        FileExistsError: ``output_dir`` is a file, or a non-empty folder without ``overwrite=True``.
        ValueError: see :func:`bnb_quantization_config`; or a model without ``save_pretrained``.

    Example:
        >>> metrics = {"fp32": {"accuracy": 0.91}, "qat_nf4": {"accuracy": 0.90}}  # doctest: +SKIP
        >>> folder = save_quantized(trainer.model, "exports/bert-nf4", tokenizer=tokenizer,
        ...                         recipe=callback.recipe, method="qat", metrics=metrics)
        >>> AutoModelForSequenceClassification.from_pretrained(folder)  # plain transformers + bitsandbytes
    """
    from hf_integration.model_card import render_model_card

    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise ValueError(
            f"`model` must be a transformers PreTrainedModel (with `save_pretrained` and `config`); "
            f"got {type(model).__name__}"
        )
    out = Path(output_dir).resolve()  # "." has no name or parent to stage next to
    _check_output_dir(out, overwrite)
    quant_config = bnb_quantization_config(model)
    recipe_obj = QuantRecipe.coerce(recipe) if recipe is not None else None
    config: Any = model.config
    base = base_model or getattr(config, "_name_or_path", "") or type(model).__name__
    bits = 4 if quant_config.load_in_4bit else 8
    fmt = quant_config.bnb_4bit_quant_type if bits == 4 else ("llm_int8" if quant_config.llm_int8_threshold else "int8")
    default_variant = f"{method or 'quantized'}_{fmt}"
    table = _variant_metrics(metrics, exported_variant or default_variant)
    variant = exported_variant or next((k for k in reversed(table) if k != _BASELINE), default_variant)
    if table and variant not in table:
        raise ValueError(
            f"`metrics` has no entry for the exported model (variant {variant!r}); add it, e.g. "
            f"`metrics={{'fp32': {{...}}, {variant!r}: {{...}}}}`, or name it with `exported_variant=`"
        )
    layer_report = _layer_report(model, quant_config)
    full_bytes, exported_bytes = _model_bytes(model, layer_report)
    if report is not None:
        layer_report = report.merge(layer_report, stage="export")
    summary: dict[str, Any] = {"method": method} if method else {}
    summary.update(format=fmt, quantized_layers=layer_report.count("converted"))
    if bits == 4:
        summary.update(double_quant=quant_config.bnb_4bit_use_double_quant, compute_dtype=_dtype_name(quant_config))
    summary["kept_in_full_precision"] = list(quant_config.llm_int8_skip_modules or [])

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out, "tmp")
    staging.mkdir()  # not mkdtemp: the export should get the usual permissions, not 0700
    try:
        previous = getattr(config, "quantization_config", None)
        config.quantization_config = quant_config
        try:
            cast(Any, model).save_pretrained(staging, state_dict=_unshared_state_dict(model))
        finally:
            if previous is None:
                del config.quantization_config
            else:
                config.quantization_config = previous
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if recipe_obj is not None:
            recipe_obj.to_yaml(staging / "recipe.yaml")
        payload = {
            "quantization_config": json.loads(quant_config.to_json_string(use_diff=False)),
            "model_bytes": {_BASELINE: full_bytes, variant: exported_bytes},
            "metrics": table,
            "report": layer_report.to_dict(),
        }
        (staging / "quantization_report.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
        card = render_model_card(
            base_model=base,
            quant_method_summary=summary,
            recipe=recipe_obj.to_dict() if recipe_obj is not None else None,
            metrics=table,
            model_bytes={_BASELINE: full_bytes, variant: exported_bytes},
            datasets=list(datasets),
            task=task,
            bits=bits,
            license=license,
            model_name=model_name,
            exported_variant=variant,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def refresh_model_card(
    folder: str | os.PathLike[str],
    metrics: Mapping[str, Mapping[str, float]],
    *,
    exported_variant: str,
    datasets: Sequence[str] = (),
    model_name: str | None = None,
) -> Path:
    """Re-render an export's ``README.md`` and metrics once every variant has been measured.

    Reads what :func:`save_quantized` wrote (``config.json``, ``recipe.yaml``,
    ``quantization_report.json``); the weights are not touched.

    Example:
        >>> refresh_model_card("exports/bert-nf4", {"fp32": {"accuracy": 0.83}, "qat_nf4": {"accuracy": 0.83}},
        ...                    exported_variant="qat_nf4")  # doctest: +SKIP
    """
    import yaml

    from hf_integration.model_card import parse_front_matter, render_model_card

    out = Path(folder)
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    payload = json.loads((out / "quantization_report.json").read_text())
    recipe_path = out / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text()) if recipe_path.is_file() else None
    front = parse_front_matter((out / "README.md").read_text(encoding="utf-8"))
    table = _variant_metrics(metrics, exported_variant)
    bits = 4 if quant.get("load_in_4bit") else 8
    fmt = quant.get("bnb_4bit_quant_type") if bits == 4 else ("llm_int8" if quant.get("llm_int8_threshold") else "int8")
    summary: dict[str, Any] = {"format": fmt, "kept_in_full_precision": list(quant.get("llm_int8_skip_modules") or [])}
    if bits == 4:
        summary.update(
            double_quant=quant.get("bnb_4bit_use_double_quant"), compute_dtype=quant.get("bnb_4bit_compute_dtype")
        )
    sizes = payload.get("model_bytes", {})
    model_bytes = {
        _BASELINE: sizes.get(_BASELINE),
        exported_variant: next(iter(v for k, v in sizes.items() if k != _BASELINE), None),
    }
    card = render_model_card(
        base_model=front.get("base_model") or config.get("_name_or_path", ""),
        quant_method_summary=summary,
        recipe=recipe,
        metrics=table,
        model_bytes={k: v for k, v in model_bytes.items() if v is not None},
        datasets=list(datasets) or list(front.get("datasets") or []),
        task=front.get("pipeline_tag", "text-classification"),
        bits=bits,
        license=front.get("license"),
        model_name=model_name,
        exported_variant=exported_variant,
    )
    payload["metrics"] = table
    (out / "quantization_report.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def _dtype_name(config: BitsAndBytesConfig) -> str:
    dtype = config.bnb_4bit_compute_dtype
    return _DTYPE_NAMES.get(dtype, str(dtype))
