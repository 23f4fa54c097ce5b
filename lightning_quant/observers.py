"""Range observers for static activation quantization and weight clipping.

Every observer keeps its statistics in buffers (so they are in ``state_dict`` and checkpoints) and
can ``sync()`` them across ``torch.distributed`` ranks, so every rank ends with the same range.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Observer", "MinMaxObserver", "build_observer"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Observer(nn.Module):
    """Base class: ``forward(x)`` records statistics and returns ``x`` unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.update(x.detach())
        return x

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(min, max)`` range to quantize to."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make the statistics identical on every rank (no-op outside torch.distributed)."""

    @property
    def has_data(self) -> bool:
        lo, hi = self.range()
        return bool(torch.isfinite(lo) and torch.isfinite(hi))


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything seen.

    Example:
        >>> obs = MinMaxObserver()
        >>> _ = obs(torch.tensor([-1.0, 2.0])); _ = obs(torch.tensor([3.0]))
        >>> [float(v) for v in obs.range()]
        [-1.0, 3.0]
    """

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def update(self, x: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, x.min().float())
        self.max_val = torch.maximum(self.max_val, x.max().float())

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def sync(self) -> None:
        if _distributed():
            torch.distributed.all_reduce(self.min_val, op=torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(self.max_val, op=torch.distributed.ReduceOp.MAX)


def build_observer(method: str, **options: float) -> Observer:
    """The observer for a calibration method name."""
    if method == "minmax":
        return MinMaxObserver()
    raise ValueError(f"`calibration.method` {method!r} is not available yet; use minmax")
