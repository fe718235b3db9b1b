"""The search policy around the sampler: seeds first, then per recipe a sweep around its best seed,
dropping recipes that measured clearly worse, fine-tuning only when post-training misses, and the
final pick among the fastest feasible plans re-timed side by side."""

from __future__ import annotations

import math
from collections.abc import Callable

import optuna
import torch

from autoq.config import TuneConfig
from autoq.measure.latency import fastest, measure_latency, speedup
from autoq.measure.lock import measurement_lock
from autoq.plan import QuantPlan
from autoq.recipes.arms import Arms
from autoq.search.space import PlanProposer
from autoq.search.study import DROPPED_RECIPES_ATTR, FINISHED, SPEED_TIE

SWEEP_ATTR = "sweep_enqueued"  # study user attr: the observer sweep around the best seed is queued
FINALISTS = 3  # fastest feasible plans re-measured side by side before choosing
DROP_MARGIN = 0.25  # a recipe whose best seed is this much slower than another's (as accurate) is dropped
HOPELESS_RATIO = 10  # ... or whose best seed loses this many times more than another's (and than the budget)


def dominated_recipes(best: dict[str, dict], max_loss: float) -> dict[str, str]:
    """Recipes that measured clearly worse: {recipe: why}.

    best: per recipe, the outcome ('loss', 'speedup') of its best seed. A recipe is dropped when
    another one is more than DROP_MARGIN faster and no less accurate (or within the budget), or when
    it loses over HOPELESS_RATIO times what another loses (and the budget): observer sweeps and
    fallbacks move a loss by a few points, not tenfold (MobileNetV2's PT2E plans lose 85%).
    """
    dropped = {}
    for recipe, outcome in best.items():
        for other, better in best.items():
            if other == recipe:
                continue
            if (better["speedup"] > outcome["speedup"] * (1 + DROP_MARGIN)
                    and better["loss"] <= max(outcome["loss"], max_loss)):
                dropped[recipe] = (f"{other} is {better['speedup'] / outcome['speedup']:.2f}x faster "
                                   f"({better['speedup']:.2f}x vs {outcome['speedup']:.2f}x) at loss "
                                   f"{better['loss']:+.4f} (vs {outcome['loss']:+.4f})")
                break
            if outcome["loss"] > HOPELESS_RATIO * max(better["loss"], max_loss):
                dropped[recipe] = (f"its best seed loses {outcome['loss']:+.4f}, over {HOPELESS_RATIO}x what "
                                   f"{other} loses ({better['loss']:+.4f})")
                break
    return dropped


def best_seeds(seeds: list[optuna.trial.FrozenTrial]) -> dict[str, optuna.trial.FrozenTrial]:
    """Per recipe, its seed trial with the lowest accuracy loss (fastest on ties)."""
    best: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in seeds:
        if trial.state != optuna.trial.TrialState.COMPLETE or "loss" not in trial.user_attrs:
            continue
        recipe = QuantPlan.from_dict(trial.user_attrs["plan"]).recipe
        rank = (trial.user_attrs["loss"], -trial.user_attrs["speedup"])
        if recipe not in best or rank < (best[recipe].user_attrs["loss"], -best[recipe].user_attrs["speedup"]):
            best[recipe] = trial
    return best


def after_seeds(study: optuna.Study, n_seeds: int, proposer: PlanProposer, max_loss: float,
                report: Callable[[str], None]) -> None:
    """Once every seed trial has finished (once per study): drop the recipes that measured clearly
    worse, queue the fine-tuning recipes' seeds if no all-int8 post-training seed met the budget,
    then queue each remaining recipe's sweep around its best seed."""
    if study.user_attrs.get(SWEEP_ATTR):
        return
    seeds = study.get_trials(deepcopy=False)[:n_seeds]
    if any(trial.state not in FINISHED for trial in seeds):
        return
    study.set_user_attr(SWEEP_ATTR, True)
    best = best_seeds(seeds)
    dropped = dominated_recipes({recipe: trial.user_attrs for recipe, trial in best.items()}, max_loss)
    fine_tuning = proposer.recipes(fine_tuning=True)
    if fine_tuning:  # the recovery arms: only if no all-int8 post-training seed meets the budget
        feasible = [t.number for t in seeds if t.state == optuna.trial.TrialState.COMPLETE
                    and t.user_attrs.get("loss", math.inf) <= max_loss
                    and not QuantPlan.from_dict(t.user_attrs["plan"]).fp32_layers]
        if feasible:
            dropped.update({recipe: f"post-training quantization meets the budget with every layer int8 "
                                    f"(trial {feasible[0]}): QAT is only tried when it does not"
                            for recipe in fine_tuning})
        else:
            for params in proposer.qat_seeds():
                study.enqueue_trial(params, skip_if_exists=True)
    if dropped:
        study.set_user_attr(DROPPED_RECIPES_ATTR, dropped)
        for recipe, reason in dropped.items():
            report(f"recipe {recipe} dropped: {reason}")
    for recipe, trial in best.items():
        if recipe not in dropped:
            for params in proposer.sweep_params(recipe, dict(trial.params)):
                study.enqueue_trial(params, skip_if_exists=True)


def finalists(rows: list[dict]) -> list[tuple[dict, QuantPlan]]:
    """The FINALISTS fastest feasible plans (distinct), fastest first, with their trial rows."""
    chosen: dict[str, tuple[dict, QuantPlan]] = {}
    for row in sorted((r for r in rows if r["feasible"] and r["state"] == "COMPLETE"), key=lambda r: -r["speedup"]):
        plan = QuantPlan.from_dict(row["plan"])
        chosen.setdefault(plan.key(), (row, plan))
        if len(chosen) == FINALISTS:
            break
    return list(chosen.values())


def fastest_finalist(arms: Arms, rows: list[dict], config: TuneConfig) -> tuple[QuantPlan, torch.nn.Module]:
    """Re-measure the fastest feasible plans side by side and keep the truly fastest.

    Each trial is timed on its own, so the top of the ranking is partly measurement luck; the
    finalists are timed together, interleaved, and within SPEED_TIE the lowest loss wins.
    """
    candidates = {plan.key(): (row, plan) for row, plan in finalists(rows)}
    models = {key: arms.build(plan) for key, (_, plan) in candidates.items()}
    with measurement_lock(config.measure_lock):
        timing = measure_latency(models, arms.example_inputs, threads=config.threads,
                                 target_seconds=2 * config.latency_seconds)
    winner = timing[fastest(timing)]
    tied = [key for key in models if speedup(timing[key], winner) <= 1 + SPEED_TIE]
    key = min(tied, key=lambda k: candidates[k][0]["loss"])
    return candidates[key][1], models[key]
