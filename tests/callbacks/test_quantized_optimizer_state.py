"""QuantizedOptimizerState: the swap keeps the LR schedule, shrinks the state, keeps the loss curve, resumes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _lq_models import StepRecorder, TinyMLP, loader, trainer_kwargs
from lightning.pytorch.loggers import CSVLogger

from lightning_quant import RecipeError
from lightning_quant.callbacks import QuantizedOptimizerState
from lightning_quant.optim import optimizer_state_bytes

MIN_8BIT_SIZE = 4096


def _run(tmp_path: Path, callbacks: list[Any], steps: int = 40, **kwargs: Any) -> tuple[TinyMLP, StepRecorder, Any]:
    pl.seed_everything(0)
    model, recorder = TinyMLP(lr=1e-2, scheduler=True, hidden=128), StepRecorder()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=steps, callbacks=[recorder, *callbacks], **kwargs))
    trainer.fit(model, loader(n=256, batch_size=32))
    return model, recorder, trainer


def _large_tensor_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    names = {p: n for n, p in model.named_parameters()}
    large = {n for n, p in model.named_parameters() if p.numel() >= MIN_8BIT_SIZE}
    per_parameter = optimizer_state_bytes(optimizer, names).per_parameter
    return sum(v for n, v in per_parameter.items() if n in large)


def test_adamw_lambdalr_keeps_schedule_shrinks_state_and_tracks_loss(tmp_path: Path) -> None:
    """Issue point 4.

    Loss tolerance: at every one of the 40 steps the 8-bit run's loss is within 5% of the initial loss (about 0.07)
    of the 32-bit run's. Why: bitsandbytes keeps Adam's moments block-wise (256 values) in an 8-bit dynamic code, a
    relative error of about 1% per value near the block maximum and more for small values. AdamW divides by
    sqrt(v), so each update's direction is off by a few percent and the two trajectories drift apart slowly; the
    largest gap measured here is about 1.5% of the initial loss, in the steps where the loss falls fastest. The
    bound leaves a 3x margin for other CPUs' rounding, and still fails for a broken swap (a stale optimizer, lost
    moments, a wrong LR), which leaves the loss near its initial value or diverges.
    """
    model32, rec32, trainer32 = _run(tmp_path / "fp32", [])
    swap = QuantizedOptimizerState(min_8bit_size=MIN_8BIT_SIZE)
    logger = CSVLogger(tmp_path, name="logs")
    model8, rec8, trainer8 = _run(tmp_path / "int8", [swap], logger=logger)

    assert type(trainer8.optimizers[0]).__name__ == "AdamW8bit"
    assert trainer8.lr_scheduler_configs[0].scheduler.optimizer is trainer8.optimizers[0]
    assert len(rec8.lrs) == 40 and rec8.lrs == rec32.lrs  # identical LR at every step
    assert len(set(rec8.lrs)) > 30  # and the LR really changed step by step

    before = _large_tensor_bytes(model32, trainer32.optimizers[0])
    after = _large_tensor_bytes(model8, trainer8.optimizers[0])
    assert before / after >= 3.5, (before, after)

    initial = rec32.losses[0]
    assert rec32.losses[-1] < 0.2 * initial  # the toy task is learned
    gaps = [abs(a - b) for a, b in zip(rec32.losses, rec8.losses)]
    assert max(gaps) <= 0.05 * initial, max(gaps)

    # Logged once, after the first optimizer step; the float32 figure matches what torch's AdamW held.
    assert swap.state_bytes["bytes_32bit"] == pytest.approx(
        optimizer_state_bytes(trainer32.optimizers[0]).total, abs=64
    )
    assert swap.state_bytes["bytes_32bit"] / swap.state_bytes["bytes"] > 3
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    rows = [r for r in csv.DictReader(metrics) if r.get("optimizer_state/bytes")]
    assert [int(r["step"]) for r in rows] == [1]
    assert float(rows[0]["optimizer_state/bytes"]) == swap.state_bytes["bytes"]


class _Embedder(pl.LightningModule):
    def __init__(self, amsgrad: bool = False) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(64, 64)
        self.proj = torch.nn.Linear(64, 64)
        self.amsgrad = amsgrad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.proj(self.embedding(batch[0][:, :4].abs().long() % 64)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, amsgrad=self.amsgrad)


@pytest.mark.parametrize(("embeddings", "dtype"), [("32bit", torch.float32), ("8bit", torch.uint8)])
def test_embeddings_keep_32bit_state_by_default(tmp_path: Path, embeddings: str, dtype: torch.dtype) -> None:
    model = _Embedder()
    swap = QuantizedOptimizerState(embeddings=embeddings, min_8bit_size=MIN_8BIT_SIZE)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[swap]))
    trainer.fit(model, loader())
    state = trainer.optimizers[0].state
    assert type(trainer.optimizers[0]).__name__ == "Adam8bit"
    assert state[model.embedding.weight]["state1"].dtype == dtype
    assert state[model.proj.weight]["state1"].dtype == torch.uint8


def test_unsupported_option_is_named(tmp_path: Path) -> None:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[QuantizedOptimizerState()]))
    with pytest.raises(ValueError, match="amsgrad=True"):
        trainer.fit(_Embedder(amsgrad=True), loader())


def test_arguments_are_validated_and_bits_32_is_a_no_op(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="optimizer_state.embeddings"):
        QuantizedOptimizerState(embeddings="4bit")
    with pytest.raises(RecipeError, match="optimizer_state.bits"):
        QuantizedOptimizerState(bits=4)
    assert QuantizedOptimizerState().state_key != QuantizedOptimizerState(paged=True).state_key
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[QuantizedOptimizerState(bits=32)]))
    trainer.fit(TinyMLP(), loader())
    assert type(trainer.optimizers[0]) is torch.optim.AdamW


def test_resume_loads_8bit_state_into_the_8bit_optimizer(tmp_path: Path) -> None:
    """A checkpoint of the 8-bit run resumes into an 8-bit optimizer (the swap runs before the state loads): two
    epochs in one go equal one epoch, a checkpoint, and one more epoch from it."""

    def run(epochs: int, ckpt_path: Path | None = None) -> tuple[TinyMLP, StepRecorder, pl.Trainer]:
        model, recorder = TinyMLP(scheduler=True), StepRecorder()
        callbacks = [QuantizedOptimizerState(min_8bit_size=1024), recorder]
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs, callbacks=callbacks))
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return model, recorder, trainer

    pl.seed_everything(0)
    full, full_rec, _ = run(2)
    pl.seed_everything(0)
    _, _, trainer = run(1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    saved = torch.load(tmp_path / "half.ckpt", weights_only=False)["optimizer_states"][0]["state"][0]
    assert saved["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8  # how bitsandbytes saves it

    resumed, rec, trainer = run(2, tmp_path / "half.ckpt")
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit"
    assert rec.lrs == full_rec.lrs[4:] and rec.losses == full_rec.losses[4:]
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
