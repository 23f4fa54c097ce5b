"""Training through a Lightning ``Trainer`` (with ``QuantizationAwareTraining`` for QAT)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.config import QuantRecipe
from lightning_quant.runner.evaluate import batches
from lightning_quant.runner.training import (
    PeakMemory,
    TrainOutcome,
    distillation_loss,
    linear_warmup_decay,
    parameter_groups,
    total_steps,
)

__all__ = ["train_lightning"]


def _module_class():
    import lightning as L

    class SequenceClassifier(L.LightningModule):
        """A Hugging Face sequence classifier as a LightningModule (what a user would write)."""

        def __init__(self, model: nn.Module, spec: Any, steps: int, teacher: nn.Module | None) -> None:
            super().__init__()
            self.model, self.spec, self.steps = model, spec, steps
            self.model.train()  # from_pretrained returns eval mode; train with dropout as the HF Trainer does
            # Kept out of the module tree: the teacher is frozen and not part of checkpoints.
            self._teacher = [teacher] if teacher is not None else []

        def forward(self, **inputs: torch.Tensor) -> Any:
            return self.model(**inputs)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            labels = batch.pop("labels")
            logits = self.model(**batch).logits
            teacher_logits = None
            if self._teacher and self.spec.distill.weight > 0:
                with torch.no_grad():
                    teacher_logits = self._teacher[0](**batch).logits
            loss = distillation_loss(logits, labels, teacher_logits, self.spec.distill)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(parameter_groups(self.model, self.spec.weight_decay), lr=self.spec.lr)
            scheduler = linear_warmup_decay(optimizer, self.steps, self.spec.warmup_ratio)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return SequenceClassifier


def _loss_history() -> Any:
    """A callback collecting the training loss per step (Lightning keeps only the latest value)."""
    import lightning as L

    class LossHistory(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    return LossHistory()


def train_lightning(
    model: nn.Module,
    tokenizer: Any,
    train_dataset: Any,
    spec: Any,
    workdir: Path,
    seed: int,
    recipe: QuantRecipe | None = None,
    teacher: nn.Module | None = None,
) -> TrainOutcome:
    """Fine-tune (or QAT when ``recipe`` quantizes weights) with ``lightning.Trainer``.

    Resumes from ``workdir/last.ckpt`` when an interrupted run left one.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_quant.callbacks import QuantizationAwareTraining, QuantizedOptimizerState
    from lightning_quant.optim import optimizer_state_bytes

    L.seed_everything(seed, workers=True, verbose=False)
    steps = total_steps(len(train_dataset), spec)
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=workdir, save_last=True, save_top_k=0, every_n_train_steps=spec.checkpoint_every)
    ]
    state = recipe.optimizer_state if recipe is not None else None
    if recipe is not None and state is None:
        callbacks.append(QuantizationAwareTraining(recipe))
    if state is not None and state.bits == 8:
        callbacks.append(
            QuantizedOptimizerState(
                bits=8, paged=state.paged, embeddings=state.embeddings, min_8bit_size=state.min_8bit_size
            )
        )
    history = _loss_history()
    callbacks.append(history)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, steps // 20),
    )
    module = _module_class()(model, spec, steps, teacher)
    loader = batches(train_dataset, tokenizer, spec.batch_size, shuffle=True, seed=seed)
    last = workdir / "last.ckpt"
    if last.is_file():
        print(f"lightning-quant resuming from {last}", file=sys.stderr)
    start = time.perf_counter()
    with PeakMemory() as memory:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if last.is_file() else None)
    return TrainOutcome(
        seconds=time.perf_counter() - start,
        steps=trainer.global_step,
        peak_rss_bytes=memory.peak,
        rss_growth_bytes=memory.growth,
        optimizer_state_bytes=optimizer_state_bytes(trainer.optimizers[0]).to_dict(),
        losses=history.losses,
    )
