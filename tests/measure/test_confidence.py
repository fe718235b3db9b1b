"""Tests for autoq.measure.confidence (loss bounds from paired per-sample scores) and the speedup interval."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from autoq.config import TuneConfig
from autoq.measure.confidence import median_interval, paired_loss, samples_needed
from autoq.measure.latency import LatencyStats, speed_verdict, speedup, speedup_interval


def _binary(n: int, accuracy: float, worse: int, better: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 correctness of FP32 and int8 on n samples: FP32 right on round(accuracy * n), int8 wrong on
    `worse` of those and right on `better` of the samples FP32 gets wrong."""
    right = round(accuracy * n)
    fp32 = np.r_[np.ones(right), np.zeros(n - right)]
    int8 = fp32.copy()
    int8[:worse] = 0
    int8[right:right + better] = 1
    return fp32, int8


def _simulated_binary(rng: np.random.Generator, n: int, accuracy: float, p_worse: float,
                      p_better: float) -> tuple[np.ndarray, np.ndarray]:
    both_right, worse, better, _ = rng.multinomial(n, [accuracy - p_worse, p_worse, p_better,
                                                       1 - accuracy - p_better])
    fp32 = np.r_[np.ones(both_right + worse), np.zeros(better), np.zeros(n - both_right - worse - better)]
    int8 = np.r_[np.ones(both_right), np.zeros(worse), np.ones(better), np.zeros(n - both_right - worse - better)]
    return fp32, int8


def _coverage_binary(n: int, accuracy: float, p_worse: float, p_better: float, runs: int) -> float:
    true_loss = (p_worse - p_better) / accuracy
    rng = np.random.default_rng(0)
    covered = [paired_loss(*_simulated_binary(rng, n, accuracy, p_worse, p_better), loss_type="relative",
                           higher_is_better=True, confidence=0.9).upper >= true_loss for _ in range(runs)]
    return float(np.mean(covered))


# ---------------------------------------------------------------- coverage


def test_the_score_bound_covers_the_true_loss_at_its_level():
    # accuracy 0.9, relative loss 0.5%, 3% of samples flip between the models
    assert 0.86 <= _coverage_binary(2000, 0.9, 0.01725, 0.01275, runs=600) <= 0.95


def test_the_score_bound_keeps_its_level_when_int8_only_ever_loses():
    # the conditional (exact McNemar) bound covers this loss in about 54% of runs
    assert 0.86 <= _coverage_binary(1000, 0.9, 0.011, 0.0, runs=600) <= 0.97


def test_the_bootstrap_bound_covers_the_true_loss_at_its_level():
    # negative squared error: FP32 residuals N(0, 1), int8 adds N(0, 0.1^2): relative loss exactly 1%
    rng = np.random.default_rng(0)
    covered = []
    for seed in range(200):
        residual = rng.normal(size=300)
        fp32, int8 = -residual ** 2, -(residual + rng.normal(scale=0.1, size=300)) ** 2
        estimate = paired_loss(fp32, int8, loss_type="relative", higher_is_better=True, seed=seed)
        assert estimate.method == "bootstrap"
        covered.append(estimate.upper >= 0.01)
    assert 0.85 <= np.mean(covered) <= 0.95


# ---------------------------------------------------------------- budget verdicts


def test_a_point_estimate_within_budget_is_not_enough():
    estimate = paired_loss(*_binary(1000, 0.9, worse=20, better=14), loss_type="relative", higher_is_better=True)
    assert (estimate.method, estimate.worse, estimate.better, estimate.baseline) == ("score", 20, 14, 0.9)
    assert estimate.loss == pytest.approx(0.006 / 0.9)
    assert estimate.loss < 0.01 < estimate.upper


def test_enough_samples_at_the_same_rates_certify_the_budget():
    estimate = paired_loss(*_binary(100_000, 0.9, worse=2000, better=1400), loss_type="relative",
                           higher_is_better=True)
    assert estimate.loss < estimate.upper <= 0.01


def test_identical_models_get_a_positive_bound_that_shrinks_with_samples():
    uppers = []
    for n in (100, 1000, 10_000):
        fp32, _ = _binary(n, 0.9, 0, 0)
        estimate = paired_loss(fp32, fp32.copy(), loss_type="absolute", higher_is_better=True)
        assert estimate.loss == 0 and estimate.worse == estimate.better == 0
        uppers.append(estimate.upper)
    assert 0 < uppers[2] < uppers[1] < uppers[0]
    assert uppers[1] == pytest.approx(1.2816 ** 2 / 1000, rel=0.01)  # about z^2 / n


def test_identical_continuous_scores_bound_at_the_point_estimate():
    scores = np.linspace(0.1, 0.9, 50)
    estimate = paired_loss(scores, scores.copy(), loss_type="relative", higher_is_better=True)
    assert (estimate.method, estimate.loss, estimate.upper) == ("bootstrap", 0.0, 0.0)


def test_a_higher_confidence_gives_a_higher_bound():
    fp32, int8 = _binary(1000, 0.9, worse=20, better=14)
    uppers = [paired_loss(fp32, int8, loss_type="relative", higher_is_better=True, confidence=c).upper
              for c in (0.8, 0.9, 0.95)]
    assert uppers == sorted(uppers) and len(set(uppers)) == 3


@pytest.mark.parametrize("loss_type", ["relative", "absolute"])
@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize("baseline_sign", [1, -1])
def test_the_loss_matches_tune_config(loss_type, higher_is_better, baseline_sign):
    rng = np.random.default_rng(1)
    fp32 = baseline_sign * rng.uniform(1, 2, size=300)
    worse_side = -0.05 if higher_is_better else 0.05
    int8 = fp32 + worse_side + rng.normal(scale=0.01, size=300)
    estimate = paired_loss(fp32, int8, loss_type=loss_type, higher_is_better=higher_is_better)
    config = TuneConfig(loss_type=loss_type, higher_is_better=higher_is_better)
    assert estimate.loss == pytest.approx(config.loss(fp32.mean(), int8.mean()))
    assert 0 < estimate.loss < estimate.upper
    assert estimate.worse > 290


def test_error_indicators_lower_is_better_give_the_same_bound_as_correctness():
    correct_fp32, correct_int8 = _binary(500, 0.8, worse=12, better=5)
    as_correctness = paired_loss(correct_fp32, correct_int8, loss_type="absolute", higher_is_better=True)
    as_errors = paired_loss(1 - correct_fp32, 1 - correct_int8, loss_type="absolute", higher_is_better=False)
    assert as_errors == dataclasses.replace(as_correctness, baseline=as_errors.baseline)
    assert as_errors.baseline == pytest.approx(0.2) and as_errors.loss == pytest.approx(7 / 500)


# ---------------------------------------------------------------- samples needed


def test_samples_needed_agrees_with_the_bound_and_is_monotone():
    estimate = paired_loss(*_binary(1000, 0.9, worse=20, better=14), loss_type="relative", higher_is_better=True)
    budgets = [0.008, 0.01, 0.015, 0.02, 0.05]
    needed = [samples_needed(estimate, budget) for budget in budgets]
    assert needed == sorted(needed, reverse=True) and len(set(needed)) == len(budgets)
    for budget, n in zip(budgets, needed):
        assert (n <= estimate.n) == (estimate.upper <= budget)
    assert samples_needed(estimate, estimate.loss) is None
    more_confident = paired_loss(*_binary(1000, 0.9, worse=20, better=14), loss_type="relative",
                                 higher_is_better=True, confidence=0.95)
    assert samples_needed(more_confident, 0.01) > samples_needed(estimate, 0.01)


def test_samples_needed_certifies_about_half_the_time():
    # a 1000-sample eval at these rates cannot certify 1%; at the suggested size, about half the evals do
    pilot = paired_loss(*_binary(1000, 0.9, worse=18, better=13), loss_type="relative", higher_is_better=True)
    n = samples_needed(pilot, 0.01)
    assert n > 1000
    rng = np.random.default_rng(0)
    certified = [paired_loss(*_simulated_binary(rng, n, 0.9, 0.018, 0.013), loss_type="relative",
                             higher_is_better=True).upper <= 0.01 for _ in range(300)]
    assert 0.4 <= np.mean(certified) <= 0.65


# ---------------------------------------------------------------- speed


def _stats(samples_ms: np.ndarray) -> LatencyStats:
    return LatencyStats(median_ms=float(np.median(samples_ms)), p10_ms=float(np.quantile(samples_ms, 0.1)),
                        p90_ms=float(np.quantile(samples_ms, 0.9)), repeats=len(samples_ms),
                        samples_ms=tuple(samples_ms))


def _rounds(speed_ratio: float, noise: float, rounds: int, seed: int = 0) -> tuple[LatencyStats, LatencyStats]:
    rng = np.random.default_rng(seed)
    machine = rng.uniform(1, 1.5, size=rounds)  # slow spells hit both models in a round
    reference = 10 * machine * np.exp(rng.normal(scale=noise, size=rounds))
    candidate = 10 / speed_ratio * machine * np.exp(rng.normal(scale=noise, size=rounds))
    return _stats(reference), _stats(candidate)


@pytest.mark.parametrize(("speed_ratio", "verdict"), [(1.3, "faster"), (1.0, "tie"), (1 / 1.3, "slower")])
def test_speedup_interval_verdicts(speed_ratio, verdict):
    reference, candidate = _rounds(speed_ratio, noise=0.1, rounds=30)
    median, low, high = speedup_interval(reference, candidate)
    assert median == speedup(reference, candidate)
    assert low < median < high
    assert speed_verdict(low, high) == verdict


def test_a_small_speedup_in_noisy_rounds_is_a_tie():
    median, low, high = speedup_interval(*_rounds(1.05, noise=0.3, rounds=20))
    assert median > 1 and speed_verdict(low, high) == "tie"


def test_too_few_rounds_give_an_unbounded_interval():
    median, low, high = speedup_interval(*_rounds(2.0, noise=0.01, rounds=4))
    assert median > 1.9 and (low, high) == (-math.inf, math.inf)
    assert speed_verdict(low, high) == "tie"


def test_median_interval_covers_the_median_at_its_level():
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(400):
        low, high = median_interval(rng.exponential(size=25), 0.9)
        covered.append(low <= math.log(2) <= high)
    assert 0.92 <= np.mean(covered) <= 0.98  # at least 0.9; order statistics of 25 values give 0.957


def test_speedup_interval_needs_paired_rounds():
    reference, candidate = _rounds(1.3, noise=0.1, rounds=10)
    with pytest.raises(ValueError, match="same rounds.*one measure_latency call"):
        speedup_interval(reference, dataclasses.replace(candidate, samples_ms=()))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("fp32", "int8", "kwargs", "message"), [
    ([1, 0, 1], [1, 0], {}, "fp32_scores has 3 samples but int8_scores has 2: score both models on the same"),
    ([], [], {}, "are empty: score both models"),
    ([1.0, math.nan, 0.5], [1.0, 0.2, 0.5], {}, r"fp32_scores\[1\] is nan .*must be finite"),
    ([1.0, 0.5], [1.0, math.inf], {}, r"int8_scores\[1\] is inf"),
    ([[1, 0], [0, 1]], [[1, 0], [0, 1]], {}, r"1-D\), got shape \(2, 2\)"),
    ([0.0, 0.0], [0.1, 0.0], {}, "FP32 metric is 0.*use loss_type='absolute'"),
    ([1, 0], [1, 0], {"loss_type": "percent"}, "loss_type must be 'relative' or 'absolute'. Got 'percent'"),
    ([1, 0], [1, 0], {"confidence": 95}, r"confidence must be in \(0.5, 1\), e.g. 0.9. Got 95"),
    ([0.5], [0.4], {}, "at least 2 samples"),
])
def test_bad_input_says_what_to_fix(fp32, int8, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_loss(fp32, int8, **{"loss_type": "relative", "higher_is_better": True, **kwargs})
