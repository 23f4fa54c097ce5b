"""Training through the Hugging Face ``Trainer`` (with ``QuantizationTrainerCallback`` for QAT)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.config import QuantRecipe
from lightning_quant.runner.training import (
    PeakMemory,
    TrainOutcome,
    distillation_loss,
    linear_warmup_decay,
    parameter_groups,
    total_steps,
)

__all__ = ["train_hf"]


def _trainer_class():
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """The stock Trainer plus a frozen teacher's soft targets in the loss (the runner's choice;
        the quantization callback itself works with an unchanged Trainer)."""

        def __init__(self, *args: Any, teacher: nn.Module | None = None, distill: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher, self.distill = teacher, distill

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            teacher_logits = None
            if self.teacher is not None and self.distill.weight > 0:
                with torch.no_grad():
                    teacher_logits = self.teacher(**inputs).logits
            loss = distillation_loss(outputs.logits, labels, teacher_logits, self.distill)
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def _last_checkpoint(directory: Path) -> str | None:
    """The newest *complete* checkpoint (the Trainer writes ``trainer_state.json`` last)."""
    complete = [p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    if not complete:
        return None
    return str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1])))


def train_hf(
    model: nn.Module,
    tokenizer: Any,
    train_dataset: Any,
    spec: Any,
    workdir: Path,
    seed: int,
    recipe: QuantRecipe | None = None,
    teacher: nn.Module | None = None,
) -> TrainOutcome:
    """Fine-tune (or QAT when ``recipe`` quantizes weights) with ``transformers.Trainer``.

    Resumes from the newest checkpoint in ``workdir`` (an interrupted run continues there).
    ``recipe.optimizer_state`` swaps AdamW for its bitsandbytes 8-bit twin.
    """
    from transformers import DataCollatorWithPadding, TrainingArguments

    from lightning_quant.optim import embedding_parameters, optimizer_state_bytes, to_8bit_optimizer

    steps = total_steps(len(train_dataset), spec)
    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.lr,
        weight_decay=spec.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=spec.warmup_ratio,  # a float < 1 is a fraction of the steps
        max_steps=steps,
        seed=seed,
        data_seed=seed,
        save_strategy="steps",
        save_steps=spec.checkpoint_every,
        save_total_limit=1,
        logging_steps=max(1, steps // 20),
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    callbacks = []
    if recipe is not None and recipe.optimizer_state is None:
        from hf_integration import QuantizationTrainerCallback

        callbacks.append(QuantizationTrainerCallback(recipe))
    optimizers: tuple[Any, Any] = (None, None)
    state = recipe.optimizer_state if recipe is not None else None
    if state is not None and state.bits == 8:
        # The Trainer would build AdamW (no decay on biases / LayerNorm) and a linear schedule;
        # build the same, with bitsandbytes' 8-bit state.
        optimizer = to_8bit_optimizer(
            torch.optim.AdamW(parameter_groups(model, spec.weight_decay), lr=spec.lr),
            paged=state.paged,
            embeddings=state.embeddings,
            min_8bit_size=state.min_8bit_size,
            embedding_params=embedding_parameters(model),
        )
        optimizers = (optimizer, linear_warmup_decay(optimizer, steps, spec.warmup_ratio))
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
        optimizers=optimizers,
        teacher=teacher,
        distill=spec.distill,
    )
    resume = _last_checkpoint(workdir)
    if resume:
        print(f"lightning-quant resuming from {resume}", file=sys.stderr)
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = trainer.train(resume_from_checkpoint=resume)
    outcome = TrainOutcome(
        seconds=time.perf_counter() - start,
        steps=result.global_step,
        peak_rss_bytes=memory.peak,
        rss_growth_bytes=memory.growth,
        optimizer_state_bytes=optimizer_state_bytes(trainer.optimizer).to_dict(),
        losses=[float(e["loss"]) for e in trainer.state.log_history if "loss" in e],
    )
    return outcome
