"""Hugging Face adapters: a ``Trainer`` callback, 8-bit optimizer state, export that plain transformers loads,
and a hub upload that carries a model card.

Example:
    >>> from hf_integration import QuantizationTrainerCallback, save_quantized, push_to_hub  # doctest: +SKIP
    >>> callback = QuantizationTrainerCallback({"weight": {"format": "nf4"}}, convert_on_train_end=True)
    >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[callback])
    >>> trainer.train()
    >>> save_quantized(trainer.model, "exports/bert-nf4", tokenizer=tokenizer, recipe=callback.recipe)
    >>> push_to_hub("exports/bert-nf4", "me/bert-nf4")
"""

from hf_integration.export import bnb_quantization_config, save_quantized
from hf_integration.hub import HubUploadError, push_to_hub
from hf_integration.model_card import parse_front_matter, render_model_card
from hf_integration.optimizer import create_8bit_optimizer
from hf_integration.trainer_callback import QuantizationTrainerCallback

__all__ = [
    "HubUploadError",
    "QuantizationTrainerCallback",
    "bnb_quantization_config",
    "create_8bit_optimizer",
    "parse_front_matter",
    "push_to_hub",
    "render_model_card",
    "save_quantized",
]
