"""Run QAT and PTQ under a multi-process strategy on CPU; every rank saves what it ends with.

Usage: python _distributed_script.py OUT_DIR STRATEGY. Lightning re-launches this script for rank 1 (strategy
``ddp`` uses the subprocess launcher), so it must be a standalone file, not a pytest test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from _lq_models import TinyMLP, loader, quantizer_state, trainer_kwargs  # noqa: E402

from lightning_quant.callbacks import PostTrainingQuantization, QuantizationAwareTraining  # noqa: E402

# Static activation ranges come from each rank's own shard of the data, so only all-reducing them makes ranks agree.
RECIPE = {
    "weight": {"format": "nf4"},
    "estimator": {"name": "lsq"},
    "activation": {"mode": "static"},
}


class SaveBeforeConversion(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(quantizer_state(pl_module), self.out / f"rank{trainer.global_rank}_qat_quantizers.pt")


def cpu_strategy(name: str) -> Any:
    """``ddp`` as is; ``fsdp`` as a subclass, since Lightning refuses ``FSDPStrategy`` itself with a CPU accelerator."""
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    class CPUFSDPStrategy(FSDPStrategy):
        pass

    return CPUFSDPStrategy()


def main(out: Path, strategy_name: str) -> None:
    strategy = cpu_strategy(strategy_name)
    common = dict(accelerator="cpu", devices=2, strategy=strategy, max_steps=4, use_distributed_sampler=True)
    pl.seed_everything(0)
    model = TinyMLP()
    rank_file = str(out / "rank{}_{}.pt")
    probe = SaveBeforeConversion(out)
    qat = QuantizationAwareTraining(RECIPE, convert_on_fit_end=True, log_every_n_steps=None)
    trainer = pl.Trainer(**trainer_kwargs(out, callbacks=[qat, probe], **common))
    trainer.fit(model, loader(n=64, batch_size=8))
    rank = trainer.global_rank
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, rank_file.format(rank, "qat_converted"))
    kinds = sorted({type(m).__name__ for m in model.modules()})

    pl.seed_everything(1)
    model = TinyMLP()
    ptq = PostTrainingQuantization({"weight": {"format": "int8"}, "activation": {"mode": "static"}}, num_batches=2)

    class Inputs(PostTrainingQuantization):
        def calibration_batches(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            return (x for x, _ in super().calibration_batches(trainer, pl_module))

    ptq = Inputs(ptq.recipe, num_batches=2)
    trainer = pl.Trainer(**trainer_kwargs(out, callbacks=[ptq], **common))
    trainer.fit(model, loader(n=64, batch_size=8, seed=3))
    torch.save(
        {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "report": ptq.report.to_dict() if ptq.report else None,
            "qat_kinds": kinds,
        },
        rank_file.format(rank, "ptq"),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
