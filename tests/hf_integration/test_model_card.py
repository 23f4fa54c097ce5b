"""Model card: YAML front matter in the Hub's format, results table, loading snippet and recipe."""

from __future__ import annotations

import re

import pytest
import yaml

from hf_integration.model_card import parse_front_matter, render_model_card

METRICS = {
    "fp32": {"accuracy": 0.8346},
    "ptq_nf4": {"accuracy": 0.8211},
    "qat_nf4": {"accuracy": 0.8302},
}
MODEL_BYTES = {"fp32": 437_936_128, "ptq_nf4": 125_829_120, "qat_nf4": 125_829_120}
RECIPE = {
    "version": 1,
    "weight": {"format": "nf4", "block_size": 64, "double_quant": True},
    "rules": {"keep": ("classifier*",)},
    "estimator": "ste",
}


def _card(**overrides):
    kwargs = dict(
        base_model="google-bert/bert-base-uncased",
        quant_method_summary={"method": "qat", "format": "nf4", "double_quant": True},
        recipe=RECIPE,
        metrics=METRICS,
        model_bytes=MODEL_BYTES,
        datasets=["nyu-mll/glue"],
        bits=4,
        license="apache-2.0",
        model_name="me/bert-sst2-nf4",
        exported_variant="qat_nf4",
    )
    kwargs.update(overrides)
    return render_model_card(**kwargs)


def _table_rows(card: str) -> dict[str, list[str]]:
    section = card.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert set(rows[1].replace("|", "").split()) == {"---"}
    return {"header": header} | {
        cells[0]: cells for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows[2:])
    }


def test_front_matter_has_hub_fields():
    card = _card()
    assert card.startswith("---\n")
    raw = card.split("---\n")[1]
    assert yaml.safe_load(raw) == parse_front_matter(card)
    meta = parse_front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "google-bert/bert-base-uncased"
    assert {"bitsandbytes", "4-bit", "lightning-quant", "quantization"} <= set(meta["tags"])
    assert "8-bit" not in meta["tags"]
    assert meta["datasets"] == ["nyu-mll/glue"]
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-classification"


def test_model_index_reports_the_exported_variant_with_input_values():
    meta = parse_front_matter(_card())
    (entry,) = meta["model-index"]
    assert entry["name"] == "me/bert-sst2-nf4"
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-classification"
    assert result["dataset"] == {"name": "nyu-mll/glue", "type": "nyu-mll/glue"}
    assert [(m["type"], m["value"]) for m in result["metrics"]] == [("accuracy", METRICS["qat_nf4"]["accuracy"])]
    assert all(m["name"] for m in result["metrics"])


def test_model_index_is_read_by_huggingface_hub():
    from huggingface_hub import ModelCard

    card = ModelCard(_card(metrics={"fp32": {"accuracy": 0.9, "f1": 0.88}, "qat_nf4": {"accuracy": 0.89, "f1": 0.87}}))
    results = {(r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert results == {("accuracy", 0.89), ("f1", 0.87)}
    assert card.data.base_model == "google-bert/bert-base-uncased"


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        (METRICS, "qat_nf4"),  # last non-baseline variant in insertion order
        ({"fp32": {"accuracy": 0.8}, "ptq_int8": {"accuracy": 0.79}}, "ptq_int8"),
        ({"fp32": {"accuracy": 0.8}}, "fp32"),
    ],
)
def test_reported_variant_defaults(metrics, expected):
    meta = parse_front_matter(_card(metrics=metrics, exported_variant=None))
    values = [m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]]
    assert values == [metrics[expected]["accuracy"]]


def test_explicit_exported_variant_wins():
    meta = parse_front_matter(_card(exported_variant="ptq_nf4"))
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == METRICS["ptq_nf4"]["accuracy"]


def test_accuracy_table_holds_exactly_the_inputs():
    card = _card()
    table = _table_rows(card)
    header = table.pop("header")
    assert header[:3] == ["Variant", "Accuracy", "Δ Accuracy vs FP32"]
    assert list(table) == ["FP32", "PTQ NF4", "QAT NF4 (this model)"]
    for label, key in zip(table, METRICS):
        row = table[label]
        assert row[1] == f"{METRICS[key]['accuracy'] * 100:.2f}%"
        delta = (METRICS[key]["accuracy"] - METRICS["fp32"]["accuracy"]) * 100
        assert row[2] == ("–" if key == "fp32" else f"{delta:+.2f} pp")
        size = MODEL_BYTES[key] / 1024**2
        assert row[header.index("Model size")] == f"{size:.2f} MiB"
    assert table["PTQ NF4"][header.index("Size vs FP32")] == f"{437_936_128 / 125_829_120:.2f}× smaller"
    # No other percentage sneaks into the results section.
    section = card.split("## Results", 1)[1].split("\n## ", 1)[0]
    percents = set(re.findall(r"(\d+\.\d+)%", section))
    assert percents == {f"{v['accuracy'] * 100:.2f}" for v in METRICS.values()}


def test_no_baseline_means_no_delta_column():
    table = _table_rows(_card(metrics={"qat_nf4": {"accuracy": 0.5}}, model_bytes=None))
    assert table["header"] == ["Variant", "Accuracy"]
    assert table["QAT NF4 (this model)"] == ["QAT NF4 (this model)", "50.00%"]


def test_eight_bit_tags():
    meta = parse_front_matter(_card(bits=8, quant_method_summary={"format": "llm_int8"}))
    assert "8-bit" in meta["tags"] and "4-bit" not in meta["tags"]
    assert "llm_int8" in meta["tags"]


def test_loading_snippet_uses_plain_transformers():
    card = _card()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'AutoModelForSequenceClassification.from_pretrained("me/bert-sst2-nf4")' in code
    assert "lightning_quant" not in code and "hf_integration" not in code
    assert "bitsandbytes" in card.split("## How to use", 1)[1]
    compile(code, "<snippet>", "exec")


def test_recipe_block_round_trips():
    block = _card().split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == {**RECIPE, "rules": {"keep": ["classifier*"]}}


def test_optional_sections():
    card = _card(recipe=None, metrics=None, model_bytes=None, license=None, datasets=())
    meta = parse_front_matter(card)
    assert "license" not in meta and "model-index" not in meta and "datasets" not in meta
    assert "## Results" not in card and "```yaml" not in card
    assert "from_pretrained" in card


def test_yaml_special_characters_round_trip():
    meta = parse_front_matter(_card(base_model="org/model: with colon", license='"quoted" #x'))
    assert meta["base_model"] == "org/model: with colon"
    assert meta["license"] == '"quoted" #x'


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"bits": 3}, "`bits` must be 4 or 8; got 3"),
        ({"exported_variant": "qat_fp4"}, "`exported_variant` must be one of"),
        ({"metrics": {"fp32": {"accuracy": "high"}}}, r"`metrics\['fp32'\]\['accuracy'\]` must be a number"),
    ],
)
def test_rejects_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        _card(**overrides)


def test_parse_front_matter_edge_cases():
    assert parse_front_matter("# no front matter\n") == {}
    assert parse_front_matter("---\n---\nbody") == {}
    assert parse_front_matter("---\r\nlicense: mit\r\n---\r\n# T\r\n") == {"license": "mit"}
    with pytest.raises(ValueError, match="no closing"):
        parse_front_matter("---\nlicense: mit\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        parse_front_matter("---\n- a\n---\n")


def test_cuda_only_layout_is_said_on_the_card():
    assert "CUDA only" not in _card()
    card = _card(recipe={**RECIPE, "deploy_device": "cuda"})
    assert "**CUDA only.**" in card and 'device_map="cuda"' in card
