"""Observers on synthetic data with known answers (issue 3, point 1)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_quant.formats.affine import affine_qparams, fake_quantize_affine
from lightning_quant.observers import (
    OBSERVER_METHODS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageObserver,
    PercentileObserver,
    build_observer,
    matching_observer,
)

# 99.99th percentile of N(0, 1).
Z_9999 = 3.7190


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> torch.Tensor:
    """4M draws of N(0, 1) plus one planted outlier on each side.

    With 8-bit grids, clipping pays for an outlier only when it is rarer than about one value in a
    million (a wide range costs every value step**2/12): at this rarity the MSE-optimal range is
    set by the Gaussian, not by the outliers.
    """
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4_000_000, generator=generator)
    x[123] = 40.0
    x[456_789] = -30.0
    return x


def _observe(method: str, x: torch.Tensor, **options) -> tuple[float, float]:
    observer = build_observer(method, **options)
    for chunk in x.chunk(8):
        observer(chunk)
    lo, hi = observer.range()
    return float(lo), float(hi)


def _quant_error(x: torch.Tensor, lo: float, hi: float, symmetric: bool) -> float:
    scale, zero_point, qmin, qmax = affine_qparams(torch.tensor(lo), torch.tensor(hi), True, symmetric)
    return float((fake_quantize_affine(x, scale, zero_point, qmin, qmax) - x).double().pow(2).sum())


def test_minmax_sees_the_outliers_percentile_mse_entropy_ignore_them(gaussian_with_outliers):
    x = gaussian_with_outliers
    ranges = {m: _observe(m, x) for m in ("minmax", "percentile", "mse", "entropy")}
    print("\nGaussian (4M) + outliers at -30 / +40, asymmetric ranges:")
    for method, (lo, hi) in ranges.items():
        print(f"  {method:10s} [{lo:8.3f}, {hi:8.3f}]")
    assert ranges["minmax"] == (-30.0, 40.0)
    # Known answer: the Gaussian's 0.01 % / 99.99 % quantiles.
    lo, hi = ranges["percentile"]
    assert lo == pytest.approx(-Z_9999, rel=0.02) and hi == pytest.approx(Z_9999, rel=0.02)
    for method in ("percentile", "mse", "entropy"):
        lo, hi = ranges[method]
        assert -6 < lo < -3 and 3 < hi < 6, method
    # Entropy (TensorRT's KL criterion) lands close to the MSE optimum.
    mse_lo, mse_hi = ranges["mse"]
    ent_lo, ent_hi = ranges["entropy"]
    assert ent_hi == pytest.approx(mse_hi, rel=0.2) and ent_lo == pytest.approx(mse_lo, rel=0.2)


def test_mse_range_is_the_brute_force_optimum(gaussian_with_outliers):
    """Known answer: the symmetric bound whose true fake-quantization error is smallest."""
    x = gaussian_with_outliers
    lo, hi = _observe("mse", x, symmetric=True)
    assert lo == -hi
    bounds = torch.linspace(3.0, 6.0, 61).tolist()
    errors = [_quant_error(x, -b, b, symmetric=True) for b in bounds]
    best = bounds[min(range(len(bounds)), key=errors.__getitem__)]
    found = _quant_error(x, lo, hi, symmetric=True)
    print(f"\nmse bound {hi:.3f} (brute force {best:.3f}); error {found:.1f} vs {min(errors):.1f}")
    assert found <= min(errors) * 1.005
    assert hi == pytest.approx(best, rel=0.05)
    assert _quant_error(x, -40.0, 40.0, symmetric=True) > 2 * found  # minmax's range is far worse


def test_symmetric_ranges_are_symmetric(gaussian_with_outliers):
    x = gaussian_with_outliers[500_000:1_000_000]  # no outlier in this slice
    for method in ("percentile", "mse", "entropy"):
        lo, hi = _observe(method, x, symmetric=True)
        assert lo == -hi and 3 < hi < 6, method


def test_minmax_and_moving_average_known_values():
    minmax = MinMaxObserver()
    average = MovingAverageObserver(momentum=0.5)
    for batch in (torch.tensor([-2.0, 2.0]), torch.tensor([0.0, 4.0]), torch.tensor([-1.0, 1.0])):
        minmax(batch)
        average(batch)
    assert [float(v) for v in minmax.range()] == [-2.0, 4.0]
    # (-2 -> 0.5*-2 + 0.5*0 = -1 -> 0.5*-1 + 0.5*-1 = -1), (2 -> 3 -> 2)
    assert [float(v) for v in average.range()] == [-1.0, 2.0]


def test_histogram_keeps_every_count_when_the_range_grows():
    observer = PercentileObserver(percentile=100.0, bins=512)
    total = 0
    for scale in (0.1, 1.0, 10.0, 3.0):
        batch = torch.randn(10_000) * scale
        observer(batch)
        total += batch.numel()
    assert float(observer.histogram.sum()) == pytest.approx(total)
    lo, hi = observer.range()
    assert float(observer.min_val) == float(lo) and float(observer.max_val) == float(hi)


def test_histogram_range_holds_zero_and_point_masses():
    observer = build_observer("mse")
    observer(torch.full((100,), 2.0))
    assert float(observer.range()[0]) == 0.0  # the grid must represent 0 exactly
    constant = build_observer("entropy")
    constant(torch.zeros(10))
    assert [float(v) for v in constant.range()] == [0.0, 0.0]
    constant(torch.ones(10))  # a point mass re-binned onto a real range
    assert float(constant.histogram.sum()) == 20


def test_unseen_observer_has_no_data_and_sync_is_a_no_op_without_distributed():
    for method in OBSERVER_METHODS:
        observer = build_observer(method)
        assert not observer.has_data
        observer.sync()
        observer(torch.tensor([1.0, -1.0]))
        assert observer.has_data


def test_build_observer_names_the_key_and_ignores_other_methods_options():
    with pytest.raises(ValueError, match=r"`calibration.method` must be one of minmax.*got 'kl'"):
        build_observer("kl")
    with pytest.raises(ValueError, match=r"`calibration.percentile` must be in \(50, 100\]"):
        build_observer("percentile", percentile=10.0)
    assert isinstance(build_observer("minmax", momentum=0.5, percentile=99.0), MinMaxObserver)


def test_state_dict_carries_statistics_and_rebuilds_the_kind():
    source = build_observer("entropy", symmetric=True)
    source(torch.randn(5000))
    state = {f"obs.{k}": v for k, v in source.state_dict().items()}
    rebuilt = matching_observer(MinMaxObserver(), state, "obs.")
    assert isinstance(rebuilt, EntropyObserver) and bool(rebuilt.symmetric)
    rebuilt.load_state_dict(source.state_dict())
    assert [float(v) for v in rebuilt.range()] == [float(v) for v in source.range()]
    same = MinMaxObserver()
    assert matching_observer(same, {f"obs.{k}": v for k, v in same.state_dict().items()}, "obs.") is same


def test_histogram_methods_share_statistics():
    holder = build_observer("percentile", bins=1024)
    holder(torch.randn(20_000))
    mse = holder.as_method("mse")
    assert isinstance(mse, HistogramObserver) and torch.equal(mse.histogram, holder.histogram)
    with pytest.raises(ValueError, match="not a histogram method"):
        holder.as_method("minmax")


def test_range_is_cached_until_new_data():
    observer = build_observer("entropy")
    observer(torch.randn(1000))
    first = observer.range()
    assert observer.range() is first
    observer(torch.randn(1000) * 5)
    assert observer.range() is not first
    assert math.isfinite(float(observer.range()[1]))
