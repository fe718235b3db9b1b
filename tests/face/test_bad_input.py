"""Bad input fails fast with errors that name the problem and the fix; bad trials don't stop a study."""

import math

import pytest
from torch import nn

import autoq
from autoq.plan import QuantPlan
from conftest import fast_settings


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))


@pytest.fixture(scope="module")
def trained(digits):
    return digits.train(small_cnn(), epochs=40)


class CountingEval:
    def __init__(self, digits, fail_on=(), nan_on=()):
        self.digits, self.calls, self.fail_on, self.nan_on = digits, 0, set(fail_on), set(nan_on)

    def __call__(self, model):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("metric server unavailable")
        if self.calls in self.nan_on:
            return math.nan
        return self.digits.accuracy(model)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_loss=0), "max_loss"),
    (dict(max_loss=-0.5), "max_loss"),
    (dict(max_loss=float("nan")), "max_loss"),
    (dict(loss_type="percent"), "loss_type"),
    (dict(n_trials=0), "n_trials"),
    (dict(storage="runs.db"), "storage URL"),
])
def test_bad_settings_fail_before_any_work(trained, digits, tmp_path, kwargs, message):
    evaluate = CountingEval(digits)
    settings = {**fast_settings(tmp_path), **kwargs}
    with pytest.raises(ValueError, match=message):
        autoq.tune(trained, (digits.x[:1],), digits.calib, evaluate, n_trials=settings.pop("n_trials", 2), **settings)
    if "storage" not in kwargs:
        assert evaluate.calls == 0


def test_empty_calibration_data_fails_before_any_work(trained, digits, tmp_path):
    evaluate = CountingEval(digits)
    with pytest.raises(ValueError, match="calib_data.*empty"):
        autoq.tune(trained, (digits.x[:1],), [], evaluate, n_trials=2, **fast_settings(tmp_path))
    assert evaluate.calls == 0


def test_model_off_the_cpu_fails_before_any_work(digits, tmp_path):
    evaluate = CountingEval(digits)
    with pytest.raises(ValueError, match=r"on 'meta'.*model.cpu\(\)"):
        autoq.tune(small_cnn().to("meta"), (digits.x[:1],), digits.calib, evaluate, n_trials=2,
                   **fast_settings(tmp_path))
    assert evaluate.calls == 0


def test_non_module_and_non_callable_metric_are_rejected(trained, digits, tmp_path):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        autoq.tune(lambda x: x, (digits.x[:1],), digits.calib, digits.accuracy, **fast_settings(tmp_path))
    with pytest.raises(TypeError, match="eval_fn"):
        autoq.tune(trained, (digits.x[:1],), digits.calib, 0.9, **fast_settings(tmp_path))


def test_eval_fn_raising_or_nan_fails_that_trial_and_the_study_goes_on(trained, digits, tmp_path):
    # call 1 is the FP32 baseline; calls 3 and 5 belong to trials
    evaluate = CountingEval(digits, fail_on={3}, nan_on={5})
    result = autoq.tune(trained, (digits.x[:1],), digits.calib, evaluate, n_trials=6, prune_slower=False,
                        **fast_settings(tmp_path))
    states = [t["state"] for t in result.trials]
    assert len(states) == 6 and states.count("FAIL") == 2
    errors = [t["error"] for t in result.trials if t["state"] == "FAIL"]
    assert any("metric server unavailable" in e for e in errors)
    assert any("nan" in e for e in errors)
    assert result.feasible


def test_plan_rejects_unknown_choices_naming_the_allowed_values():
    with pytest.raises(ValueError, match=r"'engine'.*\['x86', 'fbgemm', 'onednn'\].*'mkl'"):
        QuantPlan(engine="mkl")
    with pytest.raises(ValueError, match="activation_observer"):
        QuantPlan(activation_observer="entropy")
    with pytest.raises(ValueError, match="version"):
        QuantPlan.from_dict({"_type": "autoq.QuantPlan", "_version": 99, "_data": {}})


def test_plan_round_trips_through_json():
    import json

    plan = QuantPlan(engine="fbgemm", activation_observer="kl", layer_observers={"a": "percentile"},
                     fp32_layers=["b", "a"], calib_samples=64, channels_last=True)
    again = QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.key() == plan.key()
    assert again.fp32_layers == ["a", "b"]


def test_unknown_fallback_layer_is_reported_with_the_known_ones(trained, digits):
    with pytest.raises(ValueError, match=r"not quantizable layers.*Known layers: \['0', '3'\]"):
        autoq.quantize(trained, QuantPlan(fp32_layers=["classifier"]), (digits.x[:1],), digits.calib)
