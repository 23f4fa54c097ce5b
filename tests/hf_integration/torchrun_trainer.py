"""Run by ``test_torchrun.py`` under ``torchrun --nproc_per_node 2``: Trainer + callback on CPU / gloo.

Each rank starts from a different random initialisation and sees different batches; it saves its
final quantizer state (weights, LSQ scales, observer ranges) to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny_trainer import ToyTask, tiny_bert, training_args
from transformers import Trainer

from hf_integration import QuantizationTrainerCallback

RECIPE = {
    "weight": {"format": "nf4"},
    "estimator": {"name": "lsq"},
    "activation": {"mode": "static"},
    "schedule": {"fake_quant_start_step": 1, "observer_freeze_step": 4},
}


def main(out: Path) -> None:
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else -1
    args = training_args(
        out,
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=2,
        ddp_backend="gloo",
        # DDP would otherwise copy rank 0's buffers before each forward and hide unsynchronised observers.
        ddp_broadcast_buffers=False,
    )
    model = tiny_bert(seed=args.process_index)  # DDP must broadcast rank 0's weights
    trainer = Trainer(model, args, train_dataset=ToyTask(), callbacks=[QuantizationTrainerCallback(RECIPE)])
    trainer.train()
    rank = args.process_index
    torch.save(
        {"world_size": args.world_size, "rank": rank, "state": trainer.model.state_dict()},
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
