"""The search policy around the sampler: seeds first, then per recipe a sweep around its best seed,
dropping recipes that measured clearly worse, fine-tuning only when post-training misses, and the
final pick among the fastest feasible plans re-timed side by side."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
import torch

from autoq.config import TuneConfig
from autoq.measure.confidence import DEFAULT_CONFIDENCE
from autoq.measure.evaluation import CONFIRM, SEARCH, Judgement, Scorer
from autoq.measure.latency import measure_latency, speed_verdict, speedup_interval
from autoq.measure.lock import measurement_lock
from autoq.plan import QuantPlan, recipe_kind
from autoq.recipes.arms import Arms
from autoq.search.space import PlanProposer
from autoq.search.study import DROPPED_RECIPES_ATTR, FINISHED

SWEEP_ATTR = "sweep_enqueued"  # study user attr: the observer sweep around the best seed is queued
DIRECTION_ATTR = "direction_warning"  # study user attr: why the metric's direction looks wrong
CANDIDATES = 6  # fastest feasible plans timed side by side and confirmed in speed order before choosing
DROP_MARGIN = 0.25  # a recipe whose best seed is this much slower than another's (as accurate) is dropped
HOPELESS_RATIO = 10  # ... or whose best seed loses this many times more than another's (and than the budget)
DIRECTION_RATIO = 5  # every seed 'improving' by this many budgets: the metric's direction is probably wrong


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


def wrong_direction(seeds: list[optuna.trial.FrozenTrial], max_loss: float) -> str | None:
    """Why the metric looks lower-is-better although it was assumed higher-is-better: every evaluated
    seed 'improves' on FP32 by more than DIRECTION_RATIO times the budget (int8 rounding makes a
    model a little worse or, by luck, a little better; never far better on every plan). None if not."""
    losses = [t.user_attrs["loss"] for t in seeds if t.state == optuna.trial.TrialState.COMPLETE
              and t.user_attrs.get("loss") is not None and _quantized(t)]
    if len(losses) < 2 or max(losses) >= -DIRECTION_RATIO * max_loss:
        return None
    return (f"every int8 seed 'improves' the metric by at least {-max(losses):.4f} ({DIRECTION_RATIO}x the budget "
            f"or more): if lower is better (a loss, an error rate), pass higher_is_better=False, else "
            f"higher_is_better=True to silence this.")


def _quantized(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a measured trial's plan is an int8 one (not a float candidate)."""
    return recipe_kind(QuantPlan.from_dict(trial.user_attrs["plan"]).recipe).precision == "int8"


def best_seeds(seeds: list[optuna.trial.FrozenTrial], max_loss: float) -> dict[str, optuna.trial.FrozenTrial]:
    """Per recipe, its fastest seed trial within the budget, else its seed with the lowest accuracy loss
    (fastest on ties)."""
    def rank(attrs: dict) -> tuple:
        within = attrs["loss"] <= max_loss
        return (not within, -attrs["speedup"]) if within else (True, attrs["loss"], -attrs["speedup"])

    best: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in seeds:
        if trial.state != optuna.trial.TrialState.COMPLETE or "loss" not in trial.user_attrs:
            continue
        recipe = QuantPlan.from_dict(trial.user_attrs["plan"]).recipe
        if recipe not in best or rank(trial.user_attrs) < rank(best[recipe].user_attrs):
            best[recipe] = trial
    return best


def after_seeds(study: optuna.Study, n_seeds: int, proposer: PlanProposer, config: TuneConfig,
                report: Callable[[str], None]) -> None:
    """Once every seed trial has finished (once per study): warn if the metric's direction looks wrong,
    drop the recipes that measured clearly worse, queue the fine-tuning recipes' seeds if no all-int8
    post-training seed met the budget, then queue each remaining recipe's sweep around its best seed.
    The float candidates ('fp32', 'bf16') are references here: they drop no int8 recipe (an int8 plan's
    sweeps may still beat them) and have nothing to sweep."""
    max_loss = config.max_loss
    if study.user_attrs.get(SWEEP_ATTR):
        return
    seeds = study.get_trials(deepcopy=False)[:n_seeds]
    if any(trial.state not in FINISHED for trial in seeds):
        return
    study.set_user_attr(SWEEP_ATTR, True)
    if config.higher_is_better is None and (reason := wrong_direction(seeds, max_loss)):
        study.set_user_attr(DIRECTION_ATTR, reason)  # the tuner warns once the trials end (they run muted)
        report(reason)
    best = {recipe: trial for recipe, trial in best_seeds(seeds, max_loss).items() if _quantized(trial)}
    dropped = dominated_recipes({recipe: trial.user_attrs for recipe, trial in best.items()}, max_loss)
    fine_tuning = proposer.recipes(fine_tuning=True)
    if fine_tuning:  # the recovery arms: only if no all-int8 post-training seed meets the budget
        feasible = [t.number for t in seeds if t.state == optuna.trial.TrialState.COMPLETE
                    and t.user_attrs.get("loss", math.inf) <= max_loss and _quantized(t)
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


def finalists(rows: list[dict], count: int = CANDIDATES) -> list[tuple[dict, QuantPlan]]:
    """The `count` fastest feasible plans (distinct), fastest first, with their trial rows."""
    chosen: dict[str, tuple[dict, QuantPlan]] = {}
    for row in sorted((r for r in rows if r["feasible"] and r["state"] == "COMPLETE"), key=lambda r: -r["speedup"]):
        plan = QuantPlan.from_dict(row["plan"])
        chosen.setdefault(plan.key(), (row, plan))
        if len(chosen) == count:
            break
    return list(chosen.values())


@dataclass
class Pick:
    """The plan autoq returns, its model, and the evidence.

    judgement: its metric and loss on the confirmation part (the search part when there is none).
    confirmed: whether that judgement is within the budget (at the configured confidence).
    tried: every finalist confirmed, fastest first: plan key, loss, upper bound, within budget.
    """

    plan: QuantPlan
    model: torch.nn.Module
    judgement: Judgement
    confirmed: bool
    part: str
    tried: list[dict] = field(default_factory=list)


def speed_order(models: dict[str, torch.nn.Module], losses: dict[str, float], arms: Arms,
                config: TuneConfig) -> list[str]:
    """`models` timed side by side, fastest first; neighbours whose speed interval includes 1 (a tie)
    are ordered by their search loss."""
    if len(models) == 1:
        return list(models)
    with measurement_lock(config.measure_lock):
        timing = measure_latency(models, arms.example_inputs, threads=config.threads,
                                 target_seconds=2 * config.latency_seconds)
    order = sorted(models, key=lambda key: timing[key].median_ms)
    for i in range(len(order) - 1):
        faster, slower = order[i], order[i + 1]
        tied = speed_verdict(*speedup_interval(timing[slower], timing[faster], config.confidence or DEFAULT_CONFIDENCE)[1:]) == "tie"
        if tied and losses[slower] < losses[faster]:
            order[i], order[i + 1] = slower, faster
    return order


def confirmed_pick(arms: Arms, rows: list[dict], config: TuneConfig, scorer: Scorer,
                   count: int = CANDIDATES) -> Pick | None:
    """The fastest finalist that meets the budget on the samples the search never saw.

    The `count` fastest feasible plans (search part) are timed side by side, then confirmed in
    speed order on the confirmation part; the first within budget (its upper confidence bound, when
    scores are per sample) is the pick. None feasible or none confirmed: the finalist (or, without
    finalists, the lowest-loss plan) with the lowest confirmed bound, `confirmed` False. None when no
    trial was evaluated.
    """
    part = CONFIRM if scorer.size(CONFIRM) else SEARCH
    candidates = finalists(rows, count)
    if not candidates:
        evaluated = [r for r in rows if r["state"] == "COMPLETE" and r["loss"] is not None]
        if not evaluated:
            return None
        lowest = min(evaluated, key=lambda r: (r["loss"], -r["speedup"]))
        candidates = [(lowest, QuantPlan.from_dict(lowest["plan"]))]
    plans = {plan.key(): (row, plan) for row, plan in candidates}
    models = {key: arms.build(plan) for key, (_, plan) in plans.items()}
    tried, best = [], None
    for key in speed_order(models, {key: row["loss"] for key, (row, _) in plans.items()}, arms, config):
        judgement = scorer.judge(models[key], part)
        bound = judgement.bound  # within budget: this <= max_loss (and within it on the search part)
        within = bound <= config.max_loss and plans[key][0]["feasible"]
        tried.append({"plan_key": key, "trial": plans[key][0]["number"], "loss": judgement.loss,
                      "upper": judgement.estimate and judgement.estimate.upper, "within": within})
        if within:
            return Pick(plans[key][1], models[key], judgement, True, part, tried)
        if best is None or bound < best[0]:
            best = (bound, key, judgement)
    _, key, judgement = best
    return Pick(plans[key][1], models[key], judgement, False, part, tried)
