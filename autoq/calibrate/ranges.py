"""Activation ranges from calibration statistics, one function per observer method.

'minmax' and 'moving_average' follow torch's MinMaxObserver / MovingAverageMinMaxObserver;
'histogram' runs torch's own HistogramObserver L2 search on our histogram; 'percentile' clips at
a percentile; 'kl' is the entropy calibration of TensorRT (torch has none).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.ao.quantization.observer import HistogramObserver

from autoq.calibrate.stats import HIST_BINS, TensorStats


def activation_range(
    stats: TensorStats, method: str, *, levels: int, symmetric: bool, percentile: float
) -> tuple[float, float]:
    """(min, max) in tensor units for `method`.

    levels: integer levels of the quantized type (256 for quint8, 128 with reduce_range).
    symmetric: whether the range is used symmetrically around zero (halves the levels of each side).
    percentile: upper percentile in % for the 'percentile' method.
    """
    key = (method, levels, symmetric, percentile if method == "percentile" else None)
    if key not in stats.ranges:
        stats.ranges[key] = _RANGE_FUNCTIONS[method](stats, levels, symmetric, percentile)
    return stats.ranges[key]


def _minmax(stats: TensorStats, levels: int, symmetric: bool, percentile: float) -> tuple[float, float]:
    return stats.min_val, stats.max_val


def _moving_average(stats: TensorStats, levels: int, symmetric: bool, percentile: float) -> tuple[float, float]:
    return stats.ema_min, stats.ema_max


def _histogram_l2(stats: TensorStats, levels: int, symmetric: bool, percentile: float) -> tuple[float, float]:
    observer = HistogramObserver(bins=HIST_BINS)
    observer.histogram = stats.hist.float()
    observer.min_val = torch.tensor(stats.hist_min)
    observer.max_val = torch.tensor(stats.hist_max)
    low, high = observer._non_linear_param_search()
    return float(low), float(high)


def _percentile(stats: TensorStats, levels: int, symmetric: bool, percentile: float) -> tuple[float, float]:
    low = _quantile(stats.hist.numpy(), stats.hist_min, stats.hist_max, 1.0 - percentile / 100.0)
    high = _quantile(stats.hist.numpy(), stats.hist_min, stats.hist_max, percentile / 100.0)
    return min(low, stats.max_val), max(high, stats.min_val)


def _quantile(hist: np.ndarray, low: float, high: float, q: float) -> float:
    """Value below which a fraction q of the histogram mass lies (linear within a bin)."""
    cdf = np.cumsum(hist) / max(hist.sum(), 1e-12)
    index = int(np.searchsorted(cdf, q))
    index = min(index, len(hist) - 1)
    below = cdf[index - 1] if index > 0 else 0.0
    inside = (q - below) / max(cdf[index] - below, 1e-12)
    width = (high - low) / len(hist)
    return low + (index + float(np.clip(inside, 0.0, 1.0))) * width


def _kl(stats: TensorStats, levels: int, symmetric: bool, percentile: float) -> tuple[float, float]:
    signed = stats.min_val < 0 < stats.max_val
    per_side = levels // 2 if signed or symmetric else levels
    threshold = kl_threshold(stats.abs_hist.numpy(), stats.abs_max, per_side)
    if signed:
        return max(stats.min_val, -threshold), min(stats.max_val, threshold)
    if stats.max_val <= 0:
        return max(stats.min_val, -threshold), stats.max_val
    return stats.min_val, min(stats.max_val, threshold)


def kl_threshold(abs_hist: np.ndarray, abs_max: float, levels: int, max_candidates: int = 256) -> float:
    """TensorRT entropy calibration: the clipping threshold for |x| that minimizes KL(P || Q).

    abs_hist: histogram of |x| over [0, abs_max]. levels: quantization levels available for
    [0, threshold]. P is the histogram clipped at the threshold (outliers folded into the last
    bin), Q is P quantized to `levels` levels and expanded back over P's non-empty bins.
    """
    hist = np.asarray(abs_hist, dtype=np.float64)
    bins = len(hist)
    if bins <= levels or hist.sum() == 0:
        return float(abs_max)
    step = max(1, (bins - levels) // max_candidates)
    best_kl, best_stop = np.inf, bins
    for stop in range(levels, bins + 1, step):
        reference = hist[:stop].copy()
        reference[-1] += hist[stop:].sum()
        group = (np.arange(stop) * levels) // stop
        nonzero = (hist[:stop] > 0).astype(np.float64)
        group_mass = np.bincount(group, weights=hist[:stop], minlength=levels)
        group_count = np.bincount(group, weights=nonzero, minlength=levels)
        expanded = np.where(nonzero > 0, group_mass[group] / np.maximum(group_count[group], 1.0), 0.0)
        divergence = _kl_divergence(reference, expanded)
        if divergence < best_kl:
            best_kl, best_stop = divergence, stop
    return float(best_stop * abs_max / bins)


def _kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    p, q = _smooth(p, eps), _smooth(q, eps)
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _smooth(distribution: np.ndarray, eps: float) -> np.ndarray:
    """Give empty bins a little mass taken from the non-empty ones (as MXNet/TensorRT do)."""
    zero = distribution == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_nonzero == 0 or n_zero == 0:
        return distribution.astype(np.float64)
    total = distribution.sum()
    taken = eps * n_zero / n_nonzero
    smoothed = distribution / total
    smoothed = np.where(zero, eps, smoothed - taken)
    return np.clip(smoothed, eps * 1e-3, None)


_RANGE_FUNCTIONS = {
    "minmax": _minmax,
    "moving_average": _moving_average,
    "histogram": _histogram_l2,
    "percentile": _percentile,
    "kl": _kl,
}
