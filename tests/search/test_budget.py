"""The time of a tune call: phases, trial estimates and the final phase's reserve (issue 17)."""

import math

import optuna
import pytest
from optuna.trial import TrialState

from autoq.config import SearchSpace, TuneConfig
from autoq.dispatch.measured import LayerTimer
from autoq.plan import RECIPE_KINDS, QuantPlan
from autoq.progress import Reporter
from autoq.recipes.arms import applicable_arms
from autoq.search.budget import Costs, TimeBudget, slack
from autoq.search.objective import Objective
from autoq.search.space import PlanProposer
from autoq.search.study import NOT_STARTED_ATTR
from nets import MLP


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_and_first_feasible_are_timed():
    clock = Clock()
    budget = TimeBudget(600, clock)
    with budget.phase("setup"):
        clock.now += 40
    with budget.phase("trials"):
        clock.now += 15
        budget.feasible_found()
        clock.now += 100
        budget.feasible_found()  # only the first counts
    with budget.phase("final"):
        clock.now += 20
    timing = budget.as_dict()
    assert (timing["setup_s"], timing["trials_s"], timing["final_s"], timing["total_s"]) == (40, 115, 20, 175)
    assert timing["first_feasible_s"] == 55 and timing["timeout_s"] == 600
    assert budget.remaining() == 425 and budget.progress() == "175/600 s"


def test_a_trial_fits_only_before_the_reserve():
    clock = Clock()
    budget = TimeBudget(100, clock)
    clock.now += 60
    assert budget.fits(30, reserve=10) and not budget.fits(31, reserve=10)
    unbounded = TimeBudget(None, clock)
    assert unbounded.remaining() == math.inf and unbounded.fits(1e9, reserve=1e9) and unbounded.progress() == ""


def test_the_slowest_trial_of_a_kind_is_the_estimate():
    budget = TimeBudget(100, Clock())
    assert budget.trial_estimate("static", unseen=7.0) == 7.0
    budget.trial_done("static", 3.0)
    budget.trial_done("static", 5.0)
    assert budget.trial_estimate("static", unseen=70.0) == 5.0
    assert budget.trial_estimate("pt2e-static", unseen=70.0) == 70.0


def test_costs_of_unseen_builds_and_of_the_final_phase():
    costs = Costs(evaluation=10.0, confirmation=20.0, compile=15.0, latency=1.0)
    assert costs.unseen_build(RECIPE_KINDS["pt2e-static"], 50) == 30.0  # two FP32 compiles
    assert costs.unseen_build(RECIPE_KINDS["static"], 50) == 5.0
    assert costs.after_build() == pytest.approx(15.0)
    # two finalists: rebuilt (4 + 30 s), each confirmed (20 s), timing (6 x 1 s) and overhead (5 s)
    assert costs.final([4.0, 30.0]) == pytest.approx(34 + 40 + 6 + 5)


def test_slack_is_five_percent_or_thirty_seconds():
    assert slack(100) == 30 and slack(1200) == 60


def test_a_trial_that_would_not_fit_is_not_started_but_queued_again(digits):
    """The search already measured a plan; 10 s are left and a trial takes about 20 (its evaluation
    alone 15): the next trial is not started, it is queued for a later run, and the search stops."""
    model = digits.train(MLP())
    arms = applicable_arms(model, (digits.x[:1],), [(batch,) for batch in digits.calib], ["static"])
    clock = Clock()
    budget = TimeBudget(100, clock)
    budget.costs = Costs(evaluation=15.0, confirmation=0.0, compile=0.0, latency=0.1)
    objective = Objective(arms, PlanProposer(SearchSpace(), arms, {"static": arms.layers("static")}), model,
                          digits.accuracy, 1.0, TuneConfig(), LayerTimer(), Reporter(verbose=False), budget)
    measured = QuantPlan(recipe="static")
    objective._remember(measured.key(), {"metric": 1.0, "loss": 0.0, "speedup": 2.0}, measured.to_dict())
    clock.now += 90
    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=3)
    first = study.trials[0]
    assert first.state == TrialState.PRUNED and first.user_attrs[NOT_STARTED_ATTR] > 10
    assert [t.state for t in study.trials] == [TrialState.PRUNED, TrialState.WAITING]  # stopped, queued again
    assert study.trials[1].system_attrs["fixed_params"] == first.params and budget.skipped_trials == 1
