"""Range observers for static int8 activation quantization.

Every observer keeps its statistics in buffers (so they are in ``state_dict`` and checkpoints) and
can ``sync()`` them across ``torch.distributed`` ranks, so every rank ends with the same range:
minimum and maximum are reduced with MIN / MAX, moving averages are averaged over ranks, and
histograms are re-binned onto the common range and summed.

Methods:
- ``minmax``: the smallest and largest value seen.
- ``moving_average``: exponential moving average of each batch's min and max (``momentum``).
- ``percentile``: the ``(100 - p)``-th and ``p``-th percentiles of a histogram of everything seen.
- ``mse``: the clipping range that minimises the expected squared error of the int8 affine grid
  (clipping error outside, ``step**2 / 12`` rounding noise inside), searched on the histogram.
- ``entropy``: the clipping range that minimises the KL divergence between the histogram and its
  256-level quantized version, as NVIDIA TensorRT's entropy calibrator does (Migacz, "8-bit
  Inference with TensorRT", GTC 2017), extended to asymmetric ranges.

Example:
    >>> obs = build_observer("percentile", percentile=99.0)
    >>> _ = obs(torch.linspace(-1, 1, 1001))
    >>> [round(float(v), 2) for v in obs.range()]
    [-0.98, 0.98]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "OBSERVER_METHODS",
    "Observer",
    "MinMaxObserver",
    "MovingAverageObserver",
    "HistogramObserver",
    "PercentileObserver",
    "MSEObserver",
    "EntropyObserver",
    "build_observer",
    "matching_observer",
]

OBSERVER_METHODS = ("minmax", "moving_average", "percentile", "mse", "entropy")
# int8 (signed or unsigned) has 256 levels; the affine grid spans the range with 255 steps.
_LEVELS = 256
# Histogram resolution: fine enough that a clipping range 1/32 of the observed one still spans
# 256 bins (the entropy search needs at least one bin per level).
_BINS = 8192
_SEARCH_STEPS = 128


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Observer(nn.Module):
    """Base class: ``forward(x)`` records statistics and returns ``x`` unchanged."""

    method = ""
    method_id: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        # Lets a checkpoint rebuild the right observer class (see matching_observer).
        code = OBSERVER_METHODS.index(self.method) if self.method in OBSERVER_METHODS else -1
        self.register_buffer("method_id", torch.tensor(code))
        self._range_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel():
            self.update(x.detach())
            self._range_cache = None
        return x

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(min, max)`` float32 range to quantize to (cached until the statistics change)."""
        if self._range_cache is None:
            self._range_cache = self._compute_range()
        return self._range_cache

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sync(self) -> None:
        """Make the statistics identical on every rank (no-op outside torch.distributed)."""
        self._range_cache = None
        if _distributed():
            self._sync()

    def _sync(self) -> None:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Constructor arguments that rebuild an observer of the same kind."""
        return {}

    @property
    def has_data(self) -> bool:
        lo, hi = self.range()
        return bool(torch.isfinite(lo) and torch.isfinite(hi))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._range_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options().items())


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything seen.

    Example:
        >>> obs = MinMaxObserver()
        >>> _ = obs(torch.tensor([-1.0, 2.0])); _ = obs(torch.tensor([3.0]))
        >>> [float(v) for v in obs.range()]
        [-1.0, 3.0]
    """

    method = "minmax"
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def update(self, x: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, x.min().float())
        self.max_val = torch.maximum(self.max_val, x.max().float())

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def _sync(self) -> None:
        torch.distributed.all_reduce(self.min_val, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(self.max_val, op=torch.distributed.ReduceOp.MAX)


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's minimum and maximum.

    ``new = momentum * old + (1 - momentum) * batch``; the first batch sets the range. Under
    torch.distributed the ranks' averages are averaged.

    Example:
        >>> obs = MovingAverageObserver(momentum=0.5)
        >>> _ = obs(torch.tensor([-2.0, 2.0])); _ = obs(torch.tensor([0.0, 4.0]))
        >>> [float(v) for v in obs.range()]
        [-1.0, 3.0]
    """

    method = "moving_average"
    min_val: torch.Tensor
    max_val: torch.Tensor
    momentum: torch.Tensor

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`calibration.momentum` must be in [0, 1); got {momentum!r}")
        self.register_buffer("momentum", torch.tensor(float(momentum), dtype=torch.float64))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def update(self, x: torch.Tensor) -> None:
        lo, hi = x.min().float(), x.max().float()
        if not torch.isfinite(self.min_val):
            self.min_val, self.max_val = lo, hi
            return
        m = float(self.momentum)
        self.min_val = m * self.min_val + (1 - m) * lo
        self.max_val = m * self.max_val + (1 - m) * hi

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def _sync(self) -> None:
        # Ranks that saw nothing hold inf and must not poison the mean.
        seen = torch.isfinite(self.min_val)
        stats = torch.stack(
            [torch.where(seen, self.min_val, 0.0), torch.where(seen, self.max_val, 0.0), seen.float()]
        ).double()
        torch.distributed.all_reduce(stats)
        if stats[2] > 0:
            self.min_val = (stats[0] / stats[2]).float().to(self.min_val.device)
            self.max_val = (stats[1] / stats[2]).float().to(self.max_val.device)

    def options(self) -> dict[str, Any]:
        return {"momentum": float(self.momentum)}


def _rebin(hist: torch.Tensor, lo: float, hi: float, new_lo: float, new_hi: float) -> torch.Tensor:
    """Spread a histogram over ``[lo, hi]`` onto the same number of bins over ``[new_lo, new_hi]``.

    Counts are assumed uniform inside each old bin (the cumulative count is interpolated linearly),
    so the total is preserved exactly.
    """
    bins = hist.numel()
    new_edges = torch.linspace(new_lo, new_hi, bins + 1, dtype=torch.float64, device=hist.device)
    if hi <= lo:
        # A point mass (every value seen was equal): it lands in the bin that holds it.
        index = math.floor((lo - new_lo) / max(new_hi - new_lo, 1e-300) * bins)
        out = torch.zeros_like(hist)
        out[min(max(index, 0), bins - 1)] = hist.sum()
        return out
    cdf = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
    position = ((new_edges - lo) / (hi - lo) * bins).clamp(0, bins)
    left = position.floor().long().clamp(max=bins - 1)
    frac = position - left
    cdf_new = cdf[left] + frac * (cdf[left + 1] - cdf[left])
    return (cdf_new[1:] - cdf_new[:-1]).clamp(min=0)


class HistogramObserver(Observer):
    """A histogram of everything seen over a range that always includes 0; subclasses pick the range.

    The histogram covers ``[min(seen min, 0), max(seen max, 0)]`` with ``bins`` equal bins and is
    re-binned when a batch extends that range.
    """

    histogram: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor
    symmetric: torch.Tensor

    def __init__(self, bins: int = _BINS, symmetric: bool = False) -> None:
        super().__init__()
        if bins < _LEVELS:
            raise ValueError(f"histogram observers need bins >= {_LEVELS}; got {bins!r}")
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("symmetric", torch.tensor(bool(symmetric)))

    @property
    def has_data(self) -> bool:
        return bool(self.histogram.sum() > 0)

    def _extend(self, lo: float, hi: float) -> None:
        old_lo, old_hi = float(self.min_val), float(self.max_val)
        new_lo, new_hi = min(lo, old_lo, 0.0), max(hi, old_hi, 0.0)
        if self.has_data and (new_lo, new_hi) != (old_lo, old_hi):
            self.histogram = _rebin(self.histogram, old_lo, old_hi, new_lo, new_hi)
        self.min_val.fill_(new_lo)
        self.max_val.fill_(new_hi)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1).float()
        self._extend(float(x.min()), float(x.max()))
        lo, hi = float(self.min_val), float(self.max_val)
        if hi <= lo:
            self.histogram[0] += x.numel()
            return
        self.histogram += torch.histc(x, self.histogram.numel(), lo, hi).double()

    def _sync(self) -> None:
        dist = torch.distributed
        lo, hi = self.min_val.clone(), self.max_val.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.isfinite(lo):
            return
        if self.has_data:
            self._extend(float(lo), float(hi))
        else:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        dist.all_reduce(self.histogram)

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.min_val.device
        if not self.has_data:
            return torch.tensor(float("inf"), device=device), torch.tensor(float("-inf"), device=device)
        lo, hi = float(self.min_val), float(self.max_val)
        if hi > lo:
            # The searches are many tiny vector operations: numpy on the CPU is much faster for them.
            hist = self.histogram.detach().cpu().numpy()
            lo, hi = self._search(hist, np.linspace(lo, hi, hist.size + 1))
        return torch.tensor(lo, device=device), torch.tensor(hi, device=device)

    def _search(self, hist: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        raise NotImplementedError(f"{type(self).__name__} does not choose a range; use a subclass")

    def _fractions(self, steps: int = _SEARCH_STEPS) -> np.ndarray:
        # Fractions of the observed range, evenly spaced in log scale (the same relative precision
        # for a clip at 1/30 of the range as near the full range). Below _LEVELS / bins a level
        # would be narrower than a bin.
        return np.geomspace(_LEVELS / self.histogram.numel(), 1.0, steps)

    def _bound(self) -> float:
        return max(-float(self.min_val), float(self.max_val))

    def options(self) -> dict[str, Any]:
        return {"bins": self.histogram.numel(), "symmetric": bool(self.symmetric)}

    def as_method(self, method: str, **options: Any) -> HistogramObserver:
        """A histogram observer of another method holding a copy of these statistics.

        ``auto`` records one histogram per layer and scores percentile, mse and entropy on it.
        """
        other = build_observer(method, **{**options, **self.options()})
        if not isinstance(other, HistogramObserver):
            raise ValueError(f"`{method}` is not a histogram method; use percentile, mse or entropy")
        other.to(self.histogram.device)
        other.histogram.copy_(self.histogram)
        other.min_val.copy_(self.min_val)
        other.max_val.copy_(self.max_val)
        return other


class PercentileObserver(HistogramObserver):
    """The ``(100 - p)``-th and ``p``-th percentiles of everything seen (outliers beyond them are clipped)."""

    method = "percentile"
    percentile: torch.Tensor

    def __init__(self, percentile: float = 99.99, bins: int = _BINS, symmetric: bool = False) -> None:
        super().__init__(bins, symmetric)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"`calibration.percentile` must be in (50, 100]; got {percentile!r}")
        self.register_buffer("percentile", torch.tensor(float(percentile), dtype=torch.float64))

    def _search(self, hist: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        cdf = np.concatenate([[0.0], np.cumsum(hist)]) / hist.sum()
        q = float(self.percentile) / 100.0
        # Linear interpolation of the cumulative count inside a bin (values spread evenly in it).
        lo, hi = np.interp([1.0 - q, q], cdf, edges)
        if q >= 1.0:
            lo, hi = edges[0], edges[-1]
        if bool(self.symmetric):
            return -max(-lo, hi), max(-lo, hi)
        return float(lo), float(hi)

    def options(self) -> dict[str, Any]:
        return {"percentile": float(self.percentile), **super().options()}


class MSEObserver(HistogramObserver):
    """The clipping range with the smallest expected squared quantization error on the int8 grid.

    For a candidate range ``[a, b]`` (step ``s = (b - a) / 255``) the error is the clipping error
    ``sum n (c - a)**2`` / ``sum n (c - b)**2`` of the bins outside plus ``s**2 / 12`` rounding noise
    for each value inside; all candidates are evaluated at once with prefix sums.
    """

    method = "mse"

    def _search(self, hist: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        centers = (edges[:-1] + edges[1:]) / 2
        # Prefix sums of n, n*c and n*c**2 give the clipping error of any tail in O(1).
        count, first, second = (np.concatenate([[0.0], np.cumsum(hist * centers**p)]) for p in range(3))
        fractions = self._fractions(2 * _SEARCH_STEPS)
        if bool(self.symmetric):
            lo_c, hi_c = -self._bound() * fractions, self._bound() * fractions
        else:
            lo_c, hi_c = edges[0] * fractions, edges[-1] * fractions
        below = np.searchsorted(centers, lo_c)  # bins whose center lies below lo_c
        above = np.searchsorted(centers, hi_c, side="right")  # bins whose center is <= hi_c
        n_lo = count[below]
        err_lo = second[below] - 2 * lo_c * first[below] + lo_c**2 * n_lo
        n_hi = count[-1] - count[above]
        err_hi = (second[-1] - second[above]) - 2 * hi_c * (first[-1] - first[above]) + hi_c**2 * n_hi
        if bool(self.symmetric):
            inside = count[-1] - n_lo - n_hi
            error = err_lo + err_hi + inside * ((hi_c - lo_c) / (_LEVELS - 1)) ** 2 / 12
            best = int(np.argmin(error))
            return float(lo_c[best]), float(hi_c[best])
        # Asymmetric ranges: every (low, high) pair, so outliers on one side only clip that side.
        inside = count[-1] - n_lo[:, None] - n_hi[None, :]
        step = (hi_c[None, :] - lo_c[:, None]) / (_LEVELS - 1)
        error = err_lo[:, None] + err_hi[None, :] + inside * step**2 / 12
        i, j = np.unravel_index(int(np.argmin(error)), error.shape)
        return float(lo_c[i]), float(hi_c[j])


class EntropyObserver(HistogramObserver):
    """The clipping range whose 256-level quantized histogram is closest in KL divergence (TensorRT).

    For each candidate, the reference distribution P is the histogram inside the range with the
    clipped tails folded into its edge bins; Q merges the (unfolded) bins into 256 levels and spreads
    each level's mass evenly over its non-empty bins. The candidate with the smallest KL(P || Q) wins.
    Asymmetric ranges first scale both ends together, then refine each end alone.
    """

    method = "entropy"

    def _search(self, hist: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
        width, origin = edges[1] - edges[0], edges[0]
        zero = int(round(-origin / width))  # index of the edge at 0 (the range always holds it)
        if bool(self.symmetric):
            radius = self._bound() / width
            start, stop = _coarse_to_fine(
                hist, self._fractions(32), lambda f: (zero - round(radius * f), zero + round(radius * f))
            )
            # The edge nearest 0 need not be exactly 0: report the window's half-width on both sides.
            bound = (stop - start) / 2 * width
            return -float(bound), float(bound)
        low, high = zero, hist.size - zero  # bins below and above 0
        start, stop = _coarse_to_fine(
            hist, self._fractions(32), lambda f: (zero - round(low * f), zero + round(high * f))
        )
        # Then each end alone around its value (outliers on one side only), within the histogram.
        up, down = stop - zero, zero - start
        stop = _coarse_to_fine(
            hist, np.geomspace(0.5, 2.0, 16), lambda f: (start, min(zero + round(up * f), hist.size))
        )[1]
        start = _coarse_to_fine(hist, np.geomspace(0.5, 2.0, 16), lambda f: (max(zero - round(down * f), 0), stop))[0]
        return float(origin + start * width), float(origin + stop * width)


def _coarse_to_fine(
    hist: np.ndarray, fractions: np.ndarray, window: Callable[[float], tuple[int, int]]
) -> tuple[int, int]:
    """The window with the smallest clipped KL divergence: over ``fractions``, then finer around the best."""
    best = _best_window(hist, fractions, window)
    k = int(np.searchsorted(fractions, best))
    lo, hi = fractions[max(k - 1, 0)], fractions[min(k + 1, len(fractions) - 1)]
    return window(_best_window(hist, np.append(np.geomspace(lo, hi, 16), best), window))


def _best_window(hist: np.ndarray, fractions: np.ndarray, window: Callable[[float], tuple[int, int]]) -> float:
    """The fraction whose window ``[start, stop)`` of bins has the smallest clipped KL divergence."""
    best, best_kl = float(fractions[-1]), float("inf")
    for fraction in fractions:
        start, stop = window(float(fraction))
        if stop - start < _LEVELS:
            continue  # a level would be narrower than a bin
        kl = _clipped_kl(hist, start, stop)
        if kl < best_kl:
            best, best_kl = float(fraction), kl
    return best


def _clipped_kl(hist: np.ndarray, start: int, stop: int) -> float:
    """KL(P || Q) for the window ``[start, stop)`` of ``hist`` (it may reach past the histogram)."""
    bins = hist.size
    window = np.zeros(stop - start)
    lo, hi = max(start, 0), min(stop, bins)
    window[lo - start : hi - start] = hist[lo:hi]
    reference = window.copy()
    reference[0] += hist[:lo].sum()
    reference[-1] += hist[hi:].sum()
    level = np.arange(stop - start) * _LEVELS // (stop - start)
    nonzero = window > 0
    mass = np.bincount(level, window, _LEVELS)
    count = np.bincount(level, nonzero, _LEVELS)
    quantized = np.where(nonzero, mass[level] / np.maximum(count[level], 1), 0.0)
    p = reference / reference.sum()
    q = quantized / max(quantized.sum(), 1e-300)
    # Bins that Q leaves empty but P does not (the folded tails) get a little mass, as TensorRT smooths.
    q = np.where((q == 0) & (p > 0), 1e-4 / q.size, q)
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / q[mask])).sum())


_CLASSES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def build_observer(method: str, **options: Any) -> Observer:
    """The observer for a calibration method name.

    Args:
        method: one of ``minmax``, ``moving_average``, ``percentile``, ``mse``, ``entropy``.
        **options: ``momentum`` (moving_average), ``percentile`` (percentile), ``symmetric`` and
            ``bins`` (histogram methods). Options another method uses are ignored, so one dict of
            calibration settings can build any observer.

    Raises:
        ValueError: an unknown method or an out-of-range option.

    Example:
        >>> type(build_observer("mse", symmetric=True, momentum=0.5)).__name__
        'MSEObserver'
    """
    if method not in _CLASSES:
        raise ValueError(f"`calibration.method` must be one of {', '.join(OBSERVER_METHODS)}; got {method!r}")
    cls = _CLASSES[method]
    accepted = {
        "moving_average": ("momentum",),
        "percentile": ("percentile", "bins", "symmetric"),
        "mse": ("bins", "symmetric"),
        "entropy": ("bins", "symmetric"),
    }.get(method, ())
    return cls(**{k: v for k, v in options.items() if k in accepted})


def matching_observer(current: Observer, state_dict: dict[str, Any], prefix: str) -> Observer:
    """``current``, or an empty observer of the kind a checkpoint holds under ``prefix``.

    Calibration may replace a layer's observer by another kind (``auto`` picks one per layer), so a
    freshly prepared model rebuilds it from the checkpoint before loading the buffers.
    """
    code = state_dict.get(prefix + "method_id")
    if code is None or not 0 <= int(code) < len(OBSERVER_METHODS):
        return current
    options: dict[str, Any] = {}
    for key in ("momentum", "percentile", "symmetric"):
        if prefix + key in state_dict:
            value = state_dict[prefix + key]
            options[key] = bool(value) if key == "symmetric" else float(value)
    if prefix + "histogram" in state_dict:
        options["bins"] = state_dict[prefix + "histogram"].numel()
    stored = build_observer(OBSERVER_METHODS[int(code)], **options)
    if type(stored) is type(current) and stored.options() == current.options():
        return current
    return stored.to(current.method_id.device)
