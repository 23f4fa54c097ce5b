"""Recipes: every config round-trips (dict, YAML, JSON, pickle, deepcopy); bad recipes fail clearly."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
import yaml

from lightning_quant._schema import build_dataclass, to_plain
from lightning_quant.config import (
    ActivationConfig,
    CalibrationConfig,
    EstimatorConfig,
    ExportConfig,
    OptimizerStateConfig,
    QuantRecipe,
    RecipeError,
    RuleConfig,
    ScheduleConfig,
    WeightConfig,
)

NON_DEFAULT = {
    WeightConfig: WeightConfig(format="fp4", block_size=128, double_quant=True, compute_dtype="bfloat16"),
    ActivationConfig: ActivationConfig(mode="static", signed=False, symmetric=True, observer="minmax"),
    EstimatorConfig: EstimatorConfig(name="lsq", lsq_granularity="row", lsq_init=0.9, lsq_min=0.5),
    CalibrationConfig: CalibrationConfig(method="percentile", num_batches=3, percentile=99.9),
    ScheduleConfig: ScheduleConfig(fake_quant_start_step=10, observer_freeze_step=20),
    RuleConfig: RuleConfig(pattern="*attention*", format="int8"),
    OptimizerStateConfig: OptimizerStateConfig(paged=True, embeddings="8bit", min_8bit_size=0),
    ExportConfig: ExportConfig(output_dir="out", push_to_hub=True, repo_id="me/model", private=True),
    QuantRecipe: QuantRecipe(
        weight=WeightConfig(format="nf4", double_quant=True),
        rules=[RuleConfig(pattern="classifier*", format="keep"), RuleConfig(pattern="*.query", format="int8")],
        optimizer_state=OptimizerStateConfig(),
        strict=True,
    ),
}


@pytest.mark.parametrize("config", list(NON_DEFAULT.values()), ids=lambda c: type(c).__name__)
def test_every_config_round_trips(config):
    cls = type(config)
    plain = to_plain(config)
    assert build_dataclass(cls, plain, "") == config
    assert build_dataclass(cls, yaml.safe_load(yaml.safe_dump(plain)), "") == config
    assert build_dataclass(cls, json.loads(json.dumps(plain)), "") == config
    assert pickle.loads(pickle.dumps(config)) == config
    assert copy.deepcopy(config) == config


def test_recipe_file_round_trip_and_version(tmp_path):
    recipe = NON_DEFAULT[QuantRecipe]
    path = tmp_path / "recipe.yaml"
    recipe.to_yaml(path)
    assert QuantRecipe.from_yaml(path) == recipe
    assert QuantRecipe.from_json(recipe.to_json()) == recipe
    assert recipe.to_dict()["version"] == 1


def test_smallest_recipe_and_defaults():
    recipe = QuantRecipe.from_dict({"weight": {"format": "nf4"}})
    assert recipe.weight.block_size == 64 and recipe.weight.double_quant is False
    assert recipe.keep_heads is True
    recipe = QuantRecipe.from_dict({"weight": {"format": "nf4", "block_size": 64, "double_quant": True}})
    assert recipe.weight.double_quant is True


def test_run_recipe_quantization_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "x"}, "quantization": {"weight": {"format": "int8"}}}))
    assert QuantRecipe.from_yaml(path).weight.format == "int8"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"wieght": {"format": "nf4"}}, r"unknown key `wieght`; did you mean `weight`\?"),
        ({"weight": {"formt": "nf4"}}, r"unknown key `weight.formt`; did you mean `weight.format`\?"),
        ({"weight": {"format": "nf5"}}, r"`weight.format` must be one of int8, llm_int8, nf4, fp4; got 'nf5'"),
        ({"weight": {"format": "nf4", "block_size": 48}}, r"`weight.block_size` must be one of 32, 64, .*; got 48"),
        ({"weight": {"block_size": "64"}}, r"`weight.block_size` must be an integer; got '64'"),
        ({"weight": {"double_quant": "yes"}}, r"`weight.double_quant` must be true or false; got 'yes'"),
        ({"weight": "nf4"}, r"`weight` must be a mapping of WeightConfig fields; got 'nf4'"),
        ({"rules": {"pattern": "x"}}, r"`rules` must be a list"),
        ({"rules": [{"pattern": "x", "format": "int4"}]}, r"`rules\[\].format` must be one of .*keep; got 'int4'"),
        ({"rules": [{"format": "keep"}]}, r"`rules\[0\].pattern` is required"),
        ({"estimator": {"name": "lsqq"}}, r"`estimator.name` must be one of ste, clipped_ste, lsq; got 'lsqq'"),
        ({"calibration": {"num_batches": 0}}, r"`calibration.num_batches` must be >= 1; got 0"),
        ({"schedule": {"fake_quant_start_step": -1}}, r"`schedule.fake_quant_start_step` must be >= 0"),
        ({"export": {"push_to_hub": True}}, r"`export.repo_id` is required"),
        ({"version": 2}, r"`version` must be 1"),
        ([1, 2], r"a recipe must be a mapping"),
    ],
)
def test_bad_recipes_name_the_key_value_and_fix(data, message):
    with pytest.raises(RecipeError, match=message):
        QuantRecipe.from_dict(data)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QuantRecipe.from_yaml(tmp_path / "nope.yaml")


def test_configs_are_dataclasses_with_help_in_docstrings():
    for cls in NON_DEFAULT:
        assert dataclasses.is_dataclass(cls)
        assert cls.__doc__ and "Args" in cls.__doc__ or cls in (RuleConfig,)
