"""Run recipes: overrides, validation before work, content hashes, group-disjoint splits."""

from __future__ import annotations

import pytest

from lightning_quant.config import RecipeError
from lightning_quant.runner.data import load_splits
from lightning_quant.runner.spec import DataSpec, RunRecipe, apply_override, content_hash, deep_merge

BASE = {
    "model": {"path": "some/model"},
    "data": {"data_files": "x.csv"},
    "quantization": {"weight": {"format": "nf4"}},
    "variants": [{"name": "ptq_nf4", "kind": "ptq"}, {"name": "qat_int8", "kind": "qat", "train": {"epochs": 1}}],
}


def test_overrides_address_keys_list_items_by_name_and_parse_yaml():
    data = apply_override(BASE, "variants.qat_int8.train.lr=1.0e-5")
    data = apply_override(data, "seeds=[3, 4]")
    data = apply_override(data, "variants.0.quantization={weight: {format: fp4}}")
    recipe = RunRecipe.from_dict(data)
    assert recipe.variants[1].train.lr == 1e-5
    assert recipe.seeds == [3, 4]
    assert recipe.variants[0].recipe(recipe.quantization).weight.format == "fp4"
    assert BASE["variants"][1]["train"] == {"epochs": 1}  # the input is not mutated
    with pytest.raises(RecipeError, match="no list item 'nope'"):
        apply_override(BASE, "variants.nope.kind=ptq")
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_override(BASE, "seeds")


def test_variant_recipes_are_validated_up_front():
    bad = apply_override(BASE, "variants.ptq_nf4.quantization.weight.block_size=48")
    with pytest.raises(RecipeError, match=r"in `variants\[ptq_nf4\].quantization`: `weight.block_size`"):
        RunRecipe.from_dict(bad)
    with pytest.raises(RecipeError, match="`variants\\[qat\\].train` is required"):
        RunRecipe.from_dict({**BASE, "variants": [{"name": "qat", "kind": "qat"}]})
    with pytest.raises(RecipeError, match="must be unique"):
        RunRecipe.from_dict({**BASE, "variants": [BASE["variants"][0], BASE["variants"][0]]})
    with pytest.raises(RecipeError, match="`export` must be a variant name"):
        RunRecipe.from_dict({**BASE, "export": "qat_nf5"})


def test_deep_merge_and_hash_are_stable():
    merged = deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}})
    assert merged == {"a": {"b": 3, "c": 2}}
    assert content_hash({"x": 1, "y": 2}) == content_hash({"y": 2, "x": 1})
    assert content_hash({"x": 1}) != content_hash({"x": 2})


def test_group_split_keeps_every_group_on_one_side(tiny_csv):
    spec = DataSpec(
        data_files=str(tiny_csv), text_column="text", label_column="category", labels=["rotten", "fresh"],
        group_column="movie_name", test_fraction=0.25, validation_fraction=0.25,
    )  # fmt: skip
    splits = load_splits(spec)
    assert sum(splits.sizes().values()) == 120  # the `plot` row is dropped
    again = load_splits(spec)
    assert again.test["text"] == splits.test["text"]  # fixed by split_seed
    import pandas as pd

    frame = pd.read_csv(tiny_csv)
    movie_of = dict(zip(frame.text, frame.movie_name))
    sides = {name: {movie_of[t] for t in getattr(splits, name)["text"]} for name in ("train", "validation", "test")}
    assert not sides["train"] & sides["test"]
    assert not sides["train"] & sides["validation"]
    assert not sides["validation"] & sides["test"]


def test_stage_key_leaves_out_newer_fields_at_their_default():
    from lightning_quant.config import QuantRecipe
    from lightning_quant.runner.pipeline import _stage_key_recipe

    default = _stage_key_recipe(QuantRecipe.from_dict({"weight": {"format": "nf4"}}))
    assert "deploy_device" not in default  # stages cached before the field existed stay valid
    cuda = _stage_key_recipe(QuantRecipe.from_dict({"weight": {"format": "nf4"}, "deploy_device": "cuda"}))
    assert cuda["deploy_device"] == "cuda" and content_hash(default) != content_hash(cuda)
