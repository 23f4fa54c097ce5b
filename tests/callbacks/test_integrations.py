"""Issue point 5: the callbacks, unchanged, on Lightning's own demo modules and from a LightningCLI YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from _lq_models import trainer_kwargs
from lightning.pytorch.demos import LightningTransformer, Transformer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import prepare
from lightning_quant.callbacks import PostTrainingQuantization, QuantizationAwareTraining

VOCAB = 32


def _kinds(model: torch.nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _tokens(n: int = 16, length: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, VOCAB, (n, length), generator=gen)
    return DataLoader(TensorDataset(inputs, inputs.roll(-1, dims=1)), batch_size=4)


def test_boring_model_qat_then_test(tmp_path: Path) -> None:
    qat = QuantizationAwareTraining({"weight": {"format": "nf4", "block_size": 32}}, convert_on_fit_end=True)
    model = BoringModel()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=3, limit_val_batches=2, limit_test_batches=2, callbacks=[qat])
    )
    trainer.fit(model)
    assert type(model.layer).__name__ == "Linear4bit"
    assert trainer.test(model, verbose=False) == [{}]  # BoringModel logs nothing; it ran on the bnb layer


# torch's attention reads child weights directly instead of calling the child: MultiheadAttention reads
# `out_proj.weight` (F.multi_head_attention_forward), and TransformerEncoderLayer's eval fast path
# (torch._transformer_encoder_layer_fwd) reads `linear1.weight` / `linear2.weight`. So out_proj stays nn.Linear and
# the fast path is off; lightning_quant.rules handles neither yet (see test_transformer_demo_default_rules).
TRANSFORMER_RECIPE = {"weight": {"format": "int8"}, "rules": [{"pattern": "*.out_proj", "format": "keep"}]}


@pytest.fixture
def no_mha_fastpath() -> Any:
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(enabled)


def _transformer() -> LightningTransformer:
    model = LightningTransformer(vocab_size=VOCAB)
    model.prepare_data = lambda: None  # type: ignore[method-assign]  # the demo downloads WikiText-2 otherwise
    return model


def test_lightning_transformer_demo_qat_and_ptq(tmp_path: Path, no_mha_fastpath: None) -> None:
    pl.seed_everything(0)
    model = _transformer()
    qat = QuantizationAwareTraining(TRANSFORMER_RECIPE, log_every_n_steps=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[qat]))
    trainer.fit(model, _tokens())
    assert _kinds(model).count("FakeQuantLinear") == 9  # linear1/linear2 of 4 layers + decoder
    inputs, target = next(iter(_tokens(seed=1)))
    model.eval()
    with torch.no_grad():
        fake_quant = model(inputs, target)

    # LightningTransformer has no test/predict step to hang PTQ on, so call the callback's verb on the fitted trainer:
    # it calibrates on the train dataloader the trainer still holds, with (inputs, target) batches as forward(*batch).
    ptq = PostTrainingQuantization(TRANSFORMER_RECIPE, num_batches=2)
    ptq.quantize_model(trainer, model, "manual")
    assert _kinds(model).count("Linear8bitLt") == 9
    with torch.no_grad():
        converted = model(inputs, target)
    # bitsandbytes' CPU int8 path rounds activations through float16: equal to float rounding, not bit for bit.
    assert torch.allclose(converted, fake_quant, atol=2e-2, rtol=0), (converted - fake_quant).abs().max()


def test_transformer_demo_default_rules() -> None:
    from lightning_quant import convert

    model = Transformer(vocab_size=VOCAB, nlayers=1, dropout=0.0).eval()
    inputs = torch.randint(0, VOCAB, (2, 8))
    report = prepare(model, {"weight": {"format": "int8"}})
    # torch reads these layers' weights directly (MHA's out_proj, the encoder layer's fused path): kept.
    kept = {layer.name for layer in report.layers if layer.action == "kept"}
    assert any(name.endswith("self_attn.out_proj") for name in kept)
    assert "transformer.encoder.layers.0.linear1" in kept  # torch's encoder fast path reads it directly
    convert(model)
    assert type(model.decoder).__name__ == "Linear8bitLt"
    with torch.no_grad():
        assert torch.isfinite(model(inputs, inputs)).all()


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_lightning_cli_yaml_with_class_path_callbacks(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    recipe = _write(tmp_path / "recipe.yaml", {"weight": {"format": "nf4", "block_size": 32}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(tmp_path),
            "accelerator": "cpu",
            "max_steps": 2,
            "limit_val_batches": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "lightning_quant.callbacks.QuantizationAwareTraining",
                    "init_args": {"recipe": str(recipe), "convert_on_fit_end": True, "log_every_n_steps": 1},
                },
                {
                    "class_path": "lightning_quant.callbacks.PostTrainingQuantization",
                    "init_args": {"recipe": {"weight": {"format": "int8"}}, "num_batches": 2, "when": "test"},
                },
            ],
        },
        "model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
    }
    cli = LightningCLI(
        args=["fit", "--config", str(_write(tmp_path / "config.yaml", config))], save_config_callback=None
    )
    qat = next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining))
    ptq = next(c for c in cli.trainer.callbacks if isinstance(c, PostTrainingQuantization))
    assert qat.recipe.weight.block_size == 32 and qat.convert_on_fit_end
    assert ptq.recipe.weight.format == "int8" and ptq.when == ("test",)
    assert type(cli.model.layer).__name__ == "Linear4bit"
