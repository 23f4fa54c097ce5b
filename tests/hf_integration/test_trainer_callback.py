"""QuantizationTrainerCallback inside an unchanged transformers Trainer: prepare, schedule, logging, resume."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_trainer import ToyTask, losses, tiny_bert, training_args
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerCallback

from hf_integration import QuantizationTrainerCallback
from lightning_quant import FakeQuantLinear, fake_quant_layers

LSQ_STATIC = {
    "weight": {"format": "nf4"},
    "estimator": {"name": "lsq"},
    "activation": {"mode": "static"},
    "schedule": {"fake_quant_start_step": 2, "observer_freeze_step": 6},
}


class Probe(TrainerCallback):
    """Records what the model looks like at each step, and what reaches `on_log` (like a report_to logger)."""

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.logits_before_convert: torch.Tensor | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        self.logged.append(dict(logs or {}))

    def on_train_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        model.eval()
        with torch.no_grad():
            self.logits_before_convert = model(input_ids=ToyTask(4, seed=9).input_ids).logits


class PhaseProbe(TrainerCallback):
    """Records, after our callback has acted, whether the layers fake-quantize and observe at each step."""

    def __init__(self) -> None:
        self.phases: list[tuple[int, bool, bool]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        layer = fake_quant_layers(model)[0][1]
        self.phases.append((state.global_step, layer.fake_quant_enabled, layer.observer_enabled))


class Crash(Exception):
    pass


class CrashAfterCheckpoint(TrainerCallback):
    """Interrupts training right after the checkpoint at `step` is on disk, as a killed job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            raise Crash


def test_schedule_semantics() -> None:
    callback = QuantizationTrainerCallback({"schedule": {"fake_quant_start_step": 2, "observer_freeze_step": 3}})
    phases = [(callback.fake_quant_active(s), callback.observers_active(s)) for s in range(4)]
    assert phases == [(False, True), (False, True), (True, True), (True, False)]
    always = QuantizationTrainerCallback({"weight": {"format": "nf4"}})
    assert always.fake_quant_active(0) and always.observers_active(10**6)


def test_prepares_before_the_optimizer_and_trains_lsq_scales(tmp_path) -> None:
    model = tiny_bert()
    callback = QuantizationTrainerCallback(LSQ_STATIC)
    trainer = Trainer(model, training_args(tmp_path, max_steps=4), train_dataset=ToyTask(), callbacks=[callback])
    # on_init_end ran: layers swapped, optimizer not built yet.
    assert trainer.optimizer is None
    layers = fake_quant_layers(model)
    assert len(layers) == 13 and callback.report is not None and callback.report.count("fake_quant") == 13
    assert callback.report.layer("classifier").action == "kept"
    before = {name: layer.weight_multiplier.detach().clone() for name, layer in layers}
    trainer.train()
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(layer.weight_multiplier) in trained for _, layer in layers)
    assert any(not torch.equal(before[name], layer.weight_multiplier) for name, layer in layers)


def test_schedule_and_logging_through_trainer_log(tmp_path) -> None:
    probe, phases = Probe(), PhaseProbe()  # `probe` before ours in the list, as report_to integrations are
    callback = QuantizationTrainerCallback(LSQ_STATIC)
    args = training_args(tmp_path, max_steps=8, logging_steps=2)
    trainer = Trainer(tiny_bert(), args, train_dataset=ToyTask(), callbacks=[probe, callback, phases])
    trainer.train()
    assert phases.phases == [(s, s >= 2, s < 6) for s in range(8)]
    stats = [entry for entry in trainer.state.log_history if "quant/fake_quant" in entry]
    assert [entry["step"] for entry in stats] == [2, 4, 6, 8]
    # Logged after step g: the phase step g - 1 trained with.
    assert [entry["quant/fake_quant"] for entry in stats] == [0.0, 1.0, 1.0, 1.0]
    assert [entry["quant/observers"] for entry in stats] == [1.0, 1.0, 1.0, 0.0]
    assert all(entry["quant/weight_sqnr_db_min"] > 10 for entry in stats)
    assert all("quant/scale_multiplier_mean" in e and e["quant/optimizer_state_bytes"] > 0 for e in stats)
    assert sum("quant/fake_quant" in logs for logs in probe.logged) == 4  # loggers see them too
    assert sorted(losses(trainer)) == [2, 4, 6, 8]  # the Trainer's own loss logging is unaffected


def test_seq2seq_trainer_and_convert_on_train_end(tmp_path) -> None:
    probe = Probe()
    callback = QuantizationTrainerCallback({"weight": {"format": "nf4"}}, convert_on_train_end=True)
    args = Seq2SeqTrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True
    )
    model = tiny_bert()
    trainer = Seq2SeqTrainer(model, args, train_dataset=ToyTask(), callbacks=[probe, callback])
    trainer.train()
    assert not fake_quant_layers(model)
    assert type(model.bert.encoder.layer[0].intermediate.dense).__name__ == "Linear4bit"
    assert type(model.classifier) is torch.nn.Linear
    assert callback.report is not None and callback.report.count("converted") == 13
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ToyTask(4, seed=9).input_ids).logits
    assert torch.equal(after, probe.logits_before_convert)  # what training measured is what ships


def test_optimizer_built_before_prepare_is_rejected(tmp_path) -> None:
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = Trainer(
        model,
        training_args(tmp_path),
        train_dataset=ToyTask(),
        callbacks=[QuantizationTrainerCallback(LSQ_STATIC)],
        optimizers=(optimizer, None),
    )
    with pytest.raises(ValueError, match=r"weight_multiplier.*before the model was prepared"):
        trainer.train()


def test_model_init_model_is_prepared_at_train_begin(tmp_path) -> None:
    trainer = Trainer(
        model_init=lambda: tiny_bert(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=ToyTask(),
        callbacks=[QuantizationTrainerCallback({"weight": {"format": "int8"}})],
    )
    trainer.train()
    assert len(fake_quant_layers(trainer.model)) == 13


def test_rejects_negative_log_interval() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps"):
        QuantizationTrainerCallback({"weight": {"format": "nf4"}}, log_every_n_steps=-1)


def _run(output_dir, *, resume: str | None = None, restore: bool = False, crash_at: int | None = None) -> Trainer:
    args = training_args(
        output_dir, max_steps=8, save_strategy="steps", save_steps=4, restore_callback_states_from_checkpoint=restore
    )
    callbacks: list[TrainerCallback] = [QuantizationTrainerCallback(LSQ_STATIC)]
    if crash_at is not None:
        callbacks.append(CrashAfterCheckpoint(crash_at))
    # A different initialisation: everything must come from the checkpoint.
    trainer = Trainer(tiny_bert(seed=1 if resume else 0), args, train_dataset=ToyTask(), callbacks=callbacks)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Crash:
        assert crash_at is not None and trainer.state.global_step == crash_at
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Trainer:
    return _run(tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize("restore_callback_states", [False, True], ids=["from-global-step", "exportable-state"])
def test_resume_continues_exactly(tmp_path, uninterrupted: Trainer, restore_callback_states: bool) -> None:
    _run(tmp_path, crash_at=4)
    resumed = _run(tmp_path, resume=str(tmp_path / "checkpoint-4"), restore=restore_callback_states)

    expected, got = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    assert any(k.endswith("weight_multiplier") for k in got) and any("input_observer" in k for k in got)
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert different == []
    assert {s: v for s, v in losses(resumed).items() if s > 4} == {
        s: v for s, v in losses(uninterrupted).items() if s > 4
    }
    stats = [{k: v for k, v in e.items() if k.startswith("quant/")} for e in resumed.state.log_history]
    expected_stats = [{k: v for k, v in e.items() if k.startswith("quant/")} for e in uninterrupted.state.log_history]
    assert [s for s in stats if s][-4:] == [s for s in expected_stats if s][-4:]

    callback = next(c for c in resumed.callback_handler.callbacks if isinstance(c, QuantizationTrainerCallback))
    assert (callback.fake_quant_enabled, callback.observers_enabled) == (True, False)
    assert all(isinstance(layer, FakeQuantLinear) for _, layer in fake_quant_layers(resumed.model))
