"""Tests for autoq.measure.latency (interleaved timing harness) and autoq.measure.fp32 (FP32 baseline)."""
from __future__ import annotations

import time

import pytest
import torch
import torch._inductor.freezing
from torch import nn

from autoq.measure import fp32
from autoq.measure.fp32 import best_float
from autoq.measure.latency import LatencyStats, fastest, measure_latency, measurement_settings, speedup


def _flush_denormal_on() -> bool:
    return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0


# ---------------------------------------------------------------- latency harness


def test_rounds_rotate_the_call_order_and_each_turn_is_two_calls() -> None:
    calls: list[str] = []
    models = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    stats = measure_latency(models, (), warmup=0, min_repeats=6, max_repeats=6)
    rounds = ["".join(calls[i:i + 6]) for i in range(0, len(calls), 6)]
    assert rounds == ["aabbcc", "bbccaa", "ccaabb"] * 2
    assert {name: s.repeats for name, s in stats.items()} == {"a": 6, "b": 6, "c": 6}


def test_warmup_and_settling_calls_are_not_timed() -> None:
    calls: list[str] = []
    stats = measure_latency({"a": lambda: calls.append("a")}, (), warmup=4, min_repeats=3, max_repeats=3)
    assert len(calls) == 4 + 3 * 2
    assert stats["a"].repeats == 3


def test_a_model_is_timed_back_to_back_not_after_its_neighbour() -> None:
    previous: list[str] = [""]

    def cold_after_others(name: str):
        def call() -> None:
            if previous[0] != name:  # e.g. caches and threads left behind by the model before
                time.sleep(0.003)
            previous[0] = name
        return call

    stats = measure_latency({"a": cold_after_others("a"), "b": cold_after_others("b")}, (),
                            warmup=0, min_repeats=10, max_repeats=10)
    assert stats["a"].median_ms < 1.0 and stats["b"].median_ms < 1.0


def test_stops_after_min_repeats_once_target_time_is_spent() -> None:
    stats = measure_latency({"a": lambda: None}, (), warmup=0, min_repeats=5, max_repeats=100,
                            target_seconds=1e-9)
    assert stats["a"].repeats == 5


def test_never_exceeds_max_repeats() -> None:
    stats = measure_latency({"a": lambda: None}, (), warmup=0, min_repeats=2, max_repeats=7,
                            target_seconds=60.0)
    assert stats["a"].repeats == 7


def test_sleep_measures_about_its_duration_and_slower_than_noop() -> None:
    stats = measure_latency({"sleep": lambda: time.sleep(0.002), "noop": lambda: None}, (),
                            warmup=1, min_repeats=20, max_repeats=20)
    sleep = stats["sleep"]
    assert 1.9 <= sleep.median_ms <= 4.0
    assert sleep.p10_ms <= sleep.median_ms <= sleep.p90_ms
    assert stats["noop"].median_ms < 0.1 < sleep.median_ms
    assert speedup(sleep, stats["noop"]) > 10


def test_callables_receive_inputs_and_run_under_measurement_settings() -> None:
    seen: list[tuple[object, int, bool]] = []
    marker = object()
    measure_latency({"a": lambda x: seen.append((x, torch.get_num_threads(), torch.is_grad_enabled()))},
                    (marker,), threads=1, warmup=0, min_repeats=2, max_repeats=2)
    assert seen == [(marker, 1, False)] * 4  # 2 rounds of a settling and a timed call


@pytest.mark.parametrize("initial_flush", [False, True])
def test_measurement_settings_restores_threads_and_flush_denormal(initial_flush: bool) -> None:
    threads_before = torch.get_num_threads()
    torch.set_flush_denormal(initial_flush)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with measurement_settings(threads=1):
                assert torch.get_num_threads() == 1
                assert _flush_denormal_on()
                assert not torch.is_grad_enabled()
                raise RuntimeError("inside")
        assert torch.get_num_threads() == threads_before
        assert _flush_denormal_on() is initial_flush
        assert torch.is_grad_enabled()
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads_before)


def test_measurement_settings_none_keeps_thread_count() -> None:
    threads_before = torch.get_num_threads()
    with measurement_settings(threads=None):
        assert torch.get_num_threads() == threads_before


@pytest.mark.parametrize(("models", "kwargs", "error", "message"), [
    ({}, {}, ValueError, "empty"),
    ({"ok": lambda: None, "broken": 3}, {}, TypeError, "'broken'"),
    ({"a": lambda: None}, {"target_seconds": 0.0}, ValueError, "got 0.0"),
    ({"a": lambda: None}, {"target_seconds": -1.0}, ValueError, "got -1.0"),
    ({"a": lambda: None}, {"min_repeats": 0}, ValueError, "got 0"),
    ({"a": lambda: None}, {"min_repeats": 5, "max_repeats": 3}, ValueError, r"max_repeats \(3\)"),
    ({"a": lambda: None}, {"threads": 0}, ValueError, "got 0"),
])
def test_invalid_arguments_are_rejected(models: dict, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        measure_latency(models, (), **kwargs)


def test_a_bare_tensor_as_inputs_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"\(x,\)"):
        measure_latency({"a": lambda x: x}, torch.ones(2))


def test_speedup_is_ratio_of_medians() -> None:
    slow = LatencyStats(median_ms=4.0, p10_ms=3.0, p90_ms=5.0, repeats=10)
    fast = LatencyStats(median_ms=1.0, p10_ms=0.5, p90_ms=2.0, repeats=10)
    assert speedup(slow, fast) == 4.0
    assert speedup(fast, slow) == 0.25


def test_speedup_of_models_timed_together_pairs_their_rounds() -> None:
    # the machine slows down 3x in the later rounds; per-round ratios stay 2x, medians would not
    slow = LatencyStats(median_ms=6.0, p10_ms=2.0, p90_ms=6.0, repeats=4, samples_ms=(2.0, 2.0, 6.0, 6.0))
    fast = LatencyStats(median_ms=2.0, p10_ms=1.0, p90_ms=3.0, repeats=4, samples_ms=(1.0, 1.0, 3.0, 3.0))
    assert speedup(slow, fast) == 2.0
    assert slow.median_ms / fast.median_ms == 3.0


def test_fastest_compares_models_round_by_round() -> None:
    # b is 10% faster than a in 4 of 5 rounds; the machine's slow spell hit a's rounds less often,
    # so comparing medians (1.0 vs 2.7 ms) would pick a
    a = LatencyStats(median_ms=1.0, p10_ms=1.0, p90_ms=3.0, repeats=5, samples_ms=(1.0, 1.0, 1.0, 3.0, 3.0))
    b = LatencyStats(median_ms=2.7, p10_ms=0.9, p90_ms=2.7, repeats=5, samples_ms=(0.9, 0.9, 2.7, 2.7, 2.7))
    assert fastest({"a": a, "b": b}) == "b"
    unpaired = LatencyStats(median_ms=0.5, p10_ms=0.5, p90_ms=0.5, repeats=1, samples_ms=(0.5,))
    assert fastest({"a": a, "b": b, "c": unpaired}) == "c"  # different round counts: medians decide


# ---------------------------------------------------------------- best FP32 baseline


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + x)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


def _with_trained_bn_stats(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """Gives every BatchNorm non-trivial running statistics, so folding changes weights; leaves train mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(input_shape) * 3 + 1)
    return model


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _Residual(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return _with_trained_bn_stats(model, (4, 3, 16, 16))


def _state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_best_float_folds_bn_keeps_outputs_and_leaves_the_model_untouched() -> None:
    model = _small_cnn()
    state_before = _state_snapshot(model)
    x = torch.randn(2, 3, 16, 16)

    result = best_float(model, (x,), rewrite="folded")

    assert result.steps == ["fold_bn", "channels_last"]
    assert result.warnings == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    model_state = model.state_dict()
    assert model_state.keys() == state_before.keys()
    assert all(torch.equal(model_state[name], state_before[name]) for name in state_before)
    assert all(module.training for module in model.modules())
    with torch.no_grad():
        expected = model.eval()(x)
    assert torch.allclose(result.model(x), expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(result.model(x * 2), model(x * 2), rtol=1e-4, atol=1e-5)


def test_best_float_untraceable_model_still_works_with_a_folding_warning() -> None:
    torch.manual_seed(0)
    model = _with_trained_bn_stats(_Untraceable(), (2, 3, 8, 8)).eval()
    x = torch.randn(1, 3, 8, 8)

    result = best_float(model, (x,), rewrite="folded")

    assert "fold_bn" not in result.steps
    assert len(result.warnings) == 1 and result.warnings[0].startswith("fold_bn skipped")
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), rtol=1e-4, atol=1e-5)
        assert torch.allclose(result.model(-x), model(-x), rtol=1e-4, atol=1e-5)


def test_best_float_skips_channels_last_without_4d_inputs() -> None:
    model = _with_trained_bn_stats(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), (8, 6)).eval()
    x = torch.randn(3, 6)

    result = best_float(model, (x,), rewrite="folded")

    assert result.steps == ["fold_bn"]
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_best_float_drops_a_step_that_changes_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    class _OffByOne(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + 1

    real_fuse = fp32.fuse
    monkeypatch.setattr(fp32, "fuse", lambda traced, **kwargs: _OffByOne(real_fuse(traced, **kwargs)))
    model = _small_cnn().eval()
    x = torch.randn(1, 3, 16, 16)

    result = best_float(model, (x,), rewrite="folded")

    assert result.steps == ["channels_last"]
    assert len(result.warnings) == 1 and result.warnings[0].startswith("fold_bn dropped")
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_best_float_falls_back_when_compile_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_compile(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C++ compiler found\nlong traceback")

    monkeypatch.setattr(torch, "compile", failing_compile)
    model = _small_cnn().eval()
    x = torch.randn(1, 3, 16, 16)

    result = best_float(model, (x,))

    assert "torch.compile(freezing)" not in result.steps
    assert result.warnings == ["torch.compile failed: RuntimeError: no C++ compiler found; "
                               "using the uncompiled model."]
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_best_float_compiles_with_freezing_or_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    freeze_calls: list[None] = []
    real_freeze = torch._inductor.freezing.freeze

    def counting_freeze(*args: object, **kwargs: object) -> object:
        freeze_calls.append(None)
        return real_freeze(*args, **kwargs)

    monkeypatch.setattr(torch._inductor.freezing, "freeze", counting_freeze)
    torch.manual_seed(0)
    model = _with_trained_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                                   (2, 3, 8, 8)).eval()
    x = torch.randn(1, 3, 8, 8)

    result = best_float(model, (x,), rewrite="compiled")

    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(result.model(x), expected, rtol=1e-4, atol=1e-5)
    if "torch.compile(freezing)" in result.steps:
        assert result.steps == ["fold_bn", "channels_last", "torch.compile(freezing)"]
        assert len(freeze_calls) == 1
        # a later call with autograd enabled reuses the frozen graph instead of recompiling
        assert torch.allclose(result.model(x + 1), model(x + 1), rtol=1e-4, atol=1e-5)
        assert len(freeze_calls) == 1
    else:
        assert any(w.startswith("torch.compile") for w in result.warnings), result.warnings
