"""sensitivity() and allocate(): exact bytes, budgets met by the converted model, optimality (issue 3, point 5)."""

from __future__ import annotations

import copy
import itertools
import logging
import random

import pytest
import torch
from torch import nn

from lightning_quant import (
    QuantRecipe,
    allocate,
    convert,
    model_nbytes,
    prepare,
    sensitivity,
)
from lightning_quant.formats.fourbit import quantize_4bit
from lightning_quant.formats.int8 import quantize_int8_rowwise
from lightning_quant.modules import LayerSpec
from lightning_quant.sensitivity import SensitivityRow, SensitivityTable, storage_nbytes

RECIPE = {"weight": {"format": "nf4", "double_quant": True}}


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def shared_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=2,
    )
    model = BertForSequenceClassification(config).eval()
    # A head with real weight: random init gives near-uniform logits, whose KL is all rounding.
    nn.init.normal_(model.classifier.weight, std=1.0)
    return model


@pytest.fixture
def bert(shared_bert):
    return copy.deepcopy(shared_bert)


@pytest.fixture(scope="module")
def batches():
    generator = torch.Generator().manual_seed(5)
    out = []
    for _ in range(2):
        ids = torch.randint(1, 128, (8, 16), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


@pytest.fixture(scope="module")
def table(shared_bert, batches):
    return sensitivity(shared_bert, RECIPE, batches)


@pytest.mark.parametrize("shape", [(64, 64), (3, 100), (200, 64), (1, 7)])
@pytest.mark.parametrize(("fmt", "double_quant"), [("nf4", False), ("nf4", True), ("fp4", True), ("int8", False)])
def test_storage_nbytes_counts_what_the_storage_holds(shape, fmt, double_quant):
    weight = torch.randn(shape)
    spec = LayerSpec(fmt, block_size=64, double_quant=double_quant)
    if spec.is_4bit:
        stored = quantize_4bit(weight, fmt, 64, double_quant).nbytes()
    else:
        stored = quantize_int8_rowwise(weight).nbytes()
    assert storage_nbytes(spec, shape, bias=12) == stored + 12


def test_sensitivity_table_covers_every_candidate_and_restores_the_model(shared_bert, table):
    bert = shared_bert
    layers = table.layers()
    assert len(layers) == 13 and table.kept == ["classifier"]
    assert len(table.rows) == 13 * 4
    for name in layers:
        options = table.options(name)
        assert options["keep"].sensitivity == 0.0
        assert options["nf4"].nbytes < options["int8"].nbytes < options["keep"].nbytes
        assert options["nf4"].sensitivity > options["int8"].sensitivity >= 0
    # The model is untouched: no wrapper left behind.
    assert not any("FakeQuant" in type(m).__name__ for m in bert.modules())
    assert table.full_bytes == model_nbytes(bert)
    assert table.fixed_bytes + sum(table.options(n)["keep"].nbytes for n in layers) == table.full_bytes
    print("\nsensitivity (KL of logits) per layer:\n" + table.to_markdown())


@pytest.mark.parametrize("budget", ["smallest", 0.36, 0.4, 0.5, 1.0])
def test_allocate_meets_the_budget_in_the_converted_model(bert, table, budget):
    smallest = table.fixed_bytes + sum(min(r.nbytes for r in table.options(n).values()) for n in table.layers())
    plan = allocate(table, budget_bytes=smallest) if budget == "smallest" else allocate(table, budget_ratio=budget)
    assert plan.total_bytes <= plan.budget_bytes
    model = copy.deepcopy(bert)
    recipe = plan.to_recipe(RECIPE)
    # The rules are plain data a YAML recipe holds.
    assert QuantRecipe.from_dict(recipe.to_dict()) == recipe
    report = prepare(model, recipe)
    if report.count("fake_quant"):
        convert(model)
    real = model_nbytes(model)
    print(f"\nbudget {plan.budget_bytes} B: converted model {real} B, formats {plan.counts()}")
    assert real == plan.total_bytes <= plan.budget_bytes
    assert {line.name: line.format for line in report.layers if line.name != "classifier"} == plan.formats
    # llm_int8_skip_modules: exactly the full-precision modules, as transformers matches them.
    from transformers.quantizers.quantizers_utils import should_convert_module

    linear_names = [n for n, m in bert.named_modules() if isinstance(m, nn.Linear)]
    skipped = {n for n in linear_names if not should_convert_module(n, plan.llm_int8_skip_modules)}
    assert skipped == {n for n, fmt in plan.formats.items() if fmt == "keep"} | {"classifier"}


def test_allocate_rejects_an_unreachable_budget_and_bad_arguments(table):
    with pytest.raises(ValueError, match=r"below the smallest reachable model size \d+ bytes"):
        allocate(table, budget_bytes=table.fixed_bytes)
    with pytest.raises(ValueError, match="exactly one of"):
        allocate(table)
    with pytest.raises(ValueError, match="exactly one of"):
        allocate(table, budget_bytes=1, budget_ratio=0.5)


def _brute_force(table: SensitivityTable, budget: int) -> float:
    names = table.layers()
    best = float("inf")
    for combo in itertools.product(*(table.options(n).values() for n in names)):
        if table.fixed_bytes + sum(r.nbytes for r in combo) <= budget:
            best = min(best, sum(r.sensitivity for r in combo))
    return best


def test_allocate_is_optimal_on_brute_forceable_tables():
    rng = random.Random(0)
    for _ in range(30):
        rows = []
        for layer in range(6):
            size = rng.choice([1000, 4000, 4096, 16384])
            rows += [
                SensitivityRow(f"l{layer}", "nf4", rng.uniform(0, 1), size // 4 + rng.randint(0, 40)),
                SensitivityRow(f"l{layer}", "fp4", rng.uniform(0, 1.5), size // 4 + rng.randint(0, 40)),
                SensitivityRow(f"l{layer}", "int8", rng.uniform(0, 0.2), size // 2),
                SensitivityRow(f"l{layer}", "keep", 0.0, size * 2),
            ]
        table = SensitivityTable(
            rows, fixed_bytes=500, full_bytes=500 + sum(r.nbytes for r in rows if r.format == "keep")
        )
        budget = rng.randint(3000, table.full_bytes)
        expected = _brute_force(table, budget)
        if expected == float("inf"):
            with pytest.raises(ValueError):
                allocate(table, budget_bytes=budget)
            continue
        plan = allocate(table, budget_bytes=budget)
        assert plan.total_sensitivity == pytest.approx(expected, abs=1e-12)
        chosen = [table.options(n)[f] for n, f in plan.formats.items()]
        assert plan.total_bytes == table.fixed_bytes + sum(r.nbytes for r in chosen) <= budget


def test_user_metric_and_format_subset(bert, batches):
    reference = [bert(**b).logits.argmax(-1) for b in batches]

    def agreement(model: nn.Module) -> float:
        """Share of predictions equal to full precision's (a stand-in for validation accuracy)."""
        with torch.no_grad():
            hits = [(model(**b).logits.argmax(-1) == r).float().mean() for b, r in zip(batches, reference)]
        return float(sum(hits) / len(hits))

    table = sensitivity(bert, RECIPE, metric=agreement, formats=("nf4", "keep"))
    assert table.metric == "agreement" and table.baseline == 1.0
    assert {row.format for row in table.rows} == {"nf4", "keep"}
    assert all(row.sensitivity >= 0 for row in table.rows)


def test_sensitivity_errors_name_the_cause(bert, batches):
    with pytest.raises(ValueError, match="`formats` must be a non-empty subset"):
        sensitivity(bert, RECIPE, batches, formats=("nf5",))
    with pytest.raises(ValueError, match="needs `batches`"):
        sensitivity(bert, RECIPE)
    prepare(bert, RECIPE)
    with pytest.raises(ValueError, match="before prepare"):
        sensitivity(bert, RECIPE, batches)


def test_layers_that_cannot_take_4bit_are_noted_not_fatal():
    model = nn.Sequential(nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 64))  # 96 is not a multiple of 64
    table = sensitivity(model, {"weight": {"format": "nf4"}}, [torch.randn(4, 96)])
    assert set(table.options("0")) == {"int8", "keep"}
    assert any("`0` cannot take nf4" in note for note in table.notes)
    plan = allocate(table, budget_ratio=0.5)
    assert plan.formats["0"] in ("int8", "keep")
