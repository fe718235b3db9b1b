"""Trustworthy verdicts: per-sample evaluation, a confirmation part the search never sees, confidence
bounds, speed intervals, studies re-judged by the current settings, and the metric's direction."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import autoq
from autoq.measure.evaluation import split

from conftest import fast_settings


def is_int8(model: nn.Module) -> bool:
    return any("quantized" in type(module).__module__ for module in model.modules())


def test_a_plan_whose_point_loss_fits_but_whose_bound_does_not_is_not_called_within_budget(mnist_task, tmp_path):
    # every int8 model gets one held-back sample of 400 wrong that FP32 gets right: 0.5% loss on the 200
    # held-back samples (budget 1%), too few to show a 1% upper bound at 90% confidence
    held_back = split(400, 0.5, seed=0)["confirm"]

    def eval_fn(model):
        scores = np.ones(400)
        if is_int8(model):
            scores[held_back[7]] = 0.0
        return scores

    settings = dict(n_trials=3, space={"recipes": ["static"]}, **fast_settings(tmp_path))
    with pytest.warns(UserWarning, match="no plan met the accuracy budget"):
        result = autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, eval_fn, **settings)
    verdict = result.verdict
    assert verdict["part"] == "confirm" and verdict["samples"] == 200 and verdict["method"] == "score"
    assert result.loss == pytest.approx(0.005) and verdict["upper"] > 0.01 and not result.feasible
    assert "NOT certified" in verdict["guarantee"] and "upper bound" in result.summary()
    point = autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, eval_fn, confidence=None,
                       **{**settings, "storage": f"sqlite:///{tmp_path / 'point.db'}"})
    assert point.feasible and point.verdict["upper"] is None  # the point estimate alone would have said yes


def test_the_search_never_evaluates_the_confirmation_samples(mnist_task, tmp_path):
    images, labels = mnist_task.val
    n = 300
    inputs = mnist_task.preprocess(images[:n]) if mnist_task.preprocess else images[:n]
    ids = torch.arange(n, dtype=torch.float32)  # the targets carry each sample's id
    calls: list[set[int]] = []

    def top1_by_id(outputs, sample_ids):
        calls.append(set(sample_ids.long().tolist()))
        return (outputs.argmax(1) == labels[sample_ids.long()]).float()

    eval_data = [(inputs[i:i + 64], ids[i:i + 64]) for i in range(0, n, 64)]
    result = autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, eval_data=eval_data,
                        metric=top1_by_id, n_trials=4, space={"recipes": ["static"]}, **fast_settings(tmp_path))
    seen = [i for ids_of_call in calls for i in ids_of_call]  # evaluations in order: FP32 on all, then parts
    evaluations = [set(seen[:n])] + [set(seen[i:i + n // 2]) for i in range(n, len(seen), n // 2)]
    everything, search = set(range(n)), evaluations[1]
    confirm = everything - search
    assert evaluations[0] == everything and len(seen[n:]) % (n // 2) == 0  # FP32 once on every sample
    phases = ["search" if part == search else "confirm" if part == confirm else "mixed" for part in evaluations[1:]]
    assert "mixed" not in phases and "confirm" in phases
    assert phases.index("confirm") == phases.count("search")  # the search never saw them; then only them
    assert result.verdict["part"] == "confirm" and result.verdict["samples"] == n // 2


def test_a_study_resumed_with_a_tighter_budget_judges_its_trials_by_it(mnist_task, tmp_path):
    def eval_fn(model):  # every int8 plan loses about 0.5% (10 of 2000 samples, split between the parts)
        scores = np.ones(2000)
        if is_int8(model):
            scores[::200] = 0.0
        return scores

    args = (mnist_task.model, mnist_task.example_inputs, mnist_task.calib, eval_fn)
    settings = dict(n_trials=5, space={"recipes": ["static"]}, confidence=None, **fast_settings(tmp_path))
    loose = autoq.tune(*args, max_loss=0.05, **settings)
    assert all(row["feasible"] for row in loose.trials if row["state"] == "COMPLETE")
    tight = autoq.tune(*args, max_loss=0.004, **settings)  # same study: its 5 trials are kept, none is re-run
    assert tight.study_name == loose.study_name and len(tight.trials) == len(loose.trials)
    assert all(row["feasible"] == (row["loss"] <= 0.004) for row in tight.trials if row["state"] == "COMPLETE")
    assert not tight.feasible  # no plan meets 0.4% on the search part: it says so


def test_a_fixed_study_name_cannot_reuse_another_models_trials(mnist_task, tmp_path):
    settings = dict(n_trials=2, space={"recipes": ["static"]}, study_name="shared", **fast_settings(tmp_path))
    autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn(), **settings)
    other = copy.deepcopy(mnist_task.model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(0.5)
    with pytest.raises(ValueError, match="holds trials of another model"):
        autoq.tune(other, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn(), **settings)


def test_a_loss_like_metric_left_at_higher_is_better_gets_a_warning(mnist_task, tmp_path):
    def error_rate(model):  # lower is better; every int8 plan looks 100% "better" when read the other way
        return 0.2 if is_int8(model) else 0.1

    with pytest.warns(UserWarning, match="higher_is_better=False"):
        autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, error_rate, n_trials=5,
                   space={"recipes": ["static"]}, **fast_settings(tmp_path))  # the seeds: 4 kernels, 1 fallback


def test_speedups_carry_intervals_and_a_verdict(mnist_task, tmp_path):
    result = autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn(),
                        n_trials=3, space={"recipes": ["static"]}, **fast_settings(tmp_path))
    low, high = result.speedup_interval
    assert low <= result.speedup <= high
    assert result.vs_best_fp32[1] <= result.vs_best_fp32[0] <= result.vs_best_fp32[2]
    assert all(len(row["speedup_interval"]) == 2 for row in result.trials if row["state"] == "COMPLETE")
    assert f"[{low:.2f}-{high:.2f}]" in result.summary()
    assert result.verdict["part"] == "confirm" and result.verdict["upper"] is not None  # per-sample zoo eval_fn
