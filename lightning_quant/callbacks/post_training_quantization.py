r"""
Post-Training Quantization
^^^^^^^^^^^^^^^^^^^^^^^^^^

Calibrates on a dataloader the trainer already knows and converts the model to bitsandbytes layers, at the end of
``fit`` or when ``validate`` / ``test`` / ``predict`` start (after any ``ckpt_path`` has been loaded). A thin
adapter over :func:`lightning_quant.prepare`, :func:`~lightning_quant.calibrate` and
:func:`~lightning_quant.convert`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_quant.api import calibrate, convert, fake_quant_layers, prepare
from lightning_quant.callbacks._common import DATALOADERS, calibration_dataloader, recipe_digest, unprepared_layers
from lightning_quant.callbacks._structure import StructureHook
from lightning_quant.config import QuantRecipe
from lightning_quant.modules import LayerSpec
from lightning_quant.report import QuantReport

__all__ = ["PostTrainingQuantization"]

WHEN = ("fit_end", "validate", "test", "predict")


class PostTrainingQuantization(Callback):
    r"""Calibrate and convert to bitsandbytes layers at the end of ``fit`` or before evaluation.

    The recipe's layers are prepared, ``num_batches`` batches of the ``train`` or ``val`` dataloader run through
    the model's ``forward`` (dict batches as keyword arguments without ``labels``, tuples as positional
    arguments, tensors as the argument; override :meth:`calibration_batches` to map them otherwise), and the model
    is converted. Under DDP each rank calibrates on its own shard and the observers are all-reduced, so every rank
    converts to the same model.

    ``trainer.test(model, ckpt_path=...)`` with ``when="test"`` quantizes the checkpoint's weights: Lightning loads
    them before ``on_test_start``. A model this callback converted stays converted for evaluation: when a later
    ``ckpt_path`` brings back full-precision weights (``ckpt_path="best"``), they are quantized again, and a
    checkpoint of the converted model loads straight into bitsandbytes layers.

    Args:
        recipe: a :class:`~lightning_quant.QuantRecipe`, a dict, or the path of a YAML recipe.
        num_batches: calibration batches (default: the recipe's ``calibration.num_batches``).
        dataloader: ``"train"`` or ``"val"``: which dataloader calibrates.
        when: one or more of ``"fit_end"``, ``"validate"``, ``"test"``, ``"predict"``.

    Raises:
        RecipeError: an invalid recipe.
        ValueError: an unknown ``dataloader`` or ``when``, ``num_batches`` < 1; when quantizing, no dataloader.

    Example::

        from lightning_quant.callbacks import PostTrainingQuantization

        ptq = PostTrainingQuantization({"weight": {"format": "int8"}}, num_batches=8, when="test")
        Trainer(callbacks=[ptq]).test(model, ckpt_path="fp32.ckpt")   # tests the int8 model
    """

    def __init__(
        self,
        recipe: QuantRecipe | dict[str, Any] | str | Path,
        num_batches: int | None = None,
        dataloader: str = "train",
        when: str | Sequence[str] = "fit_end",
    ) -> None:
        moments = (when,) if isinstance(when, str) else tuple(when)
        unknown = [m for m in moments if m not in WHEN]
        if unknown or not moments:
            raise ValueError(f"`when` must be one or more of {', '.join(WHEN)}; got {when!r}")
        if dataloader not in DATALOADERS:
            raise ValueError(f"`dataloader` must be one of {', '.join(DATALOADERS)}; got {dataloader!r}")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"`num_batches` must be >= 1 or None (the recipe's); got {num_batches!r}")
        self.recipe = QuantRecipe.coerce(recipe)
        self.num_batches = num_batches if num_batches is not None else self.recipe.calibration.num_batches
        self.dataloader = dataloader
        self.when = moments
        #: What the last quantization did, per layer.
        self.report: QuantReport | None = None
        self._specs: dict[str, LayerSpec] = {}
        self._hook: RemovableHandle | None = None
        self._quantized_at: list[str] = []
        self._loader: Iterable[Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            recipe=recipe_digest(self.recipe), num_batches=self.num_batches, dataloader=self.dataloader, when=self.when
        )

    def calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Any]:
        """The batches calibration feeds to ``forward``; override to map a dataloader's batches to inputs.

        When re-quantizing after a checkpoint reload and the trainer no longer holds the dataloader
        (``trainer.test(model, test_loader, ckpt_path="best")`` replaces the ones ``fit`` got), the dataloader
        used the first time is used again.
        """
        try:
            self._loader = calibration_dataloader(trainer, pl_module, self.dataloader)
        except ValueError:
            if self._loader is None:
                raise
        return self._loader

    def quantize_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str) -> QuantReport:
        """Prepare, calibrate and convert ``pl_module`` in place."""
        report = prepare(pl_module, self.recipe)
        self._specs.update({name: layer.spec for name, layer in fake_quant_layers(pl_module)})
        batches = self.calibration_batches(trainer, pl_module)
        report = report.merge(calibrate(pl_module, batches, self.num_batches, config=self.recipe.calibration))
        self.report = report.merge(convert(pl_module), stage="quantize")
        self._quantized_at.append(moment)
        return self.report

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Keeps checkpoint loads in step with the layers this callback converted."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = pl_module.register_load_state_dict_pre_hook(StructureHook(self._specs, self.recipe))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Quantizes when ``when`` holds ``"fit_end"``."""
        if "fit_end" in self.when and self._needs_quantization(pl_module):
            self.quantize_model(trainer, pl_module, "fit_end")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Quantizes before a standalone ``validate`` (not validation inside ``fit``)."""
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._on_evaluation(trainer, pl_module, "validate")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Quantizes before ``test``, after any ``ckpt_path`` was loaded."""
        self._on_evaluation(trainer, pl_module, "test")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Quantizes before ``predict``, after any ``ckpt_path`` was loaded."""
        self._on_evaluation(trainer, pl_module, "predict")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Removes the checkpoint-loading hook from the module."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def state_dict(self) -> dict[str, Any]:
        """When this callback quantized (JSON-able)."""
        return {"quantized_at": list(self._quantized_at)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores when this callback quantized."""
        self._quantized_at = list(state_dict["quantized_at"])

    def _needs_quantization(self, pl_module: pl.LightningModule) -> bool:
        return bool(fake_quant_layers(pl_module) or unprepared_layers(pl_module, self.recipe))

    def _on_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str) -> None:
        # Layers this callback converted before, now back in full precision: a checkpoint load brought them back.
        reloaded = any(name in self._specs for name, _ in fake_quant_layers(pl_module))
        if (moment in self.when or reloaded) and self._needs_quantization(pl_module):
            self.quantize_model(trainer, pl_module, moment)
