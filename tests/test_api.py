"""prepare / convert / quantize on a tiny BERT and an MLP: what training measured is what ships."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lightning_quant import FakeQuantLinear, QuantizationError, RecipeError, convert, prepare, quantize

from .conftest import bits

FOUR_BIT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 64))


def _train_a_little(model: nn.Module, inputs) -> None:
    """A few optimizer steps so that weights (and LSQ multipliers) move away from their start."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        logits = out.logits if hasattr(out, "logits") else out
        logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize(("fmt", "double_quant"), FOUR_BIT)
@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_4bit_bert_logits_bit_identical_after_convert(tiny_bert, bert_batch, fmt, double_quant, estimator):
    recipe = {"weight": {"format": fmt, "double_quant": double_quant}, "estimator": {"name": estimator}}
    prepare(tiny_bert, recipe)
    _train_a_little(tiny_bert, bert_batch)
    if estimator == "lsq":
        multipliers = [m.weight_multiplier for m in tiny_bert.modules() if isinstance(m, FakeQuantLinear)]
        assert any((m < 1).any() for m in multipliers)  # the learned clipping is in effect
    expected = _logits(tiny_bert, bert_batch)
    report = convert(tiny_bert)
    assert isinstance(tiny_bert.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny_bert.modules())
    assert all(layer.metrics["conversion_max_abs_diff"] == 0 for layer in report.layers)
    assert torch.equal(bits(_logits(tiny_bert, bert_batch)), bits(expected))


@pytest.mark.parametrize(("fmt", "double_quant"), FOUR_BIT)
def test_4bit_mlp_logits_bit_identical_after_convert(fmt, double_quant):
    model = mlp()
    x = torch.randn(5, 64)
    prepare(model, {"weight": {"format": fmt, "double_quant": double_quant}})
    _train_a_little(model, x)
    expected = _logits(model, x)
    convert(model)
    assert isinstance(model[0], bnb.nn.Linear4bit)
    assert torch.equal(bits(_logits(model, x)), bits(expected))


@pytest.mark.parametrize("fmt", ["int8", "llm_int8"])
def test_int8_predictions_identical_and_logits_equal_to_float_rounding(tiny_bert, bert_batch, fmt):
    # threshold 1.0 makes LLM.int8's outlier split fire on this small random model.
    prepare(tiny_bert, {"weight": {"format": fmt, "threshold": 1.0}, "estimator": {"name": "lsq"}})
    _train_a_little(tiny_bert, bert_batch)
    expected = _logits(tiny_bert, bert_batch)
    convert(tiny_bert)
    assert isinstance(tiny_bert.bert.encoder.layer[0].output.dense, bnb.nn.Linear8bitLt)
    got = _logits(tiny_bert, bert_batch)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # Tolerance: float32 rounding. Our int8 product is accumulated in float32, bitsandbytes' in
    # int32 (or float32 without AVX-512); both are exact while partial sums stay below 2**24, so
    # in practice the logits are identical, but only rounding-level agreement is promised.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_prepare_keeps_parameter_objects_so_an_earlier_optimizer_still_trains():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model[0].weight
    prepare(model, {"weight": {"format": "nf4"}})
    assert model[0].weight is weight
    before = weight.detach().clone()
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    assert not torch.equal(weight.detach(), before)


def test_report_rules_and_heads(tiny_bert):
    recipe = {
        "weight": {"format": "nf4"},
        "rules": [
            {"pattern": "*attention.self.*", "format": "int8"},
            {"pattern": "bert.pooler.dense", "format": "keep"},
        ],
    }
    report = prepare(tiny_bert, recipe)
    assert report.layer("classifier").action == "kept" and "task head" in report.layer("classifier").reason
    assert report.layer("bert.pooler.dense").action == "kept"
    assert report.layer("bert.encoder.layer.0.attention.self.query").format == "int8"
    assert report.layer("bert.encoder.layer.0.intermediate.dense").format == "nf4"
    assert isinstance(tiny_bert.classifier, nn.Linear) and not isinstance(tiny_bert.classifier, FakeQuantLinear)
    # Preparing again is harmless (fit called twice).
    again = prepare(tiny_bert, recipe)
    assert again.count("already_prepared") == report.count("fake_quant")


def test_pattern_matching_nothing_warns_or_raises_when_strict():
    recipe = {"weight": {"format": "nf4"}, "rules": [{"pattern": "encoder.*", "format": "keep"}]}
    with pytest.warns(UserWarning, match=r"`rules\[0\].pattern` 'encoder.\*' matches no nn.Linear"):
        prepare(mlp(), recipe)
    model = mlp()
    with pytest.raises(RecipeError, match="matches no nn.Linear"):
        prepare(model, {**recipe, "strict": True})
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())  # nothing touched


def test_nan_weight_error_names_the_layer_and_touches_nothing():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="layer `2` has NaN or Inf"):
        prepare(model, {"weight": {"format": "nf4"}})
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())


def test_weight_turning_nan_during_training_is_caught_with_the_layer_name():
    model = mlp()
    prepare(model, {"weight": {"format": "fp4"}})
    with torch.no_grad():
        model[4].weight[1, 1] = float("inf")
    with pytest.raises(QuantizationError, match="layer `4`"):
        model(torch.randn(2, 64))
    with pytest.raises(QuantizationError, match="layer `4`"):
        convert(model)
    assert isinstance(model[0], FakeQuantLinear)  # convert replaced nothing


def test_block_size_that_splits_rows_is_rejected_before_any_change():
    model = nn.Sequential(nn.Linear(96, 8))
    with pytest.raises(RecipeError, match=r"does not divide in_features=96 of layer `0`.*`deploy_device: cuda`"):
        prepare(model, {"weight": {"format": "nf4", "block_size": 64}})
    assert type(model[0]) is nn.Linear
    prepare(model, {"weight": {"format": "nf4", "block_size": 32}})


def test_cuda_only_block_layout_is_allowed_when_asked_and_stores_what_bnb_stores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 8)).eval()
    prepare(model, {"weight": {"format": "nf4", "block_size": 64}, "deploy_device": "cuda"})
    x = torch.randn(4, 96)
    with torch.no_grad():
        simulated = model(x)
        weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    report = convert(model)
    assert any("crosses weight rows; run it on CUDA" in note for note in report.notes)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(model[0].weight.data.flatten(), packed.flatten())
    assert torch.equal(model[0].weight.quant_state.absmax, state.absmax)
    # Dequantized as one flat row, blocks never cross rows: what bnb's CUDA kernel computes.
    state.shape = torch.Size([weight.numel()])
    flat = bnb.functional.dequantize_4bit(packed, state).view_as(weight)
    assert torch.equal(simulated, nn.functional.linear(x, flat, bias))


def test_quantize_is_ptq_in_one_call():
    model = mlp()
    x = torch.randn(8, 64)
    reference = _logits(model, x)
    report = quantize(model, {"weight": {"format": "int8"}})
    assert report.count("converted") == 3
    assert report.bytes_after < report.bytes_before / 3
    assert torch.equal(_logits(model, x).argmax(-1), reference.argmax(-1))


def test_convert_unprepared_model_is_an_error():
    with pytest.raises(ValueError, match="call prepare"):
        convert(mlp())


def test_layers_whose_weight_torch_reads_directly_are_kept():
    model = nn.Sequential(nn.TransformerEncoderLayer(64, 2, 128, batch_first=True), nn.Linear(64, 2))
    report = prepare(model, {"weight": {"format": "nf4"}})
    for name in ("0.self_attn.out_proj", "0.linear1", "0.linear2"):
        assert report.layer(name).action == "kept" and "reads this layer's weight directly" in report.layer(name).reason
    assert report.layer("1").action == "fake_quant"
    convert(model)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 5, 64)).shape == (2, 5, 2)  # the fused fast path still works
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        report = prepare(nn.TransformerEncoderLayer(64, 2, 128, batch_first=True), {"weight": {"format": "nf4"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert report.layer("linear1").action == "fake_quant"  # called as a module without the fast path
    assert report.layer("self_attn.out_proj").action == "kept"  # MHA always reads it directly
