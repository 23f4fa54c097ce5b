r"""
Quantization-Aware Training
^^^^^^^^^^^^^^^^^^^^^^^^^^^

Trains an unchanged LightningModule with bitsandbytes-exact fake quantization, resumably, and can convert it to
real bitsandbytes layers when ``fit`` ends. A thin adapter over :func:`lightning_quant.prepare`,
:func:`~lightning_quant.set_fake_quant`, :func:`~lightning_quant.set_observers` and :func:`~lightning_quant.convert`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_quant.api import convert, fake_quant_layers, prepare, set_fake_quant, set_observers
from lightning_quant.callbacks._common import (
    distributed,
    layer_stats,
    log_metrics,
    recipe_digest,
    unprepared_layers,
)
from lightning_quant.callbacks._structure import StructureHook, converted_layers, unconvert
from lightning_quant.config import QuantRecipe
from lightning_quant.modules import LayerSpec
from lightning_quant.report import QuantReport

__all__ = ["QuantizationAwareTraining"]


class QuantizationAwareTraining(Callback):
    r"""Quantization-aware training that simulates the bitsandbytes layer the model will ship as.

    In ``setup(stage="fit")`` (after ``configure_model``, before the optimizers exist, so LSQ scale multipliers are
    trained by the optimizer ``configure_optimizers`` builds) the matching ``nn.Linear`` layers become
    :class:`~lightning_quant.FakeQuantLinear`; ``forward`` signatures and the module's own code are untouched.
    The recipe's ``schedule`` is driven by ``trainer.global_step``: fake quantization from step
    ``fake_quant_start_step``, activation observers frozen from ``observer_freeze_step``. Override
    :meth:`fake_quant_active` / :meth:`observers_active` for another schedule.

    Everything needed to resume sits in the checkpoint: LSQ multipliers and observer ranges are module state, the
    schedule position is the global step. ``trainer.fit(model, ckpt_path=...)`` resumes exactly. Under DDP the
    observers are all-reduced after every step in which they update, so every rank holds the same ranges.

    With ``convert_on_fit_end=True`` the model holds real ``Linear4bit`` / ``Linear8bitLt`` layers after ``fit``,
    and later ``validate`` / ``test`` / ``predict`` keep evaluating a converted model: a checkpoint saved before
    the conversion (``ckpt_path="best"``) is loaded into fake-quant layers and converted again. A checkpoint of
    the converted model loads straight into bitsandbytes layers, also into a fresh model in a new process.
    Calling ``fit`` again on a model this callback converted trains on from the stored (dequantized) weights: the
    full-precision weights are not kept after conversion, since keeping them would cost the memory conversion saves.

    Note:
        - Layers must exist when ``setup`` runs: built in ``__init__`` or ``configure_model`` (which this callback
          calls first; Lightning requires it to be idempotent). Layers built in ``LightningModule.setup`` are
          prepared in ``on_fit_start`` unless the recipe adds parameters (LSQ), which would miss the optimizer.
        - torch layers that read a child's ``weight`` instead of calling the child (``nn.MultiheadAttention``'s
          ``out_proj``, ``nn.TransformerEncoderLayer.linear1/2`` in torch's eval fast path) keep those children in
          full precision; the prepare report says so.
        - ``strategy="ddp"`` works on CPU (gloo) and GPU. ``strategy="fsdp"`` is untested: on CPU Lightning
          refuses it ("requires a GPU accelerator") and torch's ``FullyShardedDataParallel`` needs an accelerator.

    Args:
        recipe: a :class:`~lightning_quant.QuantRecipe`, a dict, or the path of a YAML recipe.
        convert_on_fit_end: convert to bitsandbytes layers when ``fit`` ends.
        log_every_n_steps: log per-layer SQNR, scale and clip fraction to the attached loggers every this many
            optimizer steps (``None`` or 0: never).

    Raises:
        RecipeError: an invalid recipe.
        ValueError: a negative ``log_every_n_steps``; at ``setup``, LSQ with a delayed fake-quant start under DDP
            without ``find_unused_parameters`` (the multipliers get no gradient before the start).

    Example::

        from lightning_quant.callbacks import QuantizationAwareTraining

        qat = QuantizationAwareTraining({"weight": {"format": "nf4"}, "schedule": {"fake_quant_start_step": 100}},
                                        convert_on_fit_end=True)
        trainer = Trainer(callbacks=[qat])
        trainer.fit(model)          # model now holds bitsandbytes Linear4bit layers
        trainer.test(model)
    """

    def __init__(
        self,
        recipe: QuantRecipe | dict[str, Any] | str | Path,
        convert_on_fit_end: bool = False,
        log_every_n_steps: int | None = 50,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 0:
            raise ValueError(f"`log_every_n_steps` must be >= 0 or None; got {log_every_n_steps!r}")
        self.recipe = QuantRecipe.coerce(recipe)
        self.convert_on_fit_end = convert_on_fit_end
        self.log_every_n_steps = log_every_n_steps
        #: What the last prepare / convert did, per layer.
        self.report: QuantReport | None = None
        # Specs of every layer this callback prepared; shared with the checkpoint-loading hook.
        self._specs: dict[str, LayerSpec] = {}
        self._hook: RemovableHandle | None = None
        self._step = 0
        self._fake_quant_enabled = False
        self._observers_enabled = True
        self._last_logged_step = -1
        self._converted = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(recipe=recipe_digest(self.recipe), convert_on_fit_end=self.convert_on_fit_end)

    # ---- when to act (override for another schedule) ---------------------------------------------------------
    def fake_quant_active(self, step: int) -> bool:
        """Whether fake quantization is on for the optimizer step that follows ``step`` completed steps."""
        return self.recipe.schedule.fake_quant_active(step)

    def observers_active(self, step: int) -> bool:
        """Whether activation observers update during the optimizer step that follows ``step`` completed steps."""
        return self.recipe.schedule.observers_active(step)

    # ---- hooks -----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Prepares the model (before the optimizers exist) and keeps checkpoint loads in step with it."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = pl_module.register_load_state_dict_pre_hook(StructureHook(self._specs, self.recipe))
        if stage == TrainerFn.FITTING:
            self._check_strategy(trainer)
            if is_overridden("configure_model", pl_module):
                # Lightning calls it after this hook; it must be idempotent, so calling it first is safe.
                pl_module.configure_model()
            if unconvert(pl_module, self._specs):
                self._converted = False
        if not converted_layers(pl_module, self._specs):
            self._prepare(pl_module)
        if stage != TrainerFn.FITTING:
            # Evaluation measures what ships: quantized, observers frozen.
            set_fake_quant(pl_module, True)
            set_observers(pl_module, False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prepares layers the module built in its own ``setup`` and applies the schedule for sanity checking."""
        if converted_layers(pl_module, self._specs):
            raise RuntimeError(
                "`fit` resumed from a checkpoint of a converted model, whose bitsandbytes layers cannot train; "
                "resume from a checkpoint saved before conversion (e.g. `ckpt_path='last'` of the QAT run)"
            )
        late = unprepared_layers(pl_module, self.recipe)
        if late:
            if self.recipe.estimator.name == "lsq":
                raise RuntimeError(
                    f"layers {late} were built in `LightningModule.setup`, after this callback prepared the model, "
                    "and LSQ multipliers added now would miss the optimizer; build them in `__init__` or "
                    "`configure_model`"
                )
            self._prepare(pl_module)
        # A resumed run restores the global step only after this hook; the callback state already holds it.
        self._apply_schedule(pl_module, self._step if trainer.ckpt_path else trainer.global_step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Switches fake quantization and observers as the schedule says for this step."""
        self._apply_schedule(pl_module, trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Synchronises observers across ranks and logs per-layer statistics at the configured interval."""
        if self._observers_enabled and self._fake_quant_enabled:
            self._sync_observers(pl_module)
        step = self._step = trainer.global_step
        due = bool(self.log_every_n_steps) and step % self.log_every_n_steps == 0  # type: ignore[operator]
        # Loggers write on rank zero only, so the other ranks skip computing the statistics.
        if due and step > self._last_logged_step and trainer.is_global_zero:
            self._last_logged_step = step
            metrics = {
                f"quant/{name}/{key}": value
                for name, layer in fake_quant_layers(pl_module)
                for key, value in layer_stats(layer).items()
            }
            log_metrics(trainer, metrics)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Converts to bitsandbytes layers when asked to."""
        if self.convert_on_fit_end:
            self._convert(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Converts again before a standalone ``validate`` if a checkpoint load undid the conversion."""
        self._convert_for_evaluation(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Converts again before ``test`` if a checkpoint load (``ckpt_path="best"``) undid the conversion."""
        self._convert_for_evaluation(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Converts again before ``predict`` if a checkpoint load undid the conversion."""
        self._convert_for_evaluation(trainer, pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Makes sure the saved observer ranges are the ranks' common ones."""
        if self._observers_enabled and self._fake_quant_enabled and trainer.state.fn == TrainerFn.FITTING:
            self._sync_observers(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Removes the checkpoint-loading hook from the module."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def state_dict(self) -> dict[str, Any]:
        """Schedule position and switches (the quantizer tensors themselves are module state)."""
        return {
            "step": self._step,
            "fake_quant_enabled": self._fake_quant_enabled,
            "observers_enabled": self._observers_enabled,
            "last_logged_step": self._last_logged_step,
            "converted": self._converted,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the schedule position; the switches are re-applied from it.

        ``converted`` describes the checkpointed model and is not restored: whether to convert again for
        evaluation follows what this callback did in this process.
        """
        self._step = state_dict["step"]
        self._fake_quant_enabled = state_dict["fake_quant_enabled"]
        self._observers_enabled = state_dict["observers_enabled"]
        self._last_logged_step = state_dict["last_logged_step"]

    # ---- internals -------------------------------------------------------------------------------------------
    def _prepare(self, pl_module: pl.LightningModule) -> None:
        self.report = prepare(pl_module, self.recipe)
        self._specs.update({name: layer.spec for name, layer in fake_quant_layers(pl_module)})

    def _apply_schedule(self, pl_module: pl.LightningModule, step: int) -> None:
        fake_quant, observers = self.fake_quant_active(step), self.observers_active(step)
        if self._observers_enabled and not observers and self._fake_quant_enabled:
            self._sync_observers(pl_module)  # freeze on the common range
        set_fake_quant(pl_module, fake_quant)
        set_observers(pl_module, observers)
        self._step, self._fake_quant_enabled, self._observers_enabled = step, fake_quant, observers

    def _sync_observers(self, pl_module: pl.LightningModule) -> None:
        if not distributed():
            return
        for _, layer in fake_quant_layers(pl_module):
            if layer.input_observer is not None:
                layer.input_observer.sync()

    def _convert(self, pl_module: pl.LightningModule) -> None:
        if fake_quant_layers(pl_module):
            self.report = convert(pl_module)
            self._converted = True

    def _convert_for_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Only a model this callback already converted: converting before `fit` would lose the float weights.
        if self._converted and trainer.state.fn != TrainerFn.FITTING:
            self._convert(pl_module)

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if (
            isinstance(strategy, DDPStrategy)
            and self.recipe.estimator.name == "lsq"
            and self.recipe.schedule.fake_quant_start_step > 0
            and not strategy._ddp_kwargs.get("find_unused_parameters", False)
        ):
            raise ValueError(
                "`schedule.fake_quant_start_step` > 0 with the `lsq` estimator leaves the LSQ multipliers without "
                "gradients before the start, which DDP rejects; use `strategy='ddp_find_unused_parameters_true'` "
                "or set `schedule.fake_quant_start_step: 0`"
            )
        if "FSDP" in type(strategy).__name__:
            rank_zero_warn(
                "QuantizationAwareTraining has not been tested under FSDP (it needs a GPU); check the converted "
                "model against the fake-quant one before relying on it"
            )
