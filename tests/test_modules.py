"""FakeQuantLinear: training through the fake quantizer works with every estimator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant import FakeQuantLinear, prepare
from lightning_quant.modules import LayerSpec


def _toy_regression():
    """A learnable task: y = x @ A with a fixed random A."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    a = torch.randn(64, 64, generator=g) / 8
    return x, x @ a


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "llm_int8"])
@pytest.mark.parametrize("estimator", ["ste", "clipped_ste", "lsq"])
def test_each_estimator_lowers_the_loss(fmt, estimator):
    x, y = _toy_regression()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    prepare(model, {"weight": {"format": fmt, "block_size": 64}, "estimator": {"name": estimator}})
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    if estimator == "lsq":
        multiplier = model[0].weight_multiplier
        assert isinstance(multiplier, nn.Parameter)
        assert multiplier.grad is not None and multiplier.grad.abs().sum() > 0
        assert any(multiplier is p for group in optimizer.param_groups for p in group["params"])


def test_lsq_multiplier_groups():
    nf4_block = FakeQuantLinear(nn.Linear(128, 4), LayerSpec("nf4", block_size=64, estimator="lsq"))
    assert nf4_block.weight_multiplier.shape == (8,)
    nf4_row = FakeQuantLinear(
        nn.Linear(128, 4), LayerSpec("nf4", block_size=64, estimator="lsq", lsq_granularity="row")
    )
    assert nf4_row.weight_multiplier.shape == (4,)
    int8 = FakeQuantLinear(nn.Linear(128, 4), LayerSpec("int8", estimator="lsq", lsq_granularity="row"))
    assert int8.weight_multiplier.shape == (4,)


def test_static_activation_quantization_uses_observed_range():
    layer = FakeQuantLinear(nn.Linear(16, 4), LayerSpec("int8", activation="static"))
    layer.train()
    x = torch.randn(32, 16)
    layer(x)  # observes while training
    lo, hi = layer.input_observer.range()
    assert float(lo) == float(x.min()) and float(hi) == float(x.max())
    layer.observer_enabled = False
    layer(x * 100)  # frozen: the range does not move
    assert float(layer.input_observer.range()[1]) == float(x.max())


def test_fake_quant_switch_gives_the_float_layer_back():
    linear = nn.Linear(64, 8)
    layer = FakeQuantLinear(linear, LayerSpec("nf4"))
    x = torch.randn(3, 64)
    layer.fake_quant_enabled = False
    assert torch.equal(layer(x), linear(x))
    layer.fake_quant_enabled = True
    assert not torch.equal(layer(x), linear(x))


def test_calibrated_clipping_multiplier_survives_a_checkpoint():
    source = FakeQuantLinear(nn.Linear(64, 4), LayerSpec("nf4"))
    source.set_weight_clipping(torch.full((4,), 0.9))
    target = FakeQuantLinear(nn.Linear(64, 4), LayerSpec("nf4"))
    assert target.weight_multiplier is None
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight_multiplier, source.weight_multiplier)
