"""Successive halving in the search: a plan far over budget is stopped on a share of the search part;
a plan within budget is scored on every sample exactly once; samples are drawn at random."""

import numpy as np
import pytest
import torch
from torch import nn

from autoq.config import TuneConfig
from autoq.measure.evaluation import SCREEN_SHARES, SEARCH, DataEvaluation, FunctionEvaluation, Scorer


class Flipper(nn.Module):
    """Outputs the class in column 0 of its input, except on samples whose column 1 is set: there the
    'int8' version answers class 1 (wrong) when `wrong` is on."""

    def __init__(self, wrong: bool) -> None:
        super().__init__()
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        answer = torch.where((x[:, 1] > 0) & self.wrong, torch.ones_like(x[:, 0]), x[:, 0]).long()
        return nn.functional.one_hot(answer % 2, 2).float()


def scorer_for(flipped: np.ndarray, n: int = 2000, **config) -> tuple[Scorer, list[int]]:
    """A Scorer over n samples of class 0 (FP32 always right); `flipped` samples go wrong in int8.
    Returns it and the list of sample ids every evaluation ran on (in call order)."""
    inputs = torch.zeros(n, 3)
    inputs[flipped, 1] = 1
    inputs[:, 2] = torch.arange(n, dtype=torch.float32)
    seen: list[int] = []

    def top1_logging(outputs, targets):
        return (outputs.argmax(1) == targets).float()

    class Logged(DataEvaluation):
        def run(self, model, indices=None):
            seen.extend(range(self.n) if indices is None else indices.tolist())
            return super().run(model, indices)

    evaluation = Logged([(inputs[i:i + 100], torch.zeros(len(inputs[i:i + 100]), dtype=torch.long))
                         for i in range(0, n, 100)], top1_logging)
    scorer = Scorer(evaluation, TuneConfig(**{"confirm_fraction": 0.5, **config}))
    scorer.baseline(Flipper(wrong=False))
    seen.clear()
    return scorer, seen


def test_a_plan_far_over_budget_stops_at_the_first_screen_and_is_judged_over_budget():
    scorer, seen = scorer_for(np.arange(0, 2000, 10))  # int8 wrong on 10% of the samples
    judged = scorer.screen(Flipper(wrong=True))
    search = scorer.size(SEARCH)
    assert judged.screened == int(search * SCREEN_SHARES[0]) == len(seen) < search
    assert set(seen) <= set(scorer.parts[SEARCH].tolist()) and len(set(seen)) == len(seen)
    assert judged.loss == pytest.approx(0.1, abs=0.05) and judged.loss > 0.01
    assert judged.estimate is not None and judged.estimate.n == judged.screened
    assert judged.loss == pytest.approx(judged.estimate.loss)  # the loss on the samples it was stopped on
    # a resumed study re-judges the stored metric against the search part's FP32 metric: the same loss
    assert scorer.config.loss(scorer.metric(SEARCH), judged.metric) == pytest.approx(judged.loss)


def test_the_screen_draws_its_samples_at_random_not_from_the_start_of_the_data():
    # int8 fails only on the last quarter of the data (data sorted by class, say): a screen taken from the
    # start would see no failure and let the plan through to a full evaluation
    scorer, seen = scorer_for(np.arange(1500, 2000))
    judged = scorer.screen(Flipper(wrong=True))
    assert judged.screened is not None and max(seen) > 1500


def test_a_plan_within_budget_is_scored_on_every_search_sample_once_as_judge_would():
    scorer, seen = scorer_for(np.arange(0, 2000, 400))  # 5 failures: 0.25%
    judged = scorer.screen(Flipper(wrong=True))
    assert judged.screened is None
    assert sorted(seen) == scorer.parts[SEARCH].tolist()  # each sample once: screening cost nothing extra
    assert judged == scorer.judge(Flipper(wrong=True))


def test_a_plan_at_the_budget_is_almost_never_stopped_by_a_screen():
    # true loss exactly 1% (the budget): stopping it would throw away a plan that may be fine
    stopped = 0
    for seed in range(200):
        flipped = np.random.default_rng(seed).choice(2000, 20, replace=False)
        scorer, _ = scorer_for(flipped, seed=seed)
        stopped += scorer.screen(Flipper(wrong=True)).screened is not None
    assert stopped <= 6  # at most 1% per screen at SCREEN_CONFIDENCE 0.99; 4 in 1000 seeds measured


def test_an_eval_fn_is_not_screened_it_scores_every_sample_anyway():
    calls = []

    def eval_fn(model):
        calls.append(1)
        return np.zeros(2000) if getattr(model, "wrong", False) else np.ones(2000)

    scorer = Scorer(FunctionEvaluation(eval_fn), TuneConfig(confirm_fraction=0.5))
    scorer.baseline(Flipper(wrong=False))
    judged = scorer.screen(Flipper(wrong=True))
    assert judged.screened is None and judged.loss == 1.0 and len(calls) == 2
