"""calibrate(): methods, `auto`, weight clipping, PTQ error, contract and errors (issue 3, points 2 and 3)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import (
    FakeQuantLinear,
    QuantizationError,
    RecipeError,
    calibrate,
    convert,
    prepare,
    quantize,
)
from lightning_quant.observers import MinMaxObserver, PercentileObserver

from .conftest import bits


@pytest.fixture(autouse=True)
def _quiet():
    # bitsandbytes' CPU int8 matmul logs on every call that it casts inputs to float16.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class TwoInputs(nn.Module):
    """Two independent layers: ``clean`` sees uniform inputs, ``spiky`` rare huge outliers in a
    channel whose weights are tiny (an outlier feature the layer barely uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.clean = nn.Linear(64, 64)
        self.spiky = nn.Linear(64, 64)
        with torch.no_grad():
            self.spiky.weight[:, 0] *= 1e-3

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.clean(x) + self.spiky(z)


def _two_input_batches(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for i in range(n):
        x, z = torch.rand(128, 64) * 2 - 1, torch.rand(128, 64) * 2 - 1
        if i % 4 == 0:
            z[0, 0] = 60.0
        batches.append((x, z))
    return batches


def _logits(model, batch):
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


def _bert_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, 128, (8, 16), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(8).long()})
    return batches


def test_auto_picks_a_clipping_method_only_where_there_are_outliers():
    model = TwoInputs().eval()
    prepare(model, {"weight": {"format": "int8"}, "activation": {"mode": "static"}})
    report = calibrate(model, _two_input_batches(), config={"method": "auto"})
    clean, spiky = report.layer("clean").metrics, report.layer("spiky").metrics
    print("\nauto, relative output error per method:")
    for name, metrics in (("clean", clean), ("spiky", spiky)):
        scores = ", ".join(f"{m} {e:.2e}" for m, e in metrics["calibration_scores"].items())
        print(f"  {name}: chose {metrics['calibration_method']:10s} ({scores})")
    assert clean["calibration_method"] == "minmax"
    assert spiky["calibration_method"] in ("percentile", "mse", "entropy")
    assert spiky["calibration_scores"][spiky["calibration_method"]] < 0.1 * spiky["calibration_scores"]["minmax"]
    # The chosen observer is installed and sets the layer's static range.
    assert isinstance(model.spiky.input_observer, PercentileObserver)
    assert float(model.spiky.input_observer.range()[1]) < 2.0
    assert isinstance(model.clean.input_observer, MinMaxObserver)
    assert "minmax" in report.notes[-1] and spiky["calibration_method"] in report.notes[-1]


def test_ptq_with_calibration_lowers_error_against_fp32(tiny_bert):
    """quantize(model, recipe, data) with static int8 activations: calibration (auto method, weight
    clipping) against none. bitsandbytes has no static-activation kernel, so the converted model
    keeps what calibration made real, the weight clipping; the simulated static path is shown too."""
    calibration, held_out = _bert_batches(4, seed=1), _bert_batches(4, seed=2)
    reference = torch.cat([_logits(tiny_bert, b) for b in held_out])

    def error(model) -> float:
        out = torch.cat([_logits(model, b) for b in held_out])
        return float((out - reference).pow(2).mean() / reference.pow(2).mean())

    print("\nPTQ relative logits MSE against FP32 (tiny BERT, static int8 activations):")
    results = {}
    for fmt in ("nf4", "int8"):
        base = {"weight": {"format": fmt}, "activation": {"mode": "static"}}
        plain = copy.deepcopy(tiny_bert)
        quantize(plain, base)
        calibrated = copy.deepcopy(tiny_bert)
        recipe = {**base, "calibration": {"method": "auto", "weight_clipping": True, "num_batches": 4}}
        report = quantize(calibrated, recipe, calibration)
        results[fmt] = (error(plain), error(calibrated))
        winners = sorted({line.metrics.get("calibration_method", "-") for line in report.layers})
        print(f"  {fmt}: no calibration {results[fmt][0]:.3e} -> calibrated {results[fmt][1]:.3e} (methods {winners})")
        assert report.stage == "quantize" and report.count("converted") == 13
    # The simulated static-int8 model (before convert): minmax ranges against auto's choices.
    simulated = {}
    for method in ("minmax", "auto"):
        model = copy.deepcopy(tiny_bert)
        prepare(model, {"weight": {"format": "int8"}, "activation": {"mode": "static"}})
        calibrate(model, calibration, config={"method": method})
        simulated[method] = error(model)
    print(f"  simulated static int8 (prepared model): minmax {simulated['minmax']:.3e}, auto {simulated['auto']:.3e}")
    for fmt, (plain_error, calibrated_error) in results.items():
        assert calibrated_error < plain_error, fmt
    assert results["nf4"][1] < 0.85 * results["nf4"][0]
    # Random BERT activations have no outliers: every method lands near minmax (auto scores each
    # layer on its own, so the model-level error may move either way by a little).
    assert simulated["auto"] <= simulated["minmax"] * 1.25


@pytest.mark.parametrize(("fmt", "double_quant"), [("nf4", True), ("fp4", False)])
def test_weight_clipping_keeps_conversion_bit_exact(tiny_bert, bert_batch, fmt, double_quant):
    prepare(tiny_bert, {"weight": {"format": fmt, "double_quant": double_quant}})
    report = calibrate(tiny_bert, _bert_batches(2, seed=3), config={"method": "mse", "weight_clipping": True})
    multipliers = [m.weight_multiplier for m in tiny_bert.modules() if isinstance(m, FakeQuantLinear)]
    assert all(m is not None and bool((m < 1).any()) for m in multipliers)  # clipping is in effect
    assert all(line.metrics["weight_clipping_mean"] < 1 for line in report.layers)
    expected = _logits(tiny_bert, bert_batch)
    convert(tiny_bert)
    assert torch.equal(bits(_logits(tiny_bert, bert_batch)), bits(expected))


def test_weight_clipping_int8_conversion_matches_to_float_rounding(tiny_bert, bert_batch):
    prepare(tiny_bert, {"weight": {"format": "int8"}})
    calibrate(
        tiny_bert,
        _bert_batches(2, seed=3),
        config={"method": "percentile", "percentile": 99.0, "weight_clipping": True},
    )
    assert float(tiny_bert.bert.encoder.layer[0].output.dense.weight_multiplier.mean()) < 1
    expected = _logits(tiny_bert, bert_batch)
    convert(tiny_bert)
    torch.testing.assert_close(_logits(tiny_bert, bert_batch), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["minmax", "moving_average", "percentile", "mse", "entropy"])
def test_each_method_calibrates_and_reports(method):
    model = TwoInputs().eval()
    prepare(model, {"weight": {"format": "nf4"}, "activation": {"mode": "static", "symmetric": True}})
    report = calibrate(model, _two_input_batches(4), config={"method": method, "weight_clipping": True})
    for line in report.layers:
        metrics = line.metrics
        assert metrics["calibration_method"] == method
        if method in ("percentile", "mse", "entropy"):
            assert metrics["input_min"] == -metrics["input_max"]  # symmetric: the search is too
        for key in ("output_sqnr_db", "weight_sqnr_db", "output_max_abs_error", "weight_max_abs_error"):
            assert metrics[key] > 0, key
    with torch.no_grad():
        assert torch.isfinite(model(*_two_input_batches(1)[0])).all()


def test_weight_objective_and_lsq_multipliers_start_from_the_clipping():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    prepare(model, {"weight": {"format": "nf4"}, "estimator": {"name": "lsq"}})
    calibrate(
        model,
        [torch.randn(16, 64) for _ in range(2)],
        config={"method": "mse", "weight_clipping": True, "weight_clipping_objective": "weight"},
    )
    multiplier = model[0].weight_multiplier
    assert isinstance(multiplier, nn.Parameter) and bool((multiplier < 1).any())


def test_calibrate_takes_any_iterable_and_stops_at_num_batches():
    model = nn.Sequential(nn.Linear(64, 64))
    prepare(model, {"weight": {"format": "int8"}, "activation": {"mode": "static"}})
    loader = DataLoader(TensorDataset(torch.randn(40, 64)), batch_size=8)  # yields 1-tuples
    assert calibrate(model, loader).layer("0").metrics["calibration_batches"] == 5
    calls = []

    def stream():
        for i in range(100):
            calls.append(i)
            yield torch.randn(4, 64)

    report = calibrate(model, stream(), num_batches=3)
    assert report.layer("0").metrics["calibration_batches"] == 3 and len(calls) <= 4
    # A recipe's calibration section sets the method and the number of batches.
    recipe = {"weight": {"format": "int8"}, "calibration": {"method": "percentile", "num_batches": 2}}
    report = calibrate(model, [torch.randn(4, 64)] * 5, recipe=recipe)
    assert report.layer("0").metrics["calibration_batches"] == 2
    assert report.layer("0").metrics["calibration_method"] == "percentile"


def test_calibrate_a_transformers_model_with_labels_in_the_batches(tiny_bert):
    prepare(tiny_bert, {"weight": {"format": "nf4"}})
    report = calibrate(tiny_bert, _bert_batches(2, seed=4))
    assert report.count("calibrated") == 13
    # Without a config each layer uses its recipe's observer and no weight clipping.
    assert all(line.metrics["calibration_method"] == "minmax" for line in report.layers)
    assert tiny_bert.bert.pooler.dense.weight_multiplier is None


def test_auto_choice_and_ranges_survive_a_checkpoint():
    model = TwoInputs().eval()
    recipe = {"weight": {"format": "int8"}, "activation": {"mode": "static"}}
    prepare(model, recipe)
    calibrate(model, _two_input_batches(), config={"method": "auto", "weight_clipping": True})
    fresh = TwoInputs().eval()
    prepare(fresh, recipe)
    assert isinstance(fresh.spiky.input_observer, MinMaxObserver)
    fresh.load_state_dict(model.state_dict())
    assert type(fresh.spiky.input_observer) is type(model.spiky.input_observer)
    batch = _two_input_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(fresh(*batch), model(*batch))


def test_errors_name_the_cause():
    with pytest.raises(ValueError, match="needs a prepared model"):
        calibrate(nn.Sequential(nn.Linear(64, 64)), [torch.randn(2, 64)])
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    prepare(model, {"weight": {"format": "int8"}, "activation": {"mode": "static"}})
    with pytest.raises(ValueError, match="got no batches"):
        calibrate(model, [])
    bad = torch.randn(4, 64)
    bad[1, 3] = float("nan")
    with pytest.raises(QuantizationError, match=r"layer `0`: calibration batch 2 gave it NaN/Inf"):
        calibrate(model, [torch.randn(4, 64), bad])
    with torch.no_grad():
        model[0].bias[0] = float("inf")  # the first layer produces the Inf
    with pytest.raises(QuantizationError, match=r"layer `0`: calibration batch 1 made it output NaN/Inf"):
        calibrate(model, [torch.randn(4, 64)])
    with pytest.raises(RecipeError, match="`calibration.method`"):
        calibrate(model, [torch.randn(4, 64)], config={"method": "kl"})
    with pytest.raises(RecipeError, match="not both"):
        calibrate(model, [torch.randn(4, 64)], config={}, recipe={"weight": {"format": "int8"}})
    # A failed calibration leaves the layers' flags as they were.
    assert not model[0].calibrating and model[0].observer_enabled
