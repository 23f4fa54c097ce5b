r"""
Quantized Optimizer State
^^^^^^^^^^^^^^^^^^^^^^^^^

Swaps the optimizers ``configure_optimizers`` built for their bitsandbytes 8-bit twins, re-points the LR
schedulers, and logs how many bytes the optimizer state takes. A thin adapter over
:func:`lightning_quant.optim.to_8bit_optimizer`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_quant.callbacks._common import log_metrics
from lightning_quant.config import OptimizerStateConfig
from lightning_quant.optim import (
    embedding_parameters,
    optimizer_state_bytes,
    repoint_lr_schedulers,
    to_8bit_optimizer,
)

__all__ = ["QuantizedOptimizerState"]

# bitsandbytes' names for the moment tensors of its optimizers; torch keeps the same moments in float32.
_MOMENT_KEYS = ("state1", "state2")


class QuantizedOptimizerState(Callback):
    r"""Keep optimizer state in bitsandbytes' block-wise 8 bits, for the optimizer your module already builds.

    In ``on_fit_start`` (after ``configure_optimizers``, before a resumed checkpoint's optimizer state is loaded,
    so that state loads into the 8-bit optimizer that saved it) every optimizer in ``trainer.strategy.optimizers``
    becomes its bitsandbytes twin with the same param groups and hyper-parameters: Adam, AdamW, SGD with momentum,
    RMSprop, Adagrad, bitsandbytes' Lion. The LR schedulers in ``trainer.lr_scheduler_configs`` are re-pointed, so
    the LR sequence is unchanged. After the first optimizer step the state size is logged as
    ``optimizer_state/bytes_32bit`` (the float32 moments the original optimizer keeps) and
    ``optimizer_state/bytes`` (what the 8-bit optimizer holds), and kept in :attr:`state_bytes`.

    Embedding weights keep float32 state by default: their rows get rare, large gradients, which 8-bit state
    handles badly (Dettmers et al., 2022). Tensors under ``min_8bit_size`` elements keep float32 state too.

    Args:
        bits: 8; 32 leaves the optimizers alone (so a config can switch it off).
        paged: the paged variant (Adam, AdamW, Lion); plain memory on CPU.
        embeddings: ``"32bit"`` or ``"8bit"`` state for ``nn.Embedding`` / ``nn.EmbeddingBag`` weights.
        min_8bit_size: tensors with fewer elements keep float32 state.

    Raises:
        RecipeError: an invalid argument, naming it.
        ValueError: at ``fit``, an optimizer or option bitsandbytes has no twin for (e.g. ``amsgrad=True``), named.

    Example::

        from lightning_quant.callbacks import QuantizedOptimizerState

        trainer = Trainer(callbacks=[QuantizedOptimizerState()])   # AdamW -> AdamW8bit
        trainer.fit(model)
    """

    def __init__(
        self, bits: int = 8, paged: bool = False, embeddings: str = "32bit", min_8bit_size: int = 4096
    ) -> None:
        self.config = OptimizerStateConfig(bits=bits, paged=paged, embeddings=embeddings, min_8bit_size=min_8bit_size)
        #: Optimizer-state bytes measured after the first step: ``{"bytes_32bit": ..., "bytes": ...}``.
        self.state_bytes: dict[str, int] = {}
        self._measured = False
        self._swapped: list[str] = []

    @property
    @override
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(
            bits=c.bits, paged=c.paged, embeddings=c.embeddings, min_8bit_size=c.min_8bit_size
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swaps the optimizers for their 8-bit twins and re-points the LR schedulers."""
        if self.config.bits == 32:
            return
        strategy = trainer.strategy
        embeddings = embedding_parameters(pl_module)
        old = list(strategy.optimizers)
        new = [
            to_8bit_optimizer(
                optimizer,
                paged=self.config.paged,
                embeddings=self.config.embeddings,
                min_8bit_size=self.config.min_8bit_size,
                embedding_params=embeddings,
            )
            for optimizer in old
        ]
        # The setter also rebuilds the LightningOptimizer wrappers that `pl_module.optimizers()` returns.
        strategy.optimizers = new
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for before, after in zip(old, new):
            repoint_lr_schedulers(schedulers, before, after)
        self._swapped = [f"{type(a).__name__} -> {type(b).__name__}" for a, b in zip(old, new)]
        self._measured = False

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Measures and logs the optimizer-state bytes once, after the first optimizer step."""
        if self._measured or self.config.bits == 32 or trainer.global_step == 0:
            return
        self._measured = True
        names = {p: n for n, p in pl_module.named_parameters()}
        after = [optimizer_state_bytes(o, names) for o in trainer.strategy.optimizers]
        self.state_bytes = {
            "bytes_32bit": sum(_float32_bytes(o) for o in trainer.strategy.optimizers),
            "bytes": sum(s.total for s in after),
            "bytes_quantized": sum(s.quantized for s in after),
        }
        log_metrics(trainer, {f"optimizer_state/{k}": float(v) for k, v in self.state_bytes.items()})

    @override
    def state_dict(self) -> dict[str, Any]:
        """The swaps made and the bytes measured (JSON-able)."""
        return {"swapped": list(self._swapped), "state_bytes": dict(self.state_bytes)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the bytes measured before a resume."""
        self.state_bytes = dict(state_dict["state_bytes"])
        self._measured = bool(self.state_bytes)


def _float32_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the same moments take in float32 (what torch's optimizer keeps), plus the rest as held."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key in _MOMENT_KEYS:
                total += value.numel() * 4
            elif not key.startswith(("absmax", "qmap")):  # 8-bit decoding tables have no float32 counterpart
                total += value.numel() * value.element_size()
    return total
