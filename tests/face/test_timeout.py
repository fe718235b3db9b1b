"""`timeout` bounds the whole call: setup, trials and the final choice (issue 17)."""

import time

import optuna
import pytest
from torch import nn

import autoq
from autoq.search.budget import slack
from autoq_zoo import mnist_cnn_task


@pytest.fixture(scope="module")
def task():
    return mnist_cnn_task()


def test_timeout_bounds_the_call_and_a_fine_tune_on_a_real_model(task, tmp_path):
    """A trained CNN with QAT on 40 passes over its real training split: one fine-tune alone would take
    minutes (qat_seconds=900), and Optuna's own timeout only stops between trials."""
    images, labels = task.train
    inputs = task.preprocess(images)
    train = [(inputs[i:i + 64], labels[i:i + 64]) for i in range(0, len(labels), 64)] * 40
    timeout, storage = 25.0, f"sqlite:///{tmp_path}/timeout.db"
    started = time.monotonic()
    result = autoq.tune(task.model, task.example_inputs, task.calib, eval_data=task.eval_data(), metric=task.score,
                        train_data=train, loss_fn=nn.functional.cross_entropy, timeout=timeout, qat_seconds=900,
                        storage=storage,
                        space={"recipes": ["qat"]}, verbose=False)
    elapsed = time.monotonic() - started
    assert elapsed <= timeout + slack(timeout), result.summary()
    timing = result.timing
    assert timing["timeout_s"] == timeout
    assert timing["setup_s"] + timing["trials_s"] + timing["final_s"] == pytest.approx(timing["total_s"], abs=1.0)
    assert "time      setup" in result.summary()
    trials = optuna.load_study(study_name=result.study_name, storage=storage).get_trials()
    assert len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]) == 1  # one fine-tune, cut short
