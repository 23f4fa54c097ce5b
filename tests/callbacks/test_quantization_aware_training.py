"""QuantizationAwareTraining: setup order, schedule, logging, conversion, checkpoints, exact resume, fit twice."""

from __future__ import annotations

import csv
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _lq_models import (
    StepRecorder,
    TinyBert,
    TinyMLP,
    loader,
    quantizer_state,
    token_loader,
    trainer_kwargs,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_quant import FakeQuantLinear, RecipeError
from lightning_quant.callbacks import PostTrainingQuantization, QuantizationAwareTraining, QuantizedOptimizerState

HERE = Path(__file__).parent
LSQ_STATIC = {
    "weight": {"format": "nf4"},
    "estimator": {"name": "lsq"},
    "activation": {"mode": "static"},
    "schedule": {"fake_quant_start_step": 2, "observer_freeze_step": 6},
}


def _kinds(model: torch.nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)]


class Probe(Callback):
    """Before every optimizer step: are the LSQ multipliers in the optimizer, do they have gradients?"""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        layers = [m for m in pl_module.modules() if isinstance(m, FakeQuantLinear)]
        self.rows.append(
            {
                "step": trainer.global_step,
                "in_optimizer": all(id(m.weight_multiplier) in in_optimizer for m in layers),
                "grad": [
                    None if m.weight_multiplier.grad is None else float(m.weight_multiplier.grad.abs().sum())
                    for m in layers
                ],
                "fake_quant": [m.fake_quant_enabled for m in layers],
                "observers": [m.observer_enabled for m in layers],
                "ranges": quantizer_state(pl_module),
            }
        )


def test_prepare_in_setup_puts_lsq_multipliers_in_optimizer_and_follows_schedule(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model, probe = TinyMLP(), Probe()
    qat = QuantizationAwareTraining(LSQ_STATIC, log_every_n_steps=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[qat, probe]))
    trainer.fit(model, loader())

    assert _kinds(model) == ["FakeQuantLinear"] * 3 + ["Linear"]  # the classifier head is kept
    assert [r["step"] for r in probe.rows] == list(range(8))
    assert all(r["in_optimizer"] for r in probe.rows)
    for row in probe.rows:
        quantizing = row["step"] >= 2
        assert row["fake_quant"] == [quantizing] * 3
        assert row["observers"] == [row["step"] < 6] * 3
        # Before fake quantization starts the multipliers are not used, so they get no gradient.
        assert all((g is not None and g > 0) if quantizing else g is None for g in row["grad"])
    multipliers = [m.weight_multiplier for m in model.modules() if isinstance(m, FakeQuantLinear)]
    assert all(not torch.equal(m, torch.ones_like(m)) for m in multipliers)  # the optimizer trained them
    # Observer ranges move while observing (steps 2..5) and stay fixed once frozen (step 6 on).
    ranges = {r["step"]: r["ranges"] for r in probe.rows}
    key = "body.2.input_observer.max_val"
    assert ranges[3][key] != ranges[2][key] or ranges[5][key] != ranges[3][key]
    observed = [k for k in ranges[6] if "observer" in k]
    assert all(torch.equal(ranges[7][k], ranges[6][k]) for k in observed)
    assert all(torch.equal(v, quantizer_state(model)[k]) for k, v in ranges[7].items() if "observer" in k)


def test_logs_per_layer_stats_at_interval(tmp_path: Path) -> None:
    qat = QuantizationAwareTraining({"weight": {"format": "int8"}}, log_every_n_steps=3)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=7, callbacks=[qat], logger=logger, log_every_n_steps=1))
    trainer.fit(TinyMLP(), loader())
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").read_text().splitlines()))
    quant_rows = [r for r in rows if r.get("quant/body.0/sqnr_db")]
    assert [int(r["step"]) for r in quant_rows] == [3, 6]
    for layer in ("body.0", "body.2", "body.4"):
        for stat in ("sqnr_db", "scale", "clip_fraction"):
            values = [float(r[f"quant/{layer}/{stat}"]) for r in quant_rows]
            assert all(v == v for v in values)  # present and not NaN
        assert all(float(r[f"quant/{layer}/sqnr_db"]) > 30 for r in quant_rows)  # int8 row-wise: ~40 dB
    assert not any(k.startswith("quant/classifier") for k in rows[0])


class CaptureFakeQuant(Callback):
    """Evaluates the fake-quant model on the test batches just before conversion (``on_fit_end``)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches
        self.logits: torch.Tensor | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.eval()
        with torch.no_grad():
            self.logits = torch.cat([pl_module(b["input_ids"], b["attention_mask"]) for b in self.batches])
        pl_module.train()


def test_bert_fit_convert_test_accuracy_matches_fake_quant(tmp_path: Path) -> None:
    """Issue point 1: tiny BERT, QAT nf4, convert at fit end, test: bnb layers, same predictions, same accuracy."""
    pl.seed_everything(0)
    model = TinyBert()
    signature = inspect.signature(model.forward)
    test_batches = list(token_loader(n=32, seed=5))
    capture = CaptureFakeQuant(test_batches)
    qat = QuantizationAwareTraining({"weight": {"format": "nf4", "double_quant": True}}, convert_on_fit_end=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[qat, capture]))
    trainer.fit(model, token_loader())

    kinds = _kinds(model)
    assert kinds.count("Linear4bit") == 13 and "FakeQuantLinear" not in kinds  # 2 x (4 attention + 2 MLP) + pooler
    assert type(model.bert.classifier) is torch.nn.Linear
    assert inspect.signature(model.forward) == signature and type(model).forward is TinyBert.forward
    assert qat.report is not None and qat.report.count("converted") == 13

    results = trainer.test(model, token_loader(n=32, seed=5), verbose=False)
    converted = torch.cat(model.test_predictions)
    assert capture.logits is not None
    assert torch.equal(converted, capture.logits)  # nf4: bit-identical logits
    labels = torch.cat([b["labels"] for b in test_batches])
    fake_quant_accuracy = float((capture.logits.argmax(1) == labels).float().mean())
    assert results[0]["test_acc"] == pytest.approx(fake_quant_accuracy, abs=0)


_RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {here!r})
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from _lq_models import KillAtEpoch, StepRecorder, TinyMLP, loader, trainer_kwargs
    from lightning_quant.callbacks import QuantizationAwareTraining

    class Dump(StepRecorder):
        def on_train_epoch_end(self, trainer, pl_module):
            open({losses!r}, "w").write(json.dumps(self.losses))

    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(
        dirpath={ckpt_dir!r}, filename="e{{epoch}}", save_top_k=-1, auto_insert_metric_name=False
    )
    qat = QuantizationAwareTraining({recipe!r}, log_every_n_steps=None)
    callbacks = [qat, Dump(), checkpoint, KillAtEpoch(1)]
    trainer = pl.Trainer(**trainer_kwargs({root!r}, max_epochs=2, callbacks=callbacks, enable_checkpointing=True))
    trainer.fit(TinyMLP(), loader())
    """
)


def test_exact_resume_after_killed_process(tmp_path: Path) -> None:
    """Issue point 2: 8 steps in one go == 4 steps, process killed, resume from the checkpoint, 4 more steps."""
    pl.seed_everything(0)
    model, recorder = TinyMLP(), StepRecorder()
    qat = QuantizationAwareTraining(LSQ_STATIC, log_every_n_steps=None)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", max_epochs=2, callbacks=[qat, recorder])).fit(model, loader())

    ckpt_dir, losses_file = tmp_path / "ckpt", tmp_path / "losses.json"
    script = _RESUME_SCRIPT.format(
        here=str(HERE), losses=str(losses_file), ckpt_dir=str(ckpt_dir), recipe=LSQ_STATIC, root=str(tmp_path / "b")
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-3000:]  # killed by os._exit at the start of epoch 1
    ckpt = ckpt_dir / "e0.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    qat_state = saved["callbacks"][qat.state_key]
    assert json.loads(json.dumps(qat_state)) == qat_state and qat_state["step"] == 4
    assert saved["global_step"] == 4 and "body.0.input_observer.max_val" in saved["state_dict"]

    pl.seed_everything(123)  # a different initialisation: everything must come from the checkpoint
    resumed, resumed_recorder = TinyMLP(), StepRecorder()
    qat2 = QuantizationAwareTraining(LSQ_STATIC, log_every_n_steps=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "c", max_epochs=2, callbacks=[qat2, resumed_recorder]))
    trainer.fit(resumed, loader(), ckpt_path=ckpt)

    first_part = json.loads(losses_file.read_text())
    assert first_part == recorder.losses[:4]
    assert resumed_recorder.steps == [5, 6, 7, 8]
    assert resumed_recorder.losses == recorder.losses[4:]  # bit-identical logged loss
    reference, result = model.state_dict(), resumed.state_dict()
    assert reference.keys() == result.keys()
    assert all(torch.equal(reference[k], result[k]) for k in reference)
    assert quantizer_state(resumed).keys() == quantizer_state(model).keys() != set()
    assert [m.observer_enabled for m in resumed.modules() if isinstance(m, FakeQuantLinear)] == [False] * 3


def test_fit_twice_with_and_without_conversion(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = TinyMLP()
    qat = QuantizationAwareTraining({"weight": {"format": "nf4"}, "estimator": {"name": "lsq"}}, log_every_n_steps=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[qat]))
    trainer.fit(model, loader())
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit_loop.max_epochs = 2  # the same trainer, fit again
    trainer.fit(model, loader())
    assert trainer.global_step == 8 and _kinds(model) == ["FakeQuantLinear"] * 3 + ["Linear"]
    assert not torch.equal(after_first["body.0.weight_multiplier"], model.body[0].weight_multiplier)

    converting = QuantizationAwareTraining({"weight": {"format": "nf4"}}, convert_on_fit_end=True)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[converting])).fit(model, loader())
    assert _kinds(model) == ["Linear4bit"] * 3 + ["Linear"]
    first = model.body[0].weight.data.clone()
    # A second fit on the converted model trains on from the stored weights and converts again.
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[converting])).fit(model, loader())
    assert _kinds(model) == ["Linear4bit"] * 3 + ["Linear"]
    assert not torch.equal(first, model.body[0].weight.data)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_test_and_validate_with_ckpt_path_after_conversion(tmp_path: Path, fmt: str) -> None:
    """Issue point 2: after convert_on_fit_end, test(ckpt_path="best"/path) and validate work; converted checkpoints
    reload into bitsandbytes layers in a fresh process-like setting (new model, new trainer)."""
    pl.seed_everything(0)
    recipe = {"weight": {"format": fmt}}
    model = TinyMLP()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    qat = QuantizationAwareTraining(recipe, convert_on_fit_end=True, log_every_n_steps=None)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, callbacks=[qat, checkpoint], enable_checkpointing=True)
    )
    trainer.fit(model, loader(), loader(seed=1))
    expected_kind = "Linear4bit" if fmt == "nf4" else "Linear8bitLt"
    assert _kinds(model) == [expected_kind] * 3 + ["Linear"]

    test_data = loader(seed=2)
    best = trainer.test(model, test_data, ckpt_path="best", verbose=False)[0]
    assert _kinds(model) == [expected_kind] * 3 + ["Linear"]
    # The same numbers as converting the best checkpoint by hand.
    from lightning_quant import convert, prepare

    by_hand = TinyMLP()
    prepare(by_hand, recipe)
    by_hand.load_state_dict(torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"])
    convert(by_hand)
    plain = pl.Trainer(**trainer_kwargs(tmp_path)).test(by_hand, test_data, verbose=False)[0]
    assert best == plain
    assert trainer.validate(model, test_data, ckpt_path=checkpoint.best_model_path, verbose=False)[0]["val_loss"] == (
        pytest.approx(best["test_loss"], abs=0)
    )

    trainer.save_checkpoint(tmp_path / "converted.ckpt")
    fresh = TinyMLP()
    again = QuantizationAwareTraining(recipe, convert_on_fit_end=True)
    reloaded = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[again])).test(
        fresh, test_data, ckpt_path=tmp_path / "converted.ckpt", verbose=False
    )[0]
    assert _kinds(fresh) == [expected_kind] * 3 + ["Linear"]
    assert reloaded == best
    x = torch.randn(8, 64)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    # Training cannot resume from a converted checkpoint (its bitsandbytes layers are frozen): a clear error.
    resume = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[QuantizationAwareTraining(recipe)]))
    with pytest.raises(RuntimeError, match="checkpoint of a converted model"):
        resume.fit(TinyMLP(), loader(), ckpt_path=tmp_path / "converted.ckpt")


def test_state_keys_and_json_state_let_callbacks_coexist(tmp_path: Path) -> None:
    """Different arguments, different keys; a QAT + 8-bit optimizer + PTQ run checkpoints all three."""
    a = QuantizationAwareTraining({"weight": {"format": "nf4"}})
    b = QuantizationAwareTraining({"weight": {"format": "int8"}})
    assert a.state_key != b.state_key
    assert a.state_key == QuantizationAwareTraining({"weight": {"format": "nf4"}}).state_key
    assert a.state_key != QuantizationAwareTraining({"weight": {"format": "nf4"}}, convert_on_fit_end=True).state_key

    class Inputs(PostTrainingQuantization):
        def calibration_batches(self, trainer: Any, pl_module: Any) -> Any:
            return (x for x, _ in super().calibration_batches(trainer, pl_module))

    qat = QuantizationAwareTraining({"weight": {"format": "nf4"}, "activation": {"mode": "static"}})
    ptq = Inputs({"weight": {"format": "nf4"}, "activation": {"mode": "static"}}, num_batches=2)
    optim = QuantizedOptimizerState(min_8bit_size=1024)
    callbacks = [qat, optim, ptq]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=callbacks))
    trainer.fit(TinyMLP(), loader())
    trainer.save_checkpoint(tmp_path / "all.ckpt")
    states = torch.load(tmp_path / "all.ckpt", weights_only=False)["callbacks"]
    for callback in callbacks:
        assert json.loads(json.dumps(states[callback.state_key])) == callback.state_dict()
    assert states[ptq.state_key]["quantized_at"] == ["fit_end"]
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit"


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps"):
        QuantizationAwareTraining({"weight": {"format": "nf4"}}, log_every_n_steps=-1)
    with pytest.raises(RecipeError, match="weight.format"):
        QuantizationAwareTraining({"weight": {"format": "nf5"}})


def test_ddp_with_delayed_lsq_start_names_the_fix(tmp_path: Path) -> None:
    recipe = {"weight": {"format": "nf4"}, "estimator": {"name": "lsq"}, "schedule": {"fake_quant_start_step": 5}}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, strategy="ddp", devices=2))
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        QuantizationAwareTraining(recipe).setup(trainer, TinyMLP(), "fit")
