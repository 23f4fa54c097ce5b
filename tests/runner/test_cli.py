"""``lightning-quant``: every recipe validates and runs end to end on a tiny model and tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_quant.cli import main

RECIPES = sorted(Path("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates(recipe, capsys):
    assert main(["validate", str(recipe)]) == 0
    assert "valid RunRecipe" in capsys.readouterr().out


def _stages(output_dir: Path) -> set[str]:
    return {p.name for p in (output_dir / "stages").iterdir()}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_runs_end_to_end_on_tiny_model(recipe, tiny_overrides, tmp_path):
    output_dir = tmp_path / "out"
    assert main(["run", str(recipe), "--quick", "--output-dir", str(output_dir), *tiny_overrides]) == 0
    results = json.loads((output_dir / "results.json").read_text())
    names = {v["name"] for v in yaml.safe_load(recipe.read_text())["variants"]}
    assert set(results["summary"]) == {"fp32", *names}
    for name, stats in results["summary"].items():
        assert 0.0 <= stats["accuracy"]["median"] <= 1.0, name
    for variant in yaml.safe_load(recipe.read_text())["variants"]:
        expected = {"optimizer_state": "fine-tuned"}.get(variant["kind"], "converted")
        if variant.get("quantization", {}).get("deploy_device") == "cuda":
            expected = "simulation"
        evaluated = results["seeds"]["0"][variant["name"]]["evaluated"]
        assert evaluated.startswith(expected), (variant["name"], evaluated)
    assert (output_dir / "results.md").read_text().count("|") > 10
    assert (output_dir / "results.png").stat().st_size > 1000
    export = yaml.safe_load(recipe.read_text()).get("export")
    if export:
        config = json.loads((output_dir / "export" / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "bitsandbytes"
        card = (output_dir / "export" / "README.md").read_text()
        assert all(name.replace("_", " ").upper() in card.upper() or name in card for name in names)


def test_rerun_does_no_training_and_backends_agree_on_stages(tiny_overrides, tmp_path, capsys):
    recipe = "recipes/bert_accuracy_recovery.yaml"
    hf_dir, lightning_dir = tmp_path / "hf", tmp_path / "lightning"
    assert main(["run", recipe, "--quick", "--output-dir", str(hf_dir), *tiny_overrides]) == 0
    first = json.loads((hf_dir / "results.json").read_text())
    capsys.readouterr()
    assert main(["run", recipe, "--quick", "--output-dir", str(hf_dir), *tiny_overrides]) == 0
    log = capsys.readouterr().err
    assert "fine-tuning" not in log and "FP32 stage cached, no training" in log
    assert json.loads((hf_dir / "results.json").read_text())["seeds"] == first["seeds"]
    args = ["run", recipe, "--quick", "--backend", "lightning", "--output-dir", str(lightning_dir), *tiny_overrides]
    assert main(args) == 0
    strip = {name.rsplit("-", 1)[0] for name in _stages(hf_dir)}
    assert strip == {name.rsplit("-", 1)[0] for name in _stages(lightning_dir)}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "data.label_column=verdict"], "`data.label_column` 'verdict' is not a column"),
        (["--set", "data.data_files=/nonexistent/reviews.csv"], "does not exist"),
        (["--set", "variants.ptq_nf4.quantization.weight.format=nf5"], "`weight.format` must be one of"),
        (["--set", "finetune.lr=-1"], "`lr` must be > 0"),
        (["--backend", "tensorflow"], "`--backend` must be one of lightning, hf"),
        (["--set", "model.path=package:not-a-package/model"], "is not installed"),
    ],
)
def test_bad_input_fails_before_training(extra, message, tiny_overrides, tmp_path, capsys):
    output_dir = tmp_path / "out"
    code = main(["run", "recipes/bert_accuracy_recovery.yaml", "--quick", "--output-dir", str(output_dir),
                 *tiny_overrides, *extra])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (output_dir / "stages").exists()


def test_existing_output_dir_is_never_silently_overwritten(tiny_overrides, tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "precious.txt").write_text("keep me")
    code = main(["run", "recipes/bert_nf4_ptq.yaml", "--quick", "--output-dir", str(output_dir), *tiny_overrides])
    assert code == 2
    assert "not a lightning-quant run" in capsys.readouterr().err
    assert (output_dir / "precious.txt").read_text() == "keep me"


def test_missing_recipe_and_report_rerender(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
