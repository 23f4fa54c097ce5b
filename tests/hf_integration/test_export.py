"""save_quantized: a folder that plain transformers loads, in a process that never imports this library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tiny_trainer import ToyTask, tiny_bert, tiny_tokenizer, training_args
from transformers import Trainer

from hf_integration import QuantizationTrainerCallback, bnb_quantization_config, parse_front_matter, save_quantized
from lightning_quant import QuantRecipe, convert, prepare

RECIPES = {
    # The pooler is kept by a rule, so the skip list holds more than the default head.
    "nf4": {
        "weight": {"format": "nf4", "double_quant": True},
        "estimator": {"name": "lsq"},
        "rules": [{"pattern": "bert.pooler.dense", "format": "keep"}],
    },
    "int8": {"weight": {"format": "int8"}},
}
METRICS = {"fp32": {"accuracy": 0.875}, "ptq_nf4": {"accuracy": 0.8125}, "qat_nf4": {"accuracy": 0.859375}}

# Runs in a fresh interpreter: transformers + bitsandbytes only, and proves it.
LOADER = textwrap.dedent(
    """
    import json, sys, torch
    import bitsandbytes as bnb
    from transformers import AutoModelForSequenceClassification
    results = {}
    for folder in sys.argv[1:]:
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # bitsandbytes' AVX512-BF16 CPU path rounds activations to bfloat16; compare the float32 one.
                module.support_avx512bf16_for_cpu = False
        inputs = torch.load(folder + "/../inputs.pt")
        with torch.no_grad():
            torch.save(model(**inputs).logits, folder + "/../loaded_logits.pt")
        results[folder] = {name: type(m).__name__ for name, m in model.named_modules() if "Linear" in type(m).__name__}
    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning_quant", "hf_integration"))
    print(json.dumps({"layers": results, "our_modules": ours}))
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Fine-tune, convert and export the tiny BERT once per format."""
    folders = {}
    for fmt, recipe in RECIPES.items():
        root = tmp_path_factory.mktemp(fmt)
        callback = QuantizationTrainerCallback(recipe, convert_on_train_end=True)
        trainer = Trainer(
            tiny_bert(), training_args(root / "run", max_steps=4), train_dataset=ToyTask(), callbacks=[callback]
        )
        trainer.train()
        model = trainer.model.eval()
        inputs = {"input_ids": ToyTask(6, seed=3).input_ids, "attention_mask": torch.ones(6, 12, dtype=torch.long)}
        inputs["attention_mask"][1, 7:] = 0
        with torch.no_grad():
            torch.save(model(**inputs).logits, root / "exported_logits.pt")
        torch.save(inputs, root / "inputs.pt")
        metrics = METRICS if fmt == "nf4" else {"accuracy": 0.85}
        save_quantized(
            model,
            root / "export",
            tokenizer=tiny_tokenizer(root),
            recipe=callback.recipe,
            metrics=metrics,
            base_model="google-bert/bert-base-uncased",
            datasets=["stanfordnlp/sst2"],
            method="qat",
            report=callback.report,
        )
        folders[fmt] = root / "export"
    return folders


@pytest.fixture(scope="module")
def loaded(exported: dict[str, Path]) -> dict[str, object]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", LOADER, *map(str, exported.values())],
        capture_output=True,
        text=True,
        env=env,
        cwd=exported["nf4"].parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", list(RECIPES))
def test_plain_transformers_loads_bit_identical_bnb_model(fmt: str, exported, loaded) -> None:
    assert loaded["our_modules"] == []
    layers = loaded["layers"][str(exported[fmt])]
    expected = "Linear4bit" if fmt == "nf4" else "Linear8bitLt"
    assert layers["bert.encoder.layer.0.attention.self.query"] == expected
    assert layers["bert.encoder.layer.1.output.dense"] == expected
    assert layers["classifier"] == "Linear"
    assert layers["bert.pooler.dense"] == ("Linear" if fmt == "nf4" else expected)
    ours = torch.load(exported[fmt].parent / "exported_logits.pt")
    theirs = torch.load(exported[fmt].parent / "loaded_logits.pt")
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


def test_config_and_files(exported) -> None:
    nf4, int8 = exported["nf4"], exported["int8"]
    names = {p.name for p in nf4.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "quantization_report.json", "README.md"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.startswith(".") for name in os.listdir(nf4.parent))  # no staging left behind

    config = json.loads((nf4 / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    assert config["load_in_4bit"] is True and config["load_in_8bit"] is False
    assert config["bnb_4bit_quant_type"] == "nf4"
    assert config["bnb_4bit_use_double_quant"] is True
    assert config["bnb_4bit_compute_dtype"] == "float32"
    assert sorted(config["llm_int8_skip_modules"]) == ["bert.pooler.dense", "classifier"]

    config8 = json.loads((int8 / "config.json").read_text())["quantization_config"]
    assert config8["load_in_8bit"] is True and config8["load_in_4bit"] is False
    assert config8["llm_int8_threshold"] == 0.0
    assert config8["llm_int8_skip_modules"] == ["classifier"]

    assert QuantRecipe.from_yaml(nf4 / "recipe.yaml") == QuantRecipe.coerce(RECIPES["nf4"])
    report = json.loads((nf4 / "quantization_report.json").read_text())
    assert report["metrics"] == METRICS
    layers = {layer["name"]: layer for layer in report["report"]["layers"]}
    assert layers["bert.encoder.layer.0.attention.self.query"]["format"] == "nf4"
    assert layers["classifier"]["action"] == "kept"
    assert report["model_bytes"]["fp32"] > report["model_bytes"]["qat_nf4"]


def test_model_card(exported) -> None:
    card = (exported["nf4"] / "README.md").read_text()
    meta = parse_front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "google-bert/bert-base-uncased"
    assert {"bitsandbytes", "4-bit", "nf4"} <= set(meta["tags"])
    assert meta["datasets"] == ["stanfordnlp/sst2"]
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == METRICS["qat_nf4"]["accuracy"]
    assert "87.50%" in card and "85.94%" in card and "81.25%" in card  # the FP32 / PTQ / QAT table
    assert "```yaml" in card and "double_quant: true" in card
    assert "8-bit" in parse_front_matter((exported["int8"] / "README.md").read_text())["tags"]


def _converted(recipe: dict) -> torch.nn.Module:
    model = tiny_bert().eval()
    prepare(model, recipe)
    convert(model)
    return model


def test_refuses_to_overwrite_and_replaces_only_when_asked(tmp_path) -> None:
    model = _converted(RECIPES["nf4"])
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized(model, out)
    assert os.listdir(out) == ["notes.txt"]
    save_quantized(model, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_failure_leaves_existing_export_untouched(tmp_path) -> None:
    model = _converted(RECIPES["nf4"])
    out = save_quantized(model, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class BrokenTokenizer:
        def save_pretrained(self, folder: str) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, out, tokenizer=BrokenTokenizer(), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_mixed_formats_are_refused_by_name(tmp_path) -> None:
    model = _converted({"weight": {"format": "nf4"}, "rules": [{"pattern": "*.attention.self.*", "format": "int8"}]})
    with pytest.raises(ValueError, match=r"mixes 4-bit.*`bert.pooler.dense`.*8-bit.*`bert.encoder.layer.0"):
        save_quantized(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()

    model = _converted({"weight": {"format": "nf4"}, "rules": [{"pattern": "*.output.dense", "format": "fp4"}]})
    with pytest.raises(ValueError, match=r"`bnb_4bit_quant_type`.*'fp4': `bert.encoder.layer.0.attention.output"):
        bnb_quantization_config(model)


def test_unconverted_model_is_refused(tmp_path) -> None:
    model = tiny_bert()
    prepare(model, RECIPES["int8"])
    with pytest.raises(ValueError, match=r"fake-quant layers.*convert"):
        save_quantized(model, tmp_path / "export")


def test_recipe_yaml_is_plain_yaml(exported) -> None:
    data = yaml.safe_load((exported["int8"] / "recipe.yaml").read_text())
    assert data["weight"]["format"] == "int8"
