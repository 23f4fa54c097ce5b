"""PostTrainingQuantization: at fit end, before test with ``ckpt_path``, on either dataloader, re-quantizing reloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _lq_models import TinyBert, TinyMLP, loader, token_loader, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_quant import quantize
from lightning_quant.callbacks import PostTrainingQuantization

STATIC_INT8 = {"weight": {"format": "int8"}, "activation": {"mode": "static"}}


class InputsOnly(PostTrainingQuantization):
    """For ``(x, y)`` batches: calibration feeds ``x`` alone to ``forward``."""

    def calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return (x for x, _ in super().calibration_batches(trainer, pl_module))


class TokenData(pl.LightningDataModule):
    def train_dataloader(self) -> Any:
        return token_loader()

    def val_dataloader(self) -> Any:
        return token_loader(n=32, seed=4)

    def test_dataloader(self) -> Any:
        return token_loader(n=32, seed=5)


def _kinds(model: torch.nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_fit_end_calibrates_on_train_batches_and_converts(tmp_path: Path) -> None:
    train = loader(n=64, batch_size=16)
    ptq = InputsOnly(STATIC_INT8, num_batches=2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[ptq]))
    model = TinyMLP()
    trainer.fit(model, train)
    assert _kinds(model) == ["Linear8bitLt"] * 3 + ["Linear"]
    assert ptq.report is not None and ptq.report.count("converted") == 3
    first = ptq.report.layer("body.0").metrics
    seen = torch.cat([x for x, _ in list(train)[:2]])  # exactly num_batches batches of the train dataloader
    assert first["calibration_batches"] == 2
    assert (first["input_min"], first["input_max"]) == (float(seen.min()), float(seen.max()))
    assert ptq.state_dict() == {"quantized_at": ["fit_end"]}


def test_test_with_ckpt_path_quantizes_the_checkpoint_weights(tmp_path: Path) -> None:
    """A full-precision checkpoint, a fresh model, ``trainer.test(ckpt_path=...)``: the checkpoint's weights are
    quantized (Lightning loads them before ``on_test_start``), exactly as ``quantize`` does by hand."""
    pl.seed_everything(0)
    trained = TinyBert()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3))
    trainer.fit(trained, token_loader())
    trainer.save_checkpoint(tmp_path / "fp32.ckpt")

    recipe = {"weight": {"format": "nf4"}}
    fresh = TinyBert()  # other weights: only the checkpoint's may reach the result
    ptq = PostTrainingQuantization(recipe, num_batches=2, dataloader="val", when="test")
    tester = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ptq]))
    # The datamodule's val_dataloader() calibrates: the trainer holds no val loader during test.
    tester.test(fresh, datamodule=TokenData(), ckpt_path=tmp_path / "fp32.ckpt", verbose=False)
    assert _kinds(fresh).count("Linear4bit") == 13

    by_hand = TinyBert()
    by_hand.load_state_dict(torch.load(tmp_path / "fp32.ckpt", weights_only=False)["state_dict"])
    quantize(by_hand, recipe)
    by_hand.eval()
    batch = next(iter(token_loader(n=32, seed=5)))
    with torch.no_grad():
        expected = by_hand(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(fresh.test_predictions[0], expected)


def test_val_dataloader_from_the_module_hook_at_test_time(tmp_path: Path) -> None:
    """``dataloader="val"`` during ``test``: the trainer holds no val loader, so the module's hook provides it."""
    ptq = PostTrainingQuantization(
        {"weight": {"format": "nf4", "block_size": 32}, "activation": {"mode": "static"}},
        num_batches=3,
        dataloader="val",
        when="test",
    )
    model = BoringModel()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ptq])).test(model, verbose=False)
    assert type(model.layer).__name__ == "Linear4bit"
    assert ptq.report is not None and ptq.report.layer("layer").metrics["calibration_batches"] == 3


def test_best_checkpoint_is_quantized_again_after_reload(tmp_path: Path) -> None:
    """Converted at fit end; ``test(ckpt_path="best")`` brings back full-precision weights, which are quantized
    again before testing, with the same result as quantizing the best checkpoint by hand."""
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss")
    ptq = InputsOnly({"weight": {"format": "nf4"}}, num_batches=2)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, callbacks=[ptq, checkpoint], enable_checkpointing=True)
    )
    model = TinyMLP()
    trainer.fit(model, loader(), loader(seed=1))
    assert _kinds(model) == ["Linear4bit"] * 3 + ["Linear"]
    result = trainer.test(model, loader(seed=2), ckpt_path="best", verbose=False)[0]
    assert _kinds(model) == ["Linear4bit"] * 3 + ["Linear"]
    # The callback state came back from the (pre-quantization) checkpoint; then test quantized.
    assert ptq.state_dict()["quantized_at"] == ["test"]

    by_hand = TinyMLP()
    by_hand.load_state_dict(torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"])
    quantize(by_hand, {"weight": {"format": "nf4"}})
    assert pl.Trainer(**trainer_kwargs(tmp_path)).test(by_hand, loader(seed=2), verbose=False)[0] == result


def test_arguments_and_missing_dataloader_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`when`"):
        PostTrainingQuantization({"weight": {"format": "nf4"}}, when="train_start")
    with pytest.raises(ValueError, match="`dataloader`"):
        PostTrainingQuantization({"weight": {"format": "nf4"}}, dataloader="test")
    with pytest.raises(ValueError, match="num_batches"):
        PostTrainingQuantization({"weight": {"format": "nf4"}}, num_batches=0)
    ptq = PostTrainingQuantization({"weight": {"format": "int8"}}, when="test")
    with pytest.raises(ValueError, match="train_dataloader"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ptq])).test(TinyMLP(), loader(), verbose=False)
