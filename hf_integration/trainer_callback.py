"""``QuantizationTrainerCallback``: quantization-aware training inside an unchanged ``transformers.Trainer``.

transformers refuses to train bitsandbytes-quantized models (``is_qat_trainable`` is False for bnb), and
other QAT tools subclass the ``Trainer``. This one is a plain ``TrainerCallback``: it swaps the model's
linear layers for :class:`~lightning_quant.modules.FakeQuantLinear` in ``on_init_end`` (the model exists,
the optimizer does not, so learned LSQ scales are trained like any weight), drives the recipe's schedule
from ``state.global_step``, and can convert to real bitsandbytes layers when training ends.

References: transformers ``trainer.py`` (hook order, ``_load_callback_state``) and ``trainer_callback.py``
(``ExportableState``); the Lightning callbacks of this project share the schedule semantics.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from typing_extensions import override

from lightning_quant.api import convert, fake_quant_layers, prepare, set_fake_quant, set_observers
from lightning_quant.config import QuantRecipe
from lightning_quant.modules import FakeQuantLinear
from lightning_quant.report import QuantReport

if TYPE_CHECKING:
    from transformers import Trainer

__all__ = ["QuantizationTrainerCallback"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _calling_trainer(callback: TrainerCallback) -> Trainer | None:
    """The ``Trainer`` whose hook is running ``callback`` right now, found on the call stack.

    A ``TrainerCallback`` receives no reference to its Trainer, yet ``Trainer.log`` is the one path that
    reaches ``state.log_history`` and every ``report_to`` integration. The hooks are called from Trainer
    methods, so the caller's ``self`` is the Trainer; it must hold this very callback.
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            handler = getattr(candidate, "callback_handler", None)
            if isinstance(candidate, Trainer) and handler is not None and callback in handler.callbacks:
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


class QuantizationTrainerCallback(TrainerCallback, ExportableState):
    """Quantization-aware training for ``transformers.Trainer`` (and ``Seq2SeqTrainer``, other subclasses).

    Add it to an unchanged Trainer. ``on_init_end`` prepares the model in place (before the optimizer is
    built, so LSQ scale multipliers are trained); each step applies the recipe's ``schedule`` as the
    Lightning ``QuantizationAwareTraining`` callback does: the optimizer step that follows ``global_step``
    completed ones fake-quantizes from ``fake_quant_start_step`` on, and observers record until
    ``observer_freeze_step`` (override :meth:`fake_quant_active` / :meth:`observers_active` to change it);
    statistics
    go through ``Trainer.log`` (so ``log_history`` and every ``report_to`` integration receive them);
    ``convert_on_train_end=True`` swaps in real bitsandbytes layers at the end.

    Resuming (``trainer.train(resume_from_checkpoint=...)``) continues exactly: the quantizer parameters
    and observer ranges are in the model's state dict, which the Trainer checkpoints and reloads; the
    schedule is a function of ``state.global_step``. The callback's own state (its arguments and phase)
    is saved in ``trainer_state.json`` as an ``ExportableState`` and restored by transformers when
    ``args.restore_callback_states_from_checkpoint`` is true (transformers then builds a new instance from
    the checkpoint's arguments, so the checkpoint's recipe wins over the one passed now).

    Under ``torch.distributed`` (``torchrun``, DDP), activation observers are all-reduced after each step
    while they update, so every rank holds the same ranges; weights and LSQ scales are parameters that
    DDP keeps identical.

    Args:
        recipe: a :class:`~lightning_quant.config.QuantRecipe`, a dict or a YAML path.
        convert_on_train_end: replace the fake-quant layers by bitsandbytes ``Linear4bit`` /
            ``Linear8bitLt`` when training ends (then export with :func:`hf_integration.save_quantized`).
        log_every_n_steps: log quantization statistics every this many optimizer steps; None logs them
            whenever the Trainer logs (``args.logging_steps``), 0 never.

    Raises:
        RecipeError: an invalid recipe.
        ValueError: a negative ``log_every_n_steps``; at ``train()``, an optimizer built before the
            model was prepared that misses its trainable quantizer parameters (LSQ scales), or DDP with
            ``ddp_find_unused_parameters=False`` while LSQ scales wait for ``fake_quant_start_step``.

    Example:
        >>> from transformers import Trainer, TrainingArguments  # doctest: +SKIP
        >>> callback = QuantizationTrainerCallback("recipes/bert_nf4_qat.yaml", convert_on_train_end=True)
        >>> trainer = Trainer(model, TrainingArguments("out"), train_dataset=ds, callbacks=[callback])
        >>> trainer.train()
        >>> save_quantized(trainer.model, "exports/bert-nf4", tokenizer=tokenizer, recipe=callback.recipe)
    """

    def __init__(
        self,
        recipe: QuantRecipe | dict[str, Any] | str | Path,
        convert_on_train_end: bool = False,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.recipe = QuantRecipe.coerce(recipe)
        if log_every_n_steps is not None and log_every_n_steps < 0:
            raise ValueError(f"`log_every_n_steps` must be >= 0 or None; got {log_every_n_steps!r}")
        self.convert_on_train_end = convert_on_train_end
        self.log_every_n_steps = log_every_n_steps
        #: What ``prepare`` (and ``convert``, when it ran) did, per layer.
        self.report: QuantReport | None = None
        # The phase applied last; restored from checkpoints as `ExportableState` attributes.
        self.fake_quant_enabled: bool | None = None
        self.observers_enabled: bool | None = None
        self._trainer_ref: weakref.ref[Trainer] | None = None

    # ---- ExportableState -------------------------------------------------------------------------
    @override
    def state(self) -> dict[str, Any]:
        """JSON-able arguments and phase, written to ``trainer_state.json`` with every checkpoint."""
        return {
            "args": {
                "recipe": self.recipe.to_dict(),
                "convert_on_train_end": self.convert_on_train_end,
                "log_every_n_steps": self.log_every_n_steps,
            },
            "attributes": {
                "fake_quant_enabled": self.fake_quant_enabled,
                "observers_enabled": self.observers_enabled,
            },
        }

    # ---- when to act (override for another schedule) ---------------------------------------------
    def fake_quant_active(self, step: int) -> bool:
        """Whether fake quantization is on for the optimizer step that follows ``step`` completed steps."""
        return self.recipe.schedule.fake_quant_active(step)

    def observers_active(self, step: int) -> bool:
        """Whether activation observers update during the optimizer step that follows ``step`` completed steps."""
        return self.recipe.schedule.observers_active(step)

    # ---- hooks -------------------------------------------------------------------------------------
    @override
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Prepare the model in place, before the Trainer builds its optimizer."""
        self._bind_trainer()
        model = kwargs.get("model")
        if model is not None:
            self.report = prepare(model, self.recipe)
            self._apply_schedule(model, state.global_step, force=True)

    @override
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Prepare a model the Trainer re-created (``model_init``), check the optimizer, set the phase."""
        self._bind_trainer()
        model = kwargs["model"]
        report = prepare(model, self.recipe)
        if self.report is None or report.count("fake_quant"):
            self.report = report
        self._check_optimizer(model, kwargs.get("optimizer"))
        self._check_ddp(args)
        if self._trainer_ref is None and self.log_every_n_steps != 0:
            warnings.warn(
                "QuantizationTrainerCallback found no Trainer calling it, so it cannot log quantization "
                "statistics; set `log_every_n_steps=0` to silence this",
                UserWarning,
                stacklevel=2,
            )
        self._apply_schedule(model, state.global_step, force=True)

    @override
    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Switch fake quantization / observers as the schedule says for this step."""
        self._apply_schedule(kwargs["model"], state.global_step)

    @override
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Make observer ranges identical on every rank, then log statistics when due."""
        model = kwargs["model"]
        if self.observers_enabled and self.fake_quant_enabled:  # observers only record while fake-quantizing
            _sync_observers(model)
        if self._should_log(state.global_step, control):
            trainer = self._trainer_ref() if self._trainer_ref is not None else None
            if trainer is not None:
                # Trainer.log clears `should_log`; keep it so the Trainer still logs its loss this step.
                should_log = control.should_log
                trainer.log(self.statistics(model, kwargs.get("optimizer")))
                control.should_log = trainer.control.should_log = should_log

    @override
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Convert to bitsandbytes layers when asked to."""
        model = kwargs["model"]
        if not self.convert_on_train_end or not fake_quant_layers(model):
            return
        _sync_observers(model)
        converted = convert(model)
        self.report = converted if self.report is None else self.report.merge(converted, stage="convert")

    # ---- what and when to log ------------------------------------------------------------------
    def _should_log(self, step: int, control: TrainerControl) -> bool:
        if self.log_every_n_steps is None:
            return control.should_log  # set by DefaultFlowCallback, which runs before user callbacks
        return self.log_every_n_steps > 0 and step % self.log_every_n_steps == 0

    def statistics(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Scalar quantization statistics, as logged (keys start with ``quant/``).

        ``fake_quant`` / ``observers`` (1 or 0: the phase of the step just taken), the weight SQNR in dB
        of the stored (quantized) weights against the trained ones (mean and min over layers), the LSQ
        scale multipliers (mean, min), and, given the optimizer, its state bytes (total, in 8-bit tensors).
        """
        layers = [layer for _, layer in fake_quant_layers(model)]
        stats: dict[str, float] = {
            "quant/fake_quant": float(bool(self.fake_quant_enabled)),
            "quant/observers": float(bool(self.observers_enabled)),
        }
        if layers:
            sqnr = [_weight_sqnr_db(layer) for layer in layers]
            stats["quant/weight_sqnr_db_mean"] = sum(sqnr) / len(sqnr)
            stats["quant/weight_sqnr_db_min"] = min(sqnr)
        multipliers = [layer.weight_multiplier for layer in layers if layer.weight_multiplier is not None]
        if multipliers:
            flat = torch.cat([m.detach().float().flatten() for m in multipliers])
            stats["quant/scale_multiplier_mean"] = float(flat.mean())
            stats["quant/scale_multiplier_min"] = float(flat.min())
        if optimizer is not None:
            from lightning_quant.optim import optimizer_state_bytes

            counted = optimizer_state_bytes(getattr(optimizer, "optimizer", optimizer))
            stats["quant/optimizer_state_bytes"] = float(counted.total)
            stats["quant/optimizer_state_8bit_bytes"] = float(counted.quantized)
        return stats

    # ---- helpers -------------------------------------------------------------------------------
    def _bind_trainer(self) -> None:
        if self._trainer_ref is None or self._trainer_ref() is None:
            trainer = _calling_trainer(self)
            self._trainer_ref = weakref.ref(trainer) if trainer is not None else None

    def _apply_schedule(self, model: nn.Module, step: int, force: bool = False) -> None:
        fake_quant, observers = self.fake_quant_active(step), self.observers_active(step)
        if force or fake_quant != self.fake_quant_enabled:
            set_fake_quant(model, fake_quant)
        if force or observers != self.observers_enabled:
            set_observers(model, observers)
        self.fake_quant_enabled, self.observers_enabled = fake_quant, observers

    def _check_ddp(self, args: TrainingArguments) -> None:
        if (
            _distributed()
            and self.recipe.estimator.name == "lsq"
            and self.recipe.schedule.fake_quant_start_step > 0
            and args.ddp_find_unused_parameters is False
        ):
            raise ValueError(
                "`schedule.fake_quant_start_step` > 0 with the `lsq` estimator leaves the LSQ multipliers without "
                "gradients before the start, which DDP rejects with `ddp_find_unused_parameters=False`; leave it "
                "unset (transformers then finds unused parameters) or set `schedule.fake_quant_start_step: 0`"
            )

    @staticmethod
    def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is None:
            return
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [
            f"{name}.weight_multiplier"
            for name, layer in fake_quant_layers(model)
            if isinstance(layer.weight_multiplier, nn.Parameter)
            and layer.weight_multiplier.requires_grad
            and id(layer.weight_multiplier) not in trained
        ]
        if missing:
            shown = ", ".join(f"`{name}`" for name in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise ValueError(
                f"the optimizer does not train the learned quantizer scales ({shown}): it was built before "
                "the model was prepared (`optimizers=` or `model_init`). Let the Trainer build it, build it "
                "after `Trainer(...)` (e.g. `create_8bit_optimizer(trainer)`), or call "
                "`lightning_quant.prepare(model, recipe)` first (inside `model_init`)"
            )


def _sync_observers(model: nn.Module) -> None:
    if not _distributed():
        return
    for _, layer in fake_quant_layers(model):
        if layer.input_observer is not None:
            layer.input_observer.sync()


@torch.no_grad()
def _weight_sqnr_db(layer: FakeQuantLinear) -> float:
    weight = layer.weight.detach().float()
    error = (layer.quantized_weight().dequantize().float() - weight).pow(2).sum()
    signal = weight.pow(2).sum()
    if error == 0:
        return math.inf
    return float(10 * torch.log10(signal / error))
