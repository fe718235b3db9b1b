"""Confidence bounds for an int8 model's accuracy loss against FP32 and for its speedup.

Accuracy: both models are scored on the same n samples (per-sample scores whose mean is the metric),
and the loss is bounded from above, one-sided: a plan is within budget when the bound at level c is
<= max_loss, i.e. "the loss is at most max_loss with confidence c". A two-sided interval's upper end
at level c would be a one-sided bound at (1 + c) / 2, stricter than the claim needs. Assumption:
the samples are drawn i.i.d. from the deployment distribution and were not used to choose the plan
(a search that picks the best of many plans on the same samples makes the bound optimistic).

- 0/1 scores (e.g. top-1 correctness): Tango's asymptotic score bound for the difference of paired
  proportions (Tango 1998, Stat Med 17:891), driven by the discordant pairs: `worse` samples where
  only FP32 scores 1 and `better` where only int8 does. The exact conditional (McNemar /
  Clopper-Pearson) bound on the discordant pairs treats their count as fixed; when int8's flips
  mostly go one way it covers the loss as rarely as half the time; the score bound keeps its level.
  With no discordant pairs the bound is still positive (about z^2 / n).
  A relative loss divides by the FP32 metric as if it were exact; its relative standard error,
  sqrt((1 - a) / (a n)) for accuracy a (0.75% at a = 0.9, n = 2000), moves the bound by as little.
- any other scores: a paired BCa bootstrap (scipy.stats.bootstrap) of the loss, resampling samples
  with both models' scores together, so a relative loss is bootstrapped as the ratio of means it is.
  It needs hundreds of samples; when every resample gives the same loss the bound is that loss.

The default confidence is 0.9 (one-sided): a plan whose true loss is at (or over) the budget
passes at most one time in ten. 0.95 needs (1.645 / 1.282)^2 = 1.65x the samples for the same
margin: with 1000 samples at 90% accuracy and 3% discordance, a 1% relative budget certifies an
observed relative loss up to about 0.2% at 0.9, and not even 0 at 0.95.

Speed: `median_interval` is the distribution-free order-statistic interval of a median
(scipy.stats.quantile_test; binomial, no distribution assumed, rounds assumed independent).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

DEFAULT_CONFIDENCE = 0.9
BOOTSTRAP_RESAMPLES = 2000
_BOOTSTRAP_BATCH_VALUES = 2_000_000  # resampled scores held in memory at once


@dataclass(frozen=True)
class LossEstimate:
    """Accuracy loss of int8 against FP32 on paired samples, in the run's loss units.

    loss: point estimate (relative: a fraction of the FP32 metric; absolute: metric units;
      positive = int8 worse). upper: one-sided upper confidence bound on the loss at `confidence`.
    n: samples. method: 'score' (0/1 scores) or 'bootstrap'. baseline: the FP32 metric.
    worse / better: samples on which int8 scored below / above FP32 (in the metric's direction).
    """

    loss: float
    upper: float
    confidence: float
    n: int
    method: str
    baseline: float
    worse: int
    better: int


def _scores(name: str, values: Sequence[float]) -> np.ndarray:
    scores = np.asarray(values, dtype=float)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be one score per sample (1-D), got shape {scores.shape}: "
                         "flatten it, or reduce each sample's outputs to one score.")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] is {scores[bad[0]]} ({bad.size} non-finite scores in all): "
                         "per-sample scores must be finite; check the metric on those samples.")
    return scores


def _check_confidence(confidence: float) -> None:
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), e.g. {DEFAULT_CONFIDENCE}. Got {confidence!r}.")


def _score_upper(worse: int, better: int, n: int, confidence: float) -> float:
    """Tango's score upper bound on P(int8 worse) - P(int8 better), one-sided at `confidence`."""
    if worse == n:
        return 1.0
    z = stats.norm.ppf(confidence)

    def statistic_above_bound(delta: float) -> float:  # > 0 while the score test accepts `delta`
        quad_b = -worse - better + (2 * n - worse + better) * delta
        p_better = (math.sqrt(quad_b ** 2 + 8 * n * better * delta * (1 - delta)) - quad_b) / (4 * n)
        spread = max(n * (2 * p_better + delta * (1 - delta)), 1e-300)  # 0 only where the numerator is 0
        return (worse - better - n * delta) / math.sqrt(spread) + z

    return optimize.brentq(statistic_above_bound, max((worse - better) / n, -1 + 1e-12), 1 - 1e-12)


def _bootstrap_upper(drops: np.ndarray, fp32: np.ndarray, relative: bool, confidence: float,
                     seed: int) -> float:
    """Paired BCa bootstrap upper bound on the loss, one-sided at `confidence`."""
    def loss(drops: np.ndarray, fp32: np.ndarray, axis: int = -1) -> np.ndarray:
        mean_drop = drops.mean(axis=axis)
        return mean_drop / np.abs(fp32.mean(axis=axis)) if relative else mean_drop

    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap((drops, fp32), loss, paired=True, vectorized=True,
                                 n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=confidence,
                                 batch=max(1, _BOOTSTRAP_BATCH_VALUES // drops.size),
                                 alternative="less", method="BCa", rng=np.random.default_rng(seed))
    upper = result.confidence_interval.high
    return float(upper) if np.isfinite(upper) else float(np.quantile(result.bootstrap_distribution, confidence))


def paired_loss(fp32_scores: Sequence[float], int8_scores: Sequence[float], *, loss_type: str,
                higher_is_better: bool, confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> LossEstimate:
    """The loss of int8 against FP32 from per-sample scores on the same samples, in the same order.

    loss_type / higher_is_better as in TuneConfig ('relative': a fraction of the FP32 metric,
    'absolute': metric units). confidence: level of the one-sided upper bound. seed: bootstrap only.
    """
    fp32, int8 = _scores("fp32_scores", fp32_scores), _scores("int8_scores", int8_scores)
    if fp32.size != int8.size:
        raise ValueError(f"fp32_scores has {fp32.size} samples but int8_scores has {int8.size}: "
                         "score both models on the same samples, in the same order.")
    if fp32.size == 0:
        raise ValueError("fp32_scores and int8_scores are empty: score both models on the evaluation "
                         "samples (hundreds to thousands are needed to certify a budget).")
    if loss_type not in ("relative", "absolute"):
        raise ValueError(f"loss_type must be 'relative' or 'absolute'. Got {loss_type!r}.")
    _check_confidence(confidence)
    baseline = float(fp32.mean())
    relative = loss_type == "relative"
    if relative and baseline == 0:
        raise ValueError("The FP32 metric is 0, so a relative loss is undefined: use loss_type='absolute'.")
    n = fp32.size
    drops = fp32 - int8 if higher_is_better else int8 - fp32
    worse, better = int((drops > 0).sum()), int((drops < 0).sum())
    scale = abs(baseline) if relative else 1.0
    if np.isin(fp32, (0, 1)).all() and np.isin(int8, (0, 1)).all():
        method, upper = "score", _score_upper(worse, better, n, confidence) / scale
    elif n < 2:
        raise ValueError("A bootstrap bound needs at least 2 samples (hundreds in practice); got 1.")
    else:
        method, upper = "bootstrap", _bootstrap_upper(drops, fp32, relative, confidence, seed)
    return LossEstimate(loss=float(drops.mean()) / scale, upper=upper, confidence=confidence, n=n,
                        method=method, baseline=baseline, worse=worse, better=better)


def samples_needed(estimate: LossEstimate, max_loss: float) -> int | None:
    """About how many samples would certify max_loss at the estimate's confidence (None: never).

    Normal approximation at the observed rates: the margin upper - loss shrinks as 1/sqrt(n), so
    the answer is n * (margin / (max_loss - loss))^2, <= n exactly when upper <= max_loss. None when
    the observed loss is already >= max_loss.
    """
    if estimate.loss >= max_loss:
        return None
    margin = estimate.upper - estimate.loss
    return max(1, math.ceil(estimate.n * (margin / (max_loss - estimate.loss)) ** 2))


def median_interval(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Two-sided distribution-free interval (order statistics) of the median of `values`, same units.

    (-inf, inf) when there are too few values for this confidence (fewer than 5 at 0.9).
    """
    _check_confidence(confidence)
    interval = stats.quantile_test(_scores("values", values), p=0.5).confidence_interval(confidence)
    if np.isnan(interval.low):
        return -math.inf, math.inf
    return float(interval.low), float(interval.high)
