"""create_8bit_optimizer: the Trainer's own optimizer and schedule, with bitsandbytes 8-bit state."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_trainer import ToyTask, losses, tiny_bert, training_args
from transformers import Trainer, TrainerCallback

from hf_integration import QuantizationTrainerCallback, create_8bit_optimizer
from lightning_quant.optim import optimizer_state_bytes

# Tensors of the tiny BERT have 4096..8192 elements; bitsandbytes' default threshold (4096) would keep
# the 64x64 ones in 32 bits.
RECIPE = {"weight": {"format": "nf4"}, "optimizer_state": {"bits": 8, "min_8bit_size": 1024}}
# Per-step training loss of the 8-bit run may differ from the 32-bit run by at most this much
# (measured: 0.0016 over 40 steps of this task).
LOSS_TOLERANCE = 0.02


def _trainer(output_dir, recipe=RECIPE, log_every: int = 0, **overrides) -> Trainer:
    args = training_args(output_dir, per_device_train_batch_size=16, learning_rate=2e-3, weight_decay=0.01, **overrides)
    callback = QuantizationTrainerCallback(recipe, log_every_n_steps=log_every)
    return Trainer(tiny_bert(), args, train_dataset=ToyTask(256), callbacks=[callback])


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


def test_8bit_state_is_smaller_and_trains_like_32bit(tmp_path) -> None:
    full = _trainer(tmp_path / "fp32", max_steps=24)
    full.train()
    eight = _trainer(tmp_path / "int8", max_steps=24, log_every=24)
    returned = create_8bit_optimizer(eight)
    assert eight.optimizer is returned and type(returned).__name__ == "AdamW8bit"
    eight.train()

    # The Trainer's param groups (weight decay / no weight decay) and its scheduler, on the 8-bit optimizer.
    names = {p: n for n, p in eight.model.named_parameters()}
    full_names = {p: n for n, p in full.model.named_parameters()}
    groups = [({names[p] for p in g["params"]}, g["weight_decay"]) for g in _inner(eight.optimizer).param_groups]
    full_groups = [({full_names[p] for p in g["params"]}, g["weight_decay"]) for g in full.optimizer.param_groups]
    assert groups == full_groups and [wd for _, wd in groups] == [0.01, 0.0]
    assert _inner(eight.lr_scheduler.optimizer) is _inner(eight.optimizer)
    lrs = [e["learning_rate"] for e in eight.state.log_history if "learning_rate" in e]
    assert lrs == [e["learning_rate"] for e in full.state.log_history if "learning_rate" in e]

    # Embeddings keep 32-bit state; the rest is 8-bit and >= 3.5x smaller than AdamW's float32 moments.
    state = _inner(eight.optimizer).state
    assert state[eight.model.bert.embeddings.word_embeddings.weight]["state1"].dtype == torch.float32
    quantized = [p for p in state if state[p]["state1"].dtype == torch.uint8]
    assert len(quantized) == 13  # every linear weight of the encoder and pooler
    bytes8 = optimizer_state_bytes(_inner(eight.optimizer), names)
    bytes32 = optimizer_state_bytes(full.optimizer, full_names)
    on_quantized = sum(bytes32.per_parameter[names[p]] for p in quantized)
    assert on_quantized / bytes8.quantized >= 3.5
    reported = [e for e in eight.state.log_history if "quant/optimizer_state_bytes" in e]  # via Trainer.log
    assert [(e["quant/optimizer_state_bytes"], e["quant/optimizer_state_8bit_bytes"]) for e in reported] == [
        (bytes8.total, bytes8.quantized)
    ]

    ours, theirs = losses(eight), losses(full)
    assert ours.keys() == theirs.keys()
    assert max(abs(ours[s] - theirs[s]) for s in ours) <= LOSS_TOLERANCE
    assert sum(ours[s] for s in (21, 22, 23, 24)) / 4 < 0.6  # it learns (0.69 at the start)


class Crash(Exception):
    pass


class CrashOnSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        raise Crash


def test_8bit_state_resumes_exactly(tmp_path) -> None:
    def run(folder, resume=None, crash=False) -> Trainer:
        trainer = _trainer(folder, max_steps=6, save_strategy="steps", save_steps=3)
        if crash:
            trainer.add_callback(CrashOnSave())
        create_8bit_optimizer(trainer)
        with contextlib.suppress(Crash):
            trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "a")
    run(tmp_path / "b", crash=True)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-3"))
    expected, got = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert {s: v for s, v in losses(resumed).items() if s > 3} == {
        s: v for s, v in losses(uninterrupted).items() if s > 3
    }


def test_user_optimizer_and_scheduler_are_converted(tmp_path) -> None:
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    trainer = Trainer(
        model,
        training_args(tmp_path, max_steps=2),
        train_dataset=ToyTask(),
        callbacks=[QuantizationTrainerCallback({"weight": {"format": "int8"}})],
        optimizers=(optimizer, scheduler),
    )
    new = create_8bit_optimizer(trainer, RECIPE)
    assert scheduler.optimizer is new and new.param_groups[0]["lr"] == 5e-4
    trainer.train()
    assert trainer.lr_scheduler is scheduler


def test_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(ValueError, match="optimizer_state"):
        create_8bit_optimizer(_trainer(tmp_path, recipe={"weight": {"format": "nf4"}}))
    plain = Trainer(tiny_bert(), training_args(tmp_path), train_dataset=ToyTask())
    with pytest.raises(ValueError, match="needs a recipe"):
        create_8bit_optimizer(plain)
    with pytest.raises(ValueError, match="already keeps 8-bit state"):
        create_8bit_optimizer(_trainer(tmp_path, optim="adamw_bnb_8bit"))
    with_init = Trainer(model_init=lambda: tiny_bert(), args=training_args(tmp_path), train_dataset=ToyTask())
    with pytest.raises(ValueError, match="model_init"):
        create_8bit_optimizer(with_init, RECIPE)
    unchanged = _trainer(tmp_path, recipe={**RECIPE, "optimizer_state": {"bits": 32}})
    assert type(create_8bit_optimizer(unchanged)) is torch.optim.AdamW
