"""Pieces both training backends share: the loss, parameter groups, schedule, stage measurements."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lightning_quant.runner.spec import DistillSpec, TrainSpec

__all__ = [
    "TrainOutcome",
    "distillation_loss",
    "parameter_groups",
    "linear_warmup_decay",
    "total_steps",
    "PeakMemory",
]


@dataclass
class TrainOutcome:
    """What a training stage measured."""

    seconds: float = 0.0
    steps: int = 0
    peak_rss_bytes: int = 0
    rss_growth_bytes: int = 0
    optimizer_state_bytes: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else float("nan")


def distillation_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, distill: DistillSpec
) -> torch.Tensor:
    """Cross-entropy, blended with the KL to the teacher's softened distribution (Hinton et al. 2015)."""
    loss = F.cross_entropy(logits, labels)
    if teacher_logits is None or distill.weight == 0:
        return loss
    t = distill.temperature
    student = F.log_softmax(logits / t, dim=-1)
    teacher = F.log_softmax(teacher_logits / t, dim=-1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    # T^2 keeps the soft-target gradients on the same scale as the hard ones.
    return (1 - distill.weight) * loss + distill.weight * (t * t) * kl


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as transformers builds them: no decay on biases and LayerNorm weights."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or "weight_multiplier" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def total_steps(num_rows: int, spec: TrainSpec) -> int:
    return max(1, math.ceil(math.ceil(num_rows / spec.batch_size) * spec.epochs))


def linear_warmup_decay(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    """Linear warm-up then linear decay to 0 (transformers' default schedule)."""
    warmup = math.ceil(steps * warmup_ratio)  # as transformers rounds it

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PeakMemory:
    """Samples this process's resident memory in a thread.

    ``peak`` is the largest value seen; ``growth`` is peak minus the value at entry, which is what
    a stage added (comparable between stages run one after another in one process).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        import psutil

        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)

    def __enter__(self) -> PeakMemory:
        import psutil

        self.start = self.peak = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
