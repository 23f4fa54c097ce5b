"""Lightning callbacks: thin adapters that translate Trainer hooks into lightning-quant's verbs.

Importing this package imports Lightning; ``import lightning_quant`` alone does not.

Example::

    from lightning_quant.callbacks import QuantizationAwareTraining, QuantizedOptimizerState

    trainer = Trainer(callbacks=[QuantizationAwareTraining("recipe.yaml", convert_on_fit_end=True),
                                 QuantizedOptimizerState()])
"""

from lightning_quant.callbacks.post_training_quantization import PostTrainingQuantization
from lightning_quant.callbacks.quantization_aware_training import QuantizationAwareTraining
from lightning_quant.callbacks.quantized_optimizer_state import QuantizedOptimizerState

__all__ = ["PostTrainingQuantization", "QuantizationAwareTraining", "QuantizedOptimizerState"]
