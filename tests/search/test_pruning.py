"""Pruning without evaluation: a candidate that looks slower than the best feasible plan is timed
again side by side with it, and pruned only if it really is slower."""

import time

from torch import nn

from autoq.config import SearchSpace, TuneConfig
from autoq.dispatch.measured import LayerTimer
from autoq.plan import QuantPlan
from autoq.progress import Reporter
from autoq.recipes.arms import applicable_arms
from autoq.search.budget import TimeBudget
from autoq.search.objective import Objective
from autoq.search.space import PlanProposer
from nets import MLP


class Delayed(nn.Module):
    """`inner` plus a fixed wait per call: the same model, measurably slower."""

    def __init__(self, inner: nn.Module, seconds: float) -> None:
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, *inputs):
        time.sleep(self.seconds)
        return self.inner(*inputs)


def side_by_side_costs(monkeypatch) -> list[set]:
    """Replace the objective's timer by a deterministic one: 1 ms per call, plus a Delayed model's wait
    (timing itself is measure_latency's tests' business). Returns the model names of each comparison."""
    from autoq.measure.latency import LatencyStats
    import autoq.search.objective as objective_module

    comparisons = []
    def measure(models, example_inputs, **_):
        comparisons.append(set(models))
        costs = {name: 1.0 + 1e3 * getattr(model, "seconds", 0.0) for name, model in models.items()}
        return {name: LatencyStats(ms, ms, ms, 10, (ms,) * 10) for name, ms in costs.items()}
    monkeypatch.setattr(objective_module, "measure_latency", measure)
    return comparisons


def test_a_lucky_best_measurement_prunes_only_candidates_slower_side_by_side(digits, monkeypatch):
    comparisons = side_by_side_costs(monkeypatch)
    model = digits.train(MLP())
    arms = applicable_arms(model, (digits.x[:1],), [(batch,) for batch in digits.calib], ["static"])
    proposer = PlanProposer(SearchSpace(), arms, {"static": arms.layers("static")})
    objective = Objective(arms, proposer, model, digits.accuracy, digits.accuracy(model),
                          TuneConfig(latency_seconds=0.3),
                          LayerTimer(), Reporter(verbose=False), TimeBudget(None))
    best = QuantPlan(recipe="static")
    # the best plan's trial was measured at an implausible 50x: every later trial looks >5% slower
    objective._remember(best.key(), {"metric": 1.0, "loss": 0.0, "speedup": 50.0, "int8_ms": 0.01, "fp32_ms": 0.5},
                        best.to_dict())
    assert objective.best_feasible_speedup == 50.0
    candidate = arms.build(QuantPlan(recipe="static", activation_observer="minmax"))
    assert objective._slower_than_best(Delayed(candidate, 0.002))  # 3 ms against 1 ms, side by side
    built_key, best_model = objective._best_model
    assert built_key == best.key()
    # timed beside itself, the best plan's own model is not slower: the lucky 50x alone prunes nothing
    assert not objective._slower_than_best(best_model)
    assert not objective._slower_than_best(Delayed(candidate, 0.00004))  # 4% slower: within the margin
    assert comparisons == [{"best", "candidate"}] * 3
    assert objective._best_model[1] is best_model  # built once, reused
