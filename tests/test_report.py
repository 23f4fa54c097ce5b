"""Reports: per-layer numbers, JSON + Markdown + PNG for a tiny BERT (issue 3, point 6)."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from torch import nn

from lightning_quant import LayerReport, QuantReport, convert, prepare, quantize, sensitivity

LAYER_FIELDS = ("name", "format", "bytes_before", "bytes_after")
METRICS = ("weight_sqnr_db", "output_sqnr_db", "weight_max_abs_error", "output_max_abs_error", "calibration_method")


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, (8, 16), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def test_tiny_bert_report_writes_json_markdown_and_png(tiny_bert, tmp_path):
    nn.init.normal_(tiny_bert.classifier.weight, std=1.0)
    recipe = {
        "weight": {"format": "nf4"},
        "rules": [{"pattern": "*attention.self.*", "format": "int8"}],
        "calibration": {"method": "auto", "weight_clipping": True, "num_batches": 2},
    }
    table = sensitivity(copy.deepcopy(tiny_bert), recipe, _batches(1), formats=("nf4", "int8", "keep"))
    report = quantize(tiny_bert, recipe, _batches(2))
    paths = report.write(tmp_path / "out", sensitivity=table)

    data = json.loads(paths["json"].read_text())
    assert data["stage"] == "quantize" and data["bytes_after"] < data["bytes_before"]
    assert len(data["layers"]) == 14
    for line in data["layers"]:
        assert all(key in line for key in LAYER_FIELDS)
        if line["format"] == "keep":
            assert line["bytes_after"] == line["bytes_before"]  # the classifier head
            continue
        assert line["bytes_after"] < line["bytes_before"]
        assert all(key in line["metrics"] for key in METRICS), line["name"]
        assert line["metrics"]["weight_sqnr_db"] > 10 and line["metrics"]["output_sqnr_db"] > 5
    formats = {line["name"]: line["format"] for line in data["layers"]}
    assert formats["bert.encoder.layer.0.attention.self.query"] == "int8"
    assert formats["bert.encoder.layer.0.output.dense"] == "nf4"

    markdown = paths["markdown"].read_text()
    for header in ("weight SQNR dB", "output SQNR dB", "max abs err (output)", "calibration", "bytes after"):
        assert header in markdown
    assert "`bert.pooler.dense`" in markdown and "Total:" in markdown

    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    from matplotlib.image import imread

    pixels = imread(paths["png"])
    assert pixels.shape[0] > 500 and float(pixels[..., :3].std()) > 0.05  # two panels, not blank


def test_prepare_predicts_the_bytes_convert_stores(tiny_bert):
    recipe = {
        "weight": {"format": "nf4", "double_quant": True},
        "rules": [{"pattern": "*output.dense", "format": "int8"}],
    }
    prepared = prepare(tiny_bert, recipe)
    converted = convert(tiny_bert)
    for line in converted.layers:
        assert prepared.layer(line.name).bytes_after == line.bytes_after
        assert line.metrics["weight_sqnr_db"] > 10 and line.metrics["weight_max_abs_error"] > 0
    kept = prepared.layer("classifier")
    assert kept.action == "kept" and kept.bytes_after == kept.bytes_before > 0


def test_merge_unites_metrics_and_keeps_bytes():
    first = QuantReport("prepare", [LayerReport("fc", "nf4", "fake_quant", "rule", 100, 20)])
    second = QuantReport("calibrate", [LayerReport("fc", "nf4", "calibrated", metrics={"output_sqnr_db": 30.0})])
    merged = first.merge(second, stage="quantize")
    line = merged.layer("fc")
    assert (line.bytes_before, line.bytes_after, line.reason) == (100, 20, "rule")
    assert line.metrics == {"output_sqnr_db": 30.0} and merged.stage == "quantize"


def test_json_is_strict_and_markdown_skips_nested_metrics():
    metrics = {"weight_sqnr_db": math.inf, "calibration_scores": {"minmax": 0.1}}
    report = QuantReport("calibrate", [LayerReport("fc", "int8", "calibrated", metrics=metrics)])
    data = json.loads(report.to_json())  # no bare Infinity
    assert data["layers"][0]["metrics"]["weight_sqnr_db"] == "inf"
    assert data["layers"][0]["metrics"]["calibration_scores"] == {"minmax": 0.1}
    assert "calibration_scores" not in report.to_markdown()


def test_plot_without_sensitivity_and_with_a_plain_mapping(tmp_path):
    report = QuantReport(
        "convert",
        [
            LayerReport("a", "nf4", "converted", metrics={"weight_sqnr_db": 20.0}),
            LayerReport("b", "int8", "converted", metrics={"weight_sqnr_db": 40.0, "output_sqnr_db": 35.0}),
            LayerReport("c", "keep", "kept"),
        ],
    )
    assert report.plot(tmp_path / "one.png").stat().st_size > 0
    assert report.plot(tmp_path / "two.png", sensitivity={"a": {"nf4": 0.1, "int8": 0.01}}).stat().st_size > 0
