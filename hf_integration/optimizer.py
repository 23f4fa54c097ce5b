"""8-bit optimizer state for ``transformers.Trainer``, from a recipe's ``optimizer_state:`` section.

The Trainer builds its optimizer lazily inside ``train()``. :func:`create_8bit_optimizer` asks the Trainer
to build that very optimizer now (``Trainer.create_optimizer``: the same class from ``args.optim``, the same
hyper-parameters and the same weight-decay / no-weight-decay param groups, including a subclass's
overrides), then swaps it for its bitsandbytes 8-bit twin (:func:`lightning_quant.optim.to_8bit_optimizer`).
The LR scheduler is left to the Trainer, which builds it on the optimizer it holds, from ``args``, exactly
as it would have. Checkpoints hold the 8-bit state, and ``resume_from_checkpoint`` loads it back.

References: transformers ``Trainer.create_optimizer`` / ``create_scheduler`` (``trainer.py``), and its own
``adamw_bnb_8bit`` path, which also keeps ``nn.Embedding`` state in 32 bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_quant.config import QuantRecipe

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import Trainer

__all__ = ["create_8bit_optimizer"]


def _recipe_of(trainer: Trainer) -> QuantRecipe | None:
    from hf_integration.trainer_callback import QuantizationTrainerCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, QuantizationTrainerCallback):
            return callback.recipe
    return None


def create_8bit_optimizer(
    trainer: Trainer, recipe: QuantRecipe | dict[str, Any] | str | Path | None = None
) -> torch.optim.Optimizer:
    """Give ``trainer`` the bitsandbytes 8-bit twin of the optimizer it would have built, in place.

    Call it after ``Trainer(...)`` (so the :class:`QuantizationTrainerCallback` has prepared the model and
    its LSQ scales are trained too) and before ``trainer.train()``. It sets ``trainer.optimizer`` and
    returns it; the Trainer then builds its LR scheduler on it from ``args`` as usual. An optimizer you
    passed with ``optimizers=(optimizer, scheduler)`` is converted instead, and your scheduler re-pointed.

    Settings come from ``recipe.optimizer_state`` (``bits``, ``paged``, ``embeddings``, ``min_8bit_size``):
    tensors with at least ``min_8bit_size`` elements keep block-wise 8-bit state; embeddings keep 32-bit
    state unless ``embeddings: 8bit``; ``bits: 32`` leaves the optimizer as the Trainer builds it.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass) that has not started training.
        recipe: the recipe whose ``optimizer_state:`` section applies; default: the recipe of the
            trainer's :class:`QuantizationTrainerCallback`.

    Returns:
        The optimizer the Trainer will use (also in ``trainer.optimizer``).

    Raises:
        ValueError: no recipe, a recipe without ``optimizer_state:``, a Trainer whose ``train()`` would
            discard or replace the optimizer (``model_init``, DeepSpeed, FSDP), an ``args.optim`` that is
            already an 8-bit optimizer, or an optimizer bitsandbytes has no 8-bit twin for.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds,  # doctest: +SKIP
        ...                   callbacks=[QuantizationTrainerCallback({"weight": {"format": "nf4"},
        ...                                                       "optimizer_state": {"bits": 8}})])
        >>> optimizer = create_8bit_optimizer(trainer)
        >>> trainer.train()
    """
    from lightning_quant.optim import embedding_parameters, repoint_lr_schedulers, to_8bit_optimizer

    resolved = QuantRecipe.coerce(recipe) if recipe is not None else _recipe_of(trainer)
    if resolved is None:
        raise ValueError(
            "create_8bit_optimizer() needs a recipe: pass `recipe=` or add a QuantizationTrainerCallback to the Trainer"
        )
    settings = resolved.optimizer_state
    if settings is None:
        raise ValueError(
            "the recipe has no `optimizer_state` section; add `optimizer_state: {bits: 8}` to quantize the "
            "optimizer state"
        )
    if trainer.model_init is not None:
        raise ValueError(
            "create_8bit_optimizer() cannot be used with `model_init`: `train()` re-creates the model and "
            "drops the optimizer; pass `model=` to the Trainer instead"
        )
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ValueError(
            "create_8bit_optimizer() does not support DeepSpeed or FSDP, which build or shard the optimizer "
            "themselves; use `args.optim='adamw_bnb_8bit'` there"
        )
    already = (
        f"`args.optim` {str(trainer.args.optim)!r} already keeps 8-bit state; either drop create_8bit_optimizer() "
        "or set `optim='adamw_torch'` and let the recipe's `optimizer_state` decide"
    )
    # Checked before building: transformers registers its embedding overrides process-wide when it does.
    if settings.bits == 8 and trainer.optimizer is None and "8bit" in str(trainer.args.optim):
        raise ValueError(already)
    old_scheduler = trainer.lr_scheduler
    base = trainer.optimizer if trainer.optimizer is not None else trainer.create_optimizer()
    if settings.bits == 32:
        return base
    if getattr(getattr(base, "args", None), "optim_bits", 32) == 8:
        raise ValueError(already)
    optimizer = to_8bit_optimizer(
        base,
        paged=settings.paged,
        embeddings=settings.embeddings,
        min_8bit_size=settings.min_8bit_size,
        embedding_params=embedding_parameters(trainer.model),
    )
    if old_scheduler is not None:
        repoint_lr_schedulers([old_scheduler], base, optimizer)
    trainer.optimizer = optimizer
    trainer.callback_handler.optimizer = optimizer
    return optimizer
