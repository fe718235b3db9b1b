"""Robust, interleaved wall-clock latency measurement of inference callables on CPU."""
from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from autoq.measure.confidence import DEFAULT_CONFIDENCE, median_interval

_DENORMAL_PROBE = 1e-39  # a float32 subnormal: reads back as 0.0 only while flush-denormal is on


@dataclass(frozen=True)
class LatencyStats:
    """Wall time of one call over `repeats` interleaved rounds, in milliseconds.

    samples_ms: the call's time in each round, in round order (rounds pair models up for `speedup`).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)


def _flush_denormal_enabled() -> bool:
    """Whether denormals are currently flushed to zero on this thread (torch has no getter)."""
    return (torch.tensor([_DENORMAL_PROBE], dtype=torch.float32) * 1.0).item() == 0.0


@contextlib.contextmanager
def measurement_settings(threads: int | None) -> Iterator[None]:
    """Pin `threads` intra-op threads (None keeps the current count), flush denormals, disable autograd.

    The previous thread count and flush-denormal setting are restored on exit, also after an error.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}.")
    previous_threads = torch.get_num_threads()
    previous_flush_denormal = _flush_denormal_enabled()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.set_flush_denormal(previous_flush_denormal)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Linearly interpolated percentile (`fraction` in [0, 1]) of an ascending, non-empty list."""
    position = fraction * (len(sorted_values) - 1)
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def _validate(models: Mapping[str, Callable[..., object]], example_inputs: tuple, warmup: int,
              min_repeats: int, max_repeats: int, target_seconds: float) -> None:
    if not models:
        raise ValueError("models is empty: pass a mapping of name -> callable with at least one entry.")
    for name, fn in models.items():
        if not callable(fn):
            raise TypeError(f"models[{name!r}] is {type(fn).__name__}, not callable: "
                            "pass a model or function.")
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of positional arguments, got "
                        f"{type(example_inputs).__name__}; wrap a single tensor as (x,).")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 calls, got {warmup}.")
    if min_repeats < 1:
        raise ValueError(f"min_repeats must be >= 1 round, got {min_repeats}.")
    if max_repeats < min_repeats:
        raise ValueError(f"max_repeats ({max_repeats}) must be >= min_repeats ({min_repeats}).")
    if not target_seconds > 0:
        raise ValueError(f"target_seconds must be > 0 seconds, got {target_seconds}.")


def measure_latency(models: Mapping[str, Callable[..., object]], example_inputs: tuple,
                    *, threads: int | None = None, warmup: int = 3, min_repeats: int = 10,
                    max_repeats: int = 200, target_seconds: float = 1.0) -> dict[str, LatencyStats]:
    """Time `fn(*example_inputs)` for every model, interleaved, and return per-model stats in ms.

    Each model is first called `warmup` times. Then every round gives each model a turn, with the
    order rotated by one each round, so drift (thermal, frequency, noisy neighbours) hits all models
    alike. A turn is two calls, and only the second is timed: the first call after another model
    pays for caches and worker threads that model left behind (~0.1 ms after an Inductor-compiled
    model here, a third of a small CNN's time, and always on the same neighbour, since rotation
    keeps the order), while a model in service runs back to back. At least `min_repeats` and at
    most `max_repeats` rounds run; after `min_repeats` rounds, measuring stops once
    `target_seconds` of wall time (seconds) have elapsed. Runs under `measurement_settings(threads)`
    with Python's garbage collector paused during the timed rounds.
    """
    _validate(models, example_inputs, warmup, min_repeats, max_repeats, target_seconds)
    names = list(models)
    durations_ns: dict[str, list[int]] = {name: [] for name in names}
    target_ns = target_seconds * 1e9
    with measurement_settings(threads):
        for _ in range(warmup):
            for name in names:
                models[name](*example_inputs)
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            measurement_start_ns = time.perf_counter_ns()
            for round_index in range(max_repeats):
                start = round_index % len(names)
                for name in names[start:] + names[:start]:
                    models[name](*example_inputs)  # settles caches and threads for this model: not timed
                    call_start_ns = time.perf_counter_ns()
                    models[name](*example_inputs)
                    durations_ns[name].append(time.perf_counter_ns() - call_start_ns)
                elapsed_ns = time.perf_counter_ns() - measurement_start_ns
                if round_index + 1 >= min_repeats and elapsed_ns > target_ns:
                    break
        finally:
            if gc_was_enabled:
                gc.enable()
    stats = {}
    for name, samples in durations_ns.items():
        in_order = tuple(ns / 1e6 for ns in samples)
        samples_ms = sorted(in_order)
        stats[name] = LatencyStats(median_ms=_percentile(samples_ms, 0.5),
                                   p10_ms=_percentile(samples_ms, 0.1),
                                   p90_ms=_percentile(samples_ms, 0.9),
                                   repeats=len(samples_ms), samples_ms=in_order)
    return stats


def speedup(reference: LatencyStats, candidate: LatencyStats) -> float:
    """How many times faster `candidate` is than `reference` (>1 = faster).

    Measured together (same rounds): the median over rounds of reference / candidate, so a slow
    spell of the machine cancels out within each round. Otherwise: the ratio of median latencies.
    """
    if candidate.median_ms <= 0:
        raise ValueError(f"candidate.median_ms must be > 0 ms to form a ratio, got {candidate.median_ms}.")
    ratios = _round_ratios(reference, candidate)
    return _percentile(ratios, 0.5) if ratios else reference.median_ms / candidate.median_ms


def _round_ratios(reference: LatencyStats, candidate: LatencyStats) -> list[float]:
    """reference / candidate time round by round, ascending; empty unless measured in the same rounds."""
    if reference.samples_ms and len(reference.samples_ms) == len(candidate.samples_ms):
        return sorted(r / c for r, c in zip(reference.samples_ms, candidate.samples_ms))
    return []


def speedup_interval(reference: LatencyStats, candidate: LatencyStats,
                     confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float, float]:
    """`speedup` (the median per-round ratio, >1 = faster) and its two-sided interval at `confidence`.

    The interval is distribution-free (order statistics of the per-round ratios, rounds assumed
    independent); with too few rounds for `confidence` (fewer than 5 at 0.9) it is (-inf, inf).
    """
    ratios = _round_ratios(reference, candidate)
    if not ratios:
        raise ValueError(f"reference and candidate were not timed in the same rounds ({len(reference.samples_ms)} "
                         f"and {len(candidate.samples_ms)} per-round samples): measure both in one measure_latency "
                         "call.")
    return (_percentile(ratios, 0.5), *median_interval(ratios, confidence))


def speed_verdict(low: float, high: float) -> str:
    """'faster' when a speedup interval lies above 1, 'slower' when below 1, else 'tie'."""
    return "faster" if low > 1 else "slower" if high < 1 else "tie"


def fastest(stats: Mapping[str, LatencyStats]) -> str:
    """The model that is fastest round by round when they were measured together.

    Each model's time in a round is divided by the geometric mean of all models' times in that
    round and the median of that over rounds decides: a slow spell of the machine cancels out.
    Models with different round counts are compared by their medians.
    """
    rounds = {len(s.samples_ms) for s in stats.values()}
    if len(rounds) != 1 or 0 in rounds:
        return min(stats, key=lambda name: stats[name].median_ms)
    names = list(stats)
    relative: dict[str, list[float]] = {name: [] for name in names}
    for times in zip(*(stats[name].samples_ms for name in names)):
        mean = math.exp(sum(math.log(t) for t in times) / len(times))
        for name, t in zip(names, times):
            relative[name].append(t / mean)
    return min(names, key=lambda name: _percentile(sorted(relative[name]), 0.5))
