"""Observer methods on known distributions, and statistics gathered once for every method."""

import math

import numpy as np
import pytest
import torch
from torch.ao.quantization.observer import HistogramObserver

from autoq.calibrate.ranges import activation_range, kl_threshold
from autoq.calibrate.stats import StatsCollector, checkpoints_for, collect_stats


def _stats_of(batches):
    collector = StatsCollector()
    model = torch.nn.Sequential(collector)
    checkpoints = checkpoints_for([(b,) for b in batches])
    stats = collect_stats(model, [(b,) for b in batches], checkpoints)
    return stats["0"]


def _quantization_mse(x: torch.Tensor, low: float, high: float, levels: int = 256) -> float:
    scale = (high - low) / (levels - 1)
    q = torch.clamp(torch.round((x - low) / scale), 0, levels - 1)
    return float(((q * scale + low) - x).pow(2).mean())


def test_kl_threshold_of_uniform_data_keeps_the_whole_range():
    hist = np.full(2048, 100.0)
    assert kl_threshold(hist, 1.0, 128) >= 0.9


def test_kl_threshold_of_gaussian_clips_the_tail_at_a_few_sigma():
    torch.manual_seed(0)
    x = torch.randn(2_000_000).abs()
    hist = torch.histc(x, 2048, 0, float(x.max())).numpy()
    threshold = kl_threshold(hist, float(x.max()), 128)
    # TensorRT-style entropy calibration of a half-normal with 128 levels lands between 2.5 and 4.5 sigma
    assert 2.5 < threshold < 4.5 < float(x.max())


def test_kl_clips_a_single_outlier_that_minmax_keeps():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    x[0] = 60.0
    stats = _stats_of([x])[-1]
    low, high = activation_range(stats, "kl", levels=256, symmetric=False, percentile=99.99)
    assert high < 10 and low > -10
    mm_low, mm_high = activation_range(stats, "minmax", levels=256, symmetric=False, percentile=99.99)
    assert mm_high == pytest.approx(60.0)
    bulk = x[1:]  # the outlier is clipped by design; the other 199,999 values gain resolution
    assert _quantization_mse(bulk, low, high) < _quantization_mse(bulk, mm_low, mm_high) / 5


def test_kl_on_nonnegative_activations_uses_the_positive_range():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(100_000))
    stats = _stats_of([x])[-1]
    low, high = activation_range(stats, "kl", levels=256, symmetric=False, percentile=99.99)
    assert low == 0.0 and 1.5 < high <= float(x.max())


def test_percentile_matches_numpy_quantiles():
    torch.manual_seed(0)
    x = torch.randn(500_000)
    stats = _stats_of([x])[-1]
    low, high = activation_range(stats, "percentile", levels=256, symmetric=False, percentile=99.9)
    expected_low, expected_high = np.quantile(x.numpy(), [0.001, 0.999])
    assert low == pytest.approx(expected_low, abs=0.02)
    assert high == pytest.approx(expected_high, abs=0.02)


def test_histogram_method_agrees_with_torch_histogram_observer():
    torch.manual_seed(0)
    batches = [torch.randn(4096) * 2 + 0.5 for _ in range(4)]
    observer = HistogramObserver()
    for batch in batches:
        observer(batch)
    expected = observer._non_linear_param_search()
    stats = _stats_of(batches)[-1]
    low, high = activation_range(stats, "histogram", levels=256, symmetric=False, percentile=99.99)
    assert low == pytest.approx(float(expected[0]), rel=0.05)
    assert high == pytest.approx(float(expected[1]), rel=0.05)


def test_minmax_and_moving_average_follow_torch_definitions():
    torch.manual_seed(0)
    batches = [torch.randn(1000) * (i + 1) for i in range(5)]
    stats = _stats_of(batches)[-1]
    everything = torch.cat(batches)
    assert activation_range(stats, "minmax", levels=256, symmetric=False, percentile=99.99) == pytest.approx(
        (float(everything.min()), float(everything.max())))
    observer = torch.ao.quantization.MovingAverageMinMaxObserver()
    for batch in batches:
        observer(batch)
    low, high = activation_range(stats, "moving_average", levels=256, symmetric=False, percentile=99.99)
    assert (low, high) == pytest.approx((float(observer.min_val), float(observer.max_val)), rel=1e-5)


def test_snapshots_follow_the_sample_count():
    batches = [torch.full((32, 4), float(i + 1)) for i in range(8)]  # batch i holds only the value i+1
    snapshots = _stats_of(batches)
    assert [s.samples for s in snapshots] == [32, 64, 128, 256]
    assert [s.max_val for s in snapshots] == [1.0, 2.0, 4.0, 8.0]
    assert all(math.isclose(s.hist.sum().item(), 4 * s.samples) for s in snapshots)


def test_collector_ignores_non_finite_values():
    x = torch.tensor([1.0, float("inf"), -2.0, float("nan")])
    stats = _stats_of([x])[-1]
    assert (stats.min_val, stats.max_val) == (-2.0, 1.0)
