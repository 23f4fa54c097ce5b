"""Tiny LightningModules, data and probe callbacks shared by the callback tests (and their subprocess scripts)."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

IN_FEATURES = 64


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    """Quiet, deterministic CPU trainer settings."""
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


def classification_data(n: int = 64, seed: int = 0, classes: int = 4) -> TensorDataset:
    """Inputs with labels from a fixed random teacher, so the task is learnable."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=gen)
    teacher = torch.randn(IN_FEATURES, classes, generator=torch.Generator().manual_seed(1234))
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


def loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(classification_data(n, seed), batch_size=batch_size, shuffle=False, num_workers=0)


class TinyMLP(pl.LightningModule):
    """Two 64x64 hidden layers and a classifier head (kept in full precision by the default rules)."""

    def __init__(self, lr: float = 1e-2, scheduler: bool = False, hidden: int = 64) -> None:
        super().__init__()
        self.lr, self.use_scheduler = lr, scheduler
        self.body = nn.Sequential(
            nn.Linear(IN_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden)
        )
        self.classifier = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.body(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if not self.use_scheduler:
            return optimizer
        # Linear warm-up over 5 steps, then exponential decay: an LR that changes every step.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5) * 0.97**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TokenDataset(Dataset):
    """Random token sequences; the label says whether token 7 occurs (learnable by a tiny BERT)."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 100, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, vocab, (n, length), generator=gen)
        flags = torch.rand(n, generator=gen) < 0.5
        self.ids[flags, 3] = 7
        self.labels = flags.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class TinyBert(pl.LightningModule):
    """A LightningModule wrapping a 2-layer random ``BertForSequenceClassification``."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=2,
        )
        self.bert = BertForSequenceClassification(config)
        self.lr = lr
        self.test_predictions: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.test_predictions.append(logits.detach().clone())
        self.log("test_acc", (logits.argmax(1) == batch["labels"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def token_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(TokenDataset(n, seed=seed), batch_size=batch_size, shuffle=False, num_workers=0)


class StepRecorder(Callback):
    """Records the loss and learning rate of every optimizer step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.steps.append(trainer.global_step)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class KillAtEpoch(Callback):
    """Ends the process abruptly (no teardown, no further checkpoint) when ``epoch`` starts: a simulated crash."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            os._exit(17)


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state that belongs to a quantizer (LSQ multipliers, observer ranges)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if "weight_multiplier" in k or "input_observer" in k
    }
