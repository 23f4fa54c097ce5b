"""Model card (README.md) for an exported quantized model.

The card follows the Hugging Face model-card format: YAML front matter (metadata the Hub indexes,
including a ``model-index`` with the evaluation results) followed by Markdown. References:
https://huggingface.co/docs/hub/model-cards and the ``model-index`` schema in
https://github.com/huggingface/hub-docs/blob/main/modelcard.md.

The front matter is always produced by ``yaml.safe_dump`` so that any string (a dataset name with a
colon, a license with quotes) round-trips.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

__all__ = ["parse_front_matter", "render_model_card"]

_BASELINE = "fp32"
# Metrics that are fractions in [0, 1] and read best as a percentage.
_PERCENT_METRICS = ("accuracy", "acc", "f1", "precision", "recall", "exact_match")
_TASK_NAMES = {
    "text-classification": "Text Classification",
    "token-classification": "Token Classification",
    "question-answering": "Question Answering",
    "fill-mask": "Fill-Mask",
    "text-generation": "Text Generation",
}
_AUTO_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
    "text-generation": "AutoModelForCausalLM",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def render_model_card(
    *,
    base_model: str,
    quant_method_summary: Mapping[str, Any],
    recipe: Mapping[str, Any] | None,
    metrics: Mapping[str, Mapping[str, float]] | None,
    model_bytes: Mapping[str, int] | None,
    datasets: Sequence[str] = (),
    task: str = "text-classification",
    bits: int,
    license: str | None = None,
    model_name: str | None = None,
    exported_variant: str | None = None,
    baseline_variant: str = _BASELINE,
) -> str:
    """Render the README.md of an exported quantized model.

    ``metrics`` maps a variant name (``"fp32"``, ``"ptq_nf4"``, ``"qat_nf4"``, ...) to its metrics
    (``{"accuracy": 0.8346}``). All variants appear in the body table, with the difference to
    ``baseline_variant`` when that variant is present. Only the exported model's own variant goes into
    the ``model-index`` (the Hub shows those numbers as *this* model's results): ``exported_variant``
    when given (then a key of ``metrics`` unless ``metrics`` is empty), otherwise the last variant in
    ``metrics`` that is not the baseline (insertion order, so ``{"fp32", "ptq", "qat"}`` reports
    ``qat``), otherwise the baseline itself. The ``model-index`` needs a dataset, so it is written only
    when ``datasets`` is not empty; the first one is used.

    Args:
        base_model: Hub id (or path) of the full-precision model that was quantized.
        quant_method_summary: What was done, e.g. ``{"method": "qat", "format": "nf4"}``; shown as a
            list, and a string ``format`` becomes a tag.
        recipe: The recipe as a plain mapping (``QuantRecipe.to_dict()``), shown as a YAML block.
        metrics: Variant name -> metric name -> value.
        model_bytes: Variant name -> model size in bytes.
        datasets: Hub ids of the evaluation / training datasets.
        task: Hub pipeline tag, e.g. ``"text-classification"``.
        bits: 4 or 8, the bitsandbytes weight width.
        license: SPDX-like license id for the front matter (omitted when ``None``).
        model_name: Title and ``model-index`` name; also the id used in the loading example, so pass
            the repo id when you know it.
        exported_variant: Which key of ``metrics`` describes this model.
        baseline_variant: Key of the full-precision reference in ``metrics`` / ``model_bytes``.

    Raises:
        ValueError: if ``bits`` is not 4 or 8, ``exported_variant`` is not a key of ``metrics``, or a
            metric value is not a number.

    Example:
        >>> card = render_model_card(base_model="bert-base-uncased", quant_method_summary={"format": "nf4"},
        ...     recipe=None, metrics={"fp32": {"accuracy": 0.9}, "qat_nf4": {"accuracy": 0.89}},
        ...     model_bytes=None, datasets=["glue"], bits=4)
        >>> parse_front_matter(card)["model-index"][0]["results"][0]["metrics"][0]["value"]
        0.89
    """
    if bits not in (4, 8):
        raise ValueError(f"`bits` must be 4 or 8; got {bits!r}")
    metric_table = _check_metrics(metrics or {})
    sizes = dict(model_bytes or {})
    reported = _reported_variant(metric_table, exported_variant, baseline_variant)
    name = model_name or f"{base_model.rstrip('/').rsplit('/', 1)[-1]}-bnb-{bits}bit"
    summary = _plain(dict(quant_method_summary))

    tags = ["lightning-quant", "quantization", "bitsandbytes", f"{bits}-bit"]
    fmt = summary.get("format")
    if isinstance(fmt, str) and fmt.lower() not in tags:
        tags.append(fmt.lower())

    meta: dict[str, Any] = {
        "library_name": "transformers",
        "base_model": base_model,
        "base_model_relation": "quantized",
        "tags": tags,
    }
    if datasets:
        meta["datasets"] = list(datasets)
    if license is not None:
        meta["license"] = license
    meta["pipeline_tag"] = task
    if reported in metric_table and datasets:
        meta["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": task, "name": _TASK_NAMES.get(task, task.replace("-", " ").title())},
                        "dataset": {"name": datasets[0], "type": datasets[0]},
                        "metrics": [
                            {
                                "type": metric,
                                "value": value,
                                "name": f"{_metric_label(metric)} ({_variant_label(reported)})",
                            }
                            for metric, value in metric_table[reported].items()
                        ],
                    }
                ],
            }
        ]

    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    parts = [f"---\n{front}---\n", f"# {name}\n", _description(base_model, bits, summary, reported)]
    if summary:
        parts.append("## Quantization\n\n" + "".join(f"- **{k}**: `{v}`\n" for k, v in summary.items()))
    if metric_table or sizes:
        parts.append(_results_section(metric_table, sizes, baseline_variant, reported))
    parts.append(_usage_section(name, task))
    if recipe is not None and recipe.get("deploy_device") == "cuda":
        parts.append(
            "**CUDA only.** Some 4-bit blocks of this model cross weight rows; bitsandbytes' CUDA kernel "
            'dequantizes them correctly, its CPU kernel does not. Load it with `device_map="cuda"`.\n'
        )
    if recipe is not None:
        recipe_yaml = yaml.safe_dump(_plain(dict(recipe)), sort_keys=False, allow_unicode=True)
        intro = "## Recipe\n\nThe lightning-quant recipe that produced this model:\n\n"
        parts.append(f"{intro}```yaml\n{recipe_yaml}```\n")
    return "\n".join(parts)


def parse_front_matter(text: str) -> dict[str, Any]:
    """Return the YAML front matter of a model card as a dict (``{}`` when the card has none).

    Raises:
        ValueError: if the front matter is not closed by a ``---`` line or is not a YAML mapping.

    Example:
        >>> parse_front_matter("---\\nlicense: mit\\n---\\n# Title\\n")
        {'license': 'mit'}
    """
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    closing = next((i for i, line in enumerate(lines) if i > 0 and line.strip() == "---"), None)
    if closing is None:
        raise ValueError("model card front matter starts with `---` but has no closing `---` line")
    data = yaml.safe_load("\n".join(lines[1:closing]))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"model card front matter must be a YAML mapping; got {type(data).__name__}")
    return data


def _check_metrics(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for variant, values in metrics.items():
        table[variant] = {}
        for metric, value in values.items():
            try:
                if isinstance(value, str | bool):
                    raise TypeError
                table[variant][metric] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"`metrics[{variant!r}][{metric!r}]` must be a number; got {value!r}") from None
    return table


def _reported_variant(metrics: Mapping[str, Any], exported: str | None, baseline: str) -> str | None:
    if exported is not None:
        if metrics and exported not in metrics:
            raise ValueError(
                f"`exported_variant` must be one of the `metrics` keys {sorted(metrics)}; got {exported!r}"
            )
        return exported
    candidates = [variant for variant in metrics if variant != baseline]
    if candidates:
        return candidates[-1]
    return baseline if baseline in metrics else None


def _description(base_model: str, bits: int, summary: Mapping[str, Any], reported: str | None) -> str:
    base = f"[{base_model}](https://huggingface.co/{base_model})" if _HUB_ID.match(base_model) else base_model
    how = f" ({_variant_label(reported)})" if reported is not None else ""
    method = summary.get("method")
    method_text = f" by {str(method).upper()}" if method else ""
    return (
        f"A {bits}-bit [bitsandbytes](https://github.com/bitsandbytes-foundation/bitsandbytes) quantization "
        f"of {base}{how}, produced{method_text} with lightning-quant. The weights are stored in "
        "bitsandbytes' own format, so plain `transformers` loads them; lightning-quant is not needed at "
        "inference time.\n"
    )


def _results_section(
    metrics: Mapping[str, Mapping[str, float]], sizes: Mapping[str, int], baseline: str, reported: str | None
) -> str:
    variants = list(dict.fromkeys([*metrics, *sizes]))
    metric_names = list(dict.fromkeys(m for values in metrics.values() for m in values))
    base_metrics = metrics.get(baseline)
    base_size = sizes.get(baseline)

    header = ["Variant"]
    for metric in metric_names:
        header.append(_metric_label(metric))
        if base_metrics is not None and metric in base_metrics:
            header.append(f"Δ {_metric_label(metric)} vs {_variant_label(baseline)}")
    if sizes:
        header.append("Model size")
        if base_size:
            header.append(f"Size vs {_variant_label(baseline)}")

    rows = []
    for variant in variants:
        values = metrics.get(variant, {})
        label = _variant_label(variant) + (" (this model)" if variant == reported else "")
        row = [label]
        for metric in metric_names:
            value = values.get(metric)
            row.append("–" if value is None else _format_metric(metric, value))
            if base_metrics is not None and metric in base_metrics:
                if value is None or variant == baseline:
                    row.append("–")
                else:
                    row.append(_format_delta(metric, value - base_metrics[metric]))
        if sizes:
            size = sizes.get(variant)
            row.append("–" if size is None else _format_bytes(size))
            if base_size:
                row.append("–" if not size or variant == baseline else f"{base_size / size:.2f}× smaller")
        rows.append(row)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = "Accuracy-like metrics in percent; deltas in percentage points (pp)."
    return "## Results\n\n" + "\n".join(lines) + f"\n\n{note}\n"


def _usage_section(name: str, task: str) -> str:
    auto = _AUTO_CLASSES.get(task, "AutoModel")
    return (
        "## How to use\n\n"
        "Needs `transformers` and `bitsandbytes` (`pip install transformers bitsandbytes`); the "
        "quantization config is stored in `config.json`, so no extra argument is required.\n\n"
        "```python\n"
        f"from transformers import AutoTokenizer, {auto}\n\n"
        f'model = {auto}.from_pretrained("{name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
        "```\n"
    )


def _is_percent(metric: str) -> bool:
    return metric.lower().startswith(_PERCENT_METRICS)


def _format_metric(metric: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value * 100:.2f}%" if _is_percent(metric) else f"{value:.4f}"


def _format_delta(metric: str, delta: float) -> str:
    return f"{delta * 100:+.2f} pp" if _is_percent(metric) else f"{delta:+.4f}"


def _format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**exponent:.2f} {('B', 'KiB', 'MiB', 'GiB')[exponent]}"


def _variant_label(key: str) -> str:
    """``"qat_nf4"`` -> ``"QAT NF4"``."""
    return " ".join(key.replace("-", "_").split("_")).upper()


def _metric_label(key: str) -> str:
    """``"accuracy"`` -> ``"Accuracy"``, ``"f1_macro"`` -> ``"F1 Macro"``."""
    return " ".join(w.upper() if w in ("f1", "mcc", "auc") else w.capitalize() for w in key.split("_"))


def _plain(value: Any) -> Any:
    """Make ``value`` safe for ``yaml.safe_dump``: mappings -> dict, sequences -> list, enums -> value."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)
