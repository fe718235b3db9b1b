"""`autoq.tune`: the whole pipeline, from the FP32 model to a measured, in-budget int8 model."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import optuna
import torch

from autoq.capture import as_input_tuple, calibration_batches, check_model
from autoq.config import TuneConfig
from autoq.dispatch.apply import apply_dispatch, carrying_plan, record_layer_shapes, set_model_dispatch
from autoq.dispatch.measured import LayerTimer
from autoq.dispatch.table import DispatchTable, current_cpu, shipped_table
from autoq.measure.confidence import DEFAULT_CONFIDENCE
from autoq.measure.evaluation import (
    CONFIRM, PER_SAMPLE_METRICS, SEARCH, DataEvaluation, Evaluation, FunctionEvaluation, Scorer,
)
from autoq.measure.fp32 import FloatBuilds, against_fp32, fp32_references
from autoq.plan import ENGINES, INDUCTOR, RECIPE_KINDS, QuantPlan, recipe_kind
from autoq.progress import Reporter
from autoq.recipes.arms import Arms, applicable_arms, builder, calibrated
from autoq.recipes.qat import Training
from autoq.result import TuneResult
from autoq.search.ctrl_c import CTRL_C
from autoq.search.objective import CandidateFailed, Objective
from autoq.search.budget import (
    CALIBRATION_OVERHEAD, CALIBRATION_SHARE, FINAL_OVERHEAD, MIN_CALIBRATION, RANKING_OVERHEAD, RANKING_SHARE, Costs,
    TimeBudget, slack,
)
from autoq.search.policy import CANDIDATES, DIRECTION_ATTR, Pick, after_seeds, confirmed_pick, finalists
from autoq.search.rankings import layer_scores, rank_layers
from autoq.search.space import PlanProposer
from autoq.search.study import (
    DROPPED_ATTR, RESULT_ATTR, RUN_ATTR, claim_for_model, counted_trials, fingerprint, layer_timings, open_study,
    optuna_quiet, pareto_front, reclaim_interrupted, redacted, register_worker, storage_url, trial_rows,
)


def tune(
    model: torch.nn.Module,
    example_inputs: Any,
    calib_data: Iterable,
    eval_fn: Callable[[torch.nn.Module], Any] | None = None,
    *,
    eval_data: Iterable | None = None,
    metric: str | Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    train_data: Iterable | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    train_fn: Callable[[torch.nn.Module, int, float], None] | None = None,
    config: TuneConfig | None = None,
    **settings: Any,
) -> TuneResult:
    """Search int8 quantization plans for `model`; return the fastest one within the accuracy budget.

    example_inputs: inputs for capture and latency measurement (a tensor or a tuple).
    calib_data: iterable of batches: inputs, or (inputs, target) pairs.
    eval_fn: eval_fn(model) -> the metric (higher is better unless higher_is_better=False): a float, or
      better a 1-D array/tensor of per-sample scores whose mean is the metric. Per-sample scores let
      autoq hold back confirmation samples the search never sees (confirm_fraction) and bound the loss
      (confidence): the returned plan then meets the budget on them at that confidence.
    eval_data + metric: instead of eval_fn, batches of (inputs, target) and 'top1', 'mse' or
      metric(outputs, targets) -> per-sample scores; autoq runs the model on each part's samples only.
    train_data + loss_fn(output, target), or train_fn(model, epochs, lr): enable the QAT recovery
      arm (a short quantization-aware fine-tune, tried when post-training plans miss the budget);
      train_data yields (inputs, target) batches.
    settings: the fields of `TuneConfig` (max_loss=0.01, loss_type='relative', n_trials, timeout,
      storage, seed, ...), or pass a whole `config=TuneConfig(...)`.
    The user's model is never modified. Speedups are measured on this machine, FP32 eager vs int8.
    """
    if config is not None and settings:
        raise TypeError(f"Pass either config=TuneConfig(...) or keyword settings, not both (got {sorted(settings)}).")
    config = config if config is not None else TuneConfig.from_dict(settings, "autoq.tune's settings")
    check_model(model)
    example_inputs = as_input_tuple(example_inputs)
    evaluation, config = _evaluation(eval_fn, eval_data, metric, config)
    batches = calibration_batches(calib_data, len(example_inputs), config.calib_max_samples)
    training = None
    if train_data is not None or loss_fn is not None or train_fn is not None:
        training = Training(train_data, loss_fn, train_fn, max_seconds=config.qat_seconds)
    with optuna_quiet():  # autoq prints its own line per trial
        return _Run(model, example_inputs, batches, evaluation, config, training).execute()


def _evaluation(eval_fn, eval_data, metric, config: TuneConfig) -> tuple[Evaluation, TuneConfig]:
    """The evaluation the user asked for, and the config with the direction of a named metric."""
    if (eval_fn is None) == (eval_data is None):
        raise TypeError("Pass either eval_fn(model) -> metric, or eval_data (batches of (inputs, target)) and "
                        "metric ('top1', 'mse' or a callable), not both or neither.")
    if eval_fn is not None:
        if metric is not None:
            raise TypeError("`metric` goes with eval_data; eval_fn computes its metric itself.")
        return FunctionEvaluation(eval_fn), config
    if metric is None:
        raise TypeError(f"eval_data needs a metric: one of {sorted(PER_SAMPLE_METRICS)} or metric(outputs, targets).")
    if isinstance(metric, str) and metric in PER_SAMPLE_METRICS:
        higher = PER_SAMPLE_METRICS[metric][1]
        if config.higher_is_better not in (None, higher):
            raise ValueError(f"higher_is_better={config.higher_is_better} contradicts metric {metric!r} "
                             f"({'higher' if higher else 'lower'} is better): drop the setting.")
        config = dataclasses.replace(config, higher_is_better=higher)
    return DataEvaluation(eval_data, metric), config


def int8_alternative(pick: Pick, rows: list[dict]) -> list[str]:
    """For a float pick: that int8 did not pay, and how to get the best int8 plan anyway."""
    precision = recipe_kind(pick.plan.recipe).precision
    if precision == "int8":
        return []
    int8 = [row for row in rows if row["feasible"] and row["state"] == "COMPLETE"
            and recipe_kind(QuantPlan.from_dict(row["plan"]).recipe).precision == "int8"]
    if not int8:
        return [f"returning the {precision} model: no int8 plan was both within the budget and faster (int8 plans "
                f"measurably slower than it were not evaluated: prune_slower); space.precisions=['int8'] searches "
                f"int8 only"]
    best = max(int8, key=lambda row: row["speedup"])
    return [f"returning the {precision} model: it measured faster than every in-budget int8 plan; the fastest "
            f"of those, trial {best['number']} ({best['speedup']:.2f}x vs FP32 eager in its trial), is rebuilt by "
            f"autoq.quantize(model, result.trials[{rows.index(best)}]['plan'], ...), and "
            f"space.precisions=['int8'] searches int8 only"]


def isa_note(arms: Arms) -> str:
    """This CPU's int8 path and what the search does about it."""
    note = f"{arms.int8.describe()} ({current_cpu().model})"
    saturating = [kernels for kernels in (*ENGINES, INDUCTOR) if not arms.full_range_safe(kernels)]
    if not saturating:
        return note
    return (f"{note}; for this model's layers that concerns {', '.join(saturating)}: plans on them get 7-bit "
            f"activations (reduce_range) or 7-bit weights (8-bit on layers whose kernel sums exactly), and "
            f"ReLU6 folding only with 7-bit weights")


def quantize(model: torch.nn.Module, plan: dict | QuantPlan, example_inputs: Any, calib_data: Iterable,
             non_traceable_modules: Iterable[str] = (), dispatch: DispatchTable | str | None = None,
             training: Training | None = None) -> torch.nn.Module:
    """Build the int8 model of a plan (e.g. `TuneResult.plan`, or `QuantPlan()`) without searching.

    dispatch: per-layer kernel libraries from a DispatchTable (or its JSON path, or 'shipped' for
      autoq's table for this CPU: exact entries, else its learned rule), or 'measured' to time
      every layer inside the model now; None keeps the plan's own kernel choices (PT2E plans: Inductor
      picks kernels, dispatch must be None).
    training: a `autoq.recipes.qat.Training` (train_data + loss_fn, or train_fn), for 'qat' and 'pt2e-qat' plans.
    The plan actually built (with per-layer kernels) is in `model.meta['autoq']['plan']`;
    `autoq.save(model, path)` keeps it, and `autoq.apply_dispatch` can re-dispatch it later.
    """
    check_model(model)
    example_inputs = as_input_tuple(example_inputs)
    plan = copy.deepcopy(plan) if isinstance(plan, QuantPlan) else QuantPlan.from_dict(plan)
    if recipe_kind(plan.recipe).inductor and dispatch is not None:
        raise ValueError(f"dispatch does not apply to recipe {plan.recipe!r}: Inductor picks its kernels itself.")
    kind = recipe_kind(plan.recipe)
    batches = calibration_batches(calib_data, len(example_inputs), plan.calib_samples) \
        if kind.calibrated or kind.fine_tunes else []
    quantized = carrying_plan(builder(plan.recipe, model, example_inputs, batches, list(non_traceable_modules),
                                      training=training).build(plan), plan)
    record_layer_shapes(quantized, example_inputs, list(non_traceable_modules))
    if dispatch == "measured":
        set_model_dispatch(quantized, LayerTimer().choose(quantized, example_inputs), "measured")
    elif dispatch is not None:
        apply_dispatch(quantized, dispatch)
    return quantized


class _Run:
    """One call of `tune`: set-up (baseline, arms, study, layer rankings, seeds), trials, final choice."""

    def __init__(self, model, example_inputs, batches, evaluation: Evaluation, config: TuneConfig,
                 training: Training | None) -> None:
        self.example_inputs, self.batches, self.config = example_inputs, batches, config
        self.scorer = Scorer(evaluation, config)
        self.training = training
        self.reporter = Reporter.shared(config.verbose)
        self.budget = TimeBudget(config.timeout)
        self._per_sample: float | None = None  # seconds of an FP32 forward per sample (`_forward_seconds`)
        try:
            self.fp32 = copy.deepcopy(model).eval()
        except Exception as error:
            raise TypeError(f"autoq works on a copy of the model, but copy.deepcopy(model) failed: {error}") from error

    def execute(self) -> TuneResult:
        """Setup, trials and the final choice, each timed; with a timeout, together within it (+ slack)."""
        with self.budget.phase("setup"):
            baseline, arms, study, proposer, seeds, scores, timer = self._setup()
        with self.budget.phase("trials"):
            objective = Objective(arms, proposer, self.fp32, self.scorer, baseline, self.config, timer,
                                  self.reporter, self.budget)
            if self.training is not None:
                self.training.time_left = objective.fine_tune_seconds
            self._optimize(study, objective, lambda: after_seeds(study, len(seeds), proposer, self.config,
                                                                 self.reporter.line))
        with self.budget.phase("final"):
            return self._result(study, arms, baseline, scores, objective, self._dispatch_table(timer))

    def _setup(self) -> tuple:
        """Baseline, arms (capture, calibration), study, layer rankings, seeds, FP32 references; the
        costs later steps are planned with."""
        config, line, step = self.config, self.reporter.line, self.budget.step
        with step("baseline"):
            baseline = self._baseline()
        evaluated = self.budget.steps["baseline"]
        samples = sum(int(batch[0].shape[0]) for batch in self.batches)
        line(f"FP32 baseline metric {baseline:.4f}; {samples} calibration samples")
        self._announce_guarantee()
        cut = self._cut_calibration()
        with step("capture and calibration"):
            arms = self._arms()
        study, created = self._study(baseline, cut)
        claim_for_model(study, fingerprint(self.fp32, self.example_inputs, baseline))
        line(f"study '{study.study_name}' in {redacted(storage_url(config.storage))}")
        study.set_user_attr(RESULT_ATTR, None)  # running again: the last final choice is stale until the end
        stored_config = {**dataclasses.asdict(config), "storage": config.storage and redacted(config.storage)}
        study.set_user_attr(RUN_ATTR, {"baseline": baseline, "config": stored_config,
                                       "layers": {recipe: arms.layers(recipe) for recipe in arms.recipes}})
        self._join(study)
        with step("layer ranking"):
            scores = layer_scores(study, arms, self.fp32, self.batches, self._ranking_samples(arms), line)
        proposer = PlanProposer(config.space, arms, {recipe: rank_layers(s) for recipe, s in scores.items()},
                                compile_float=config.compile_fp32)
        seeds = proposer.seed_params()
        if created or not study.get_trials(deepcopy=False):
            for params in seeds:
                study.enqueue_trial(params, skip_if_exists=True)
        if kept := counted_trials(study):
            line(f"resuming study '{study.study_name}': {kept} finished trials kept")
        timer = LayerTimer(layer_timings(study), seconds=config.latency_seconds, threads=config.threads)
        with step("best FP32"):
            fp32_arm = arms.builders.get("fp32")  # the FP32 candidates are the references: compiled once
            builds = fp32_arm.builds if fp32_arm is not None else FloatBuilds(self.fp32, self.example_inputs)
            self.references = fp32_references(builds, compile_fp32=config.compile_fp32)
        self.budget.costs = Costs(evaluation=evaluated * self.scorer.cost_share(SEARCH),
                                  confirmation=evaluated * self.scorer.cost_share(CONFIRM),
                                  compile=self.budget.steps["best FP32"] if config.compile_fp32 else 0.0,
                                  latency=config.latency_seconds,
                                  calibration=self.budget.steps["capture and calibration"] / max(len(arms.recipes), 1))
        steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.budget.steps.items())
        limit = f" of the {config.timeout:.0f} s timeout" if config.timeout is not None else ""
        line(f"setup took {self.budget.elapsed():.0f} s{limit} ({steps})")
        return baseline, arms, study, proposer, seeds, scores, timer

    def _forward_seconds(self) -> float:
        """Seconds of one FP32 forward per sample, timed once on the first calibration batch."""
        if self._per_sample is None:
            batch = self.batches[0]
            started = time.monotonic()
            with torch.no_grad():
                self.fp32(*batch)
            self._per_sample = (time.monotonic() - started) / max(int(batch[0].shape[0]), 1)
        return self._per_sample

    def _cut_calibration(self) -> int | None:
        """With a timeout, keep the calibration samples that CALIBRATION_SHARE of it can calibrate every
        recipe with (at least MIN_CALIBRATION); returns how many are kept when that cuts them, else None."""
        allowance = self.budget.share(CALIBRATION_SHARE)
        recipes = calibrated(self.config.space.recipes)
        if allowance == math.inf or not self.batches or not recipes:
            return None
        per_sample = 2 * recipes * CALIBRATION_OVERHEAD * self._forward_seconds()
        limit = max(int(allowance / max(per_sample, 1e-9)), MIN_CALIBRATION)
        sizes = [int(batch[0].shape[0]) for batch in self.batches]
        if sum(sizes) <= limit:
            return None
        kept = max(1, sum(1 for end in itertools.accumulate(sizes) if end <= limit))
        self.batches = self.batches[:kept]
        samples = sum(sizes[:kept])
        self.reporter.line(f"calibrating on {samples} of {sum(sizes)} samples: the timeout leaves {allowance:.0f} s "
                           f"for it (a study of its own: the calib_samples choices differ)")
        return samples

    def _ranking_samples(self, arms: Arms) -> int:
        """Calibration samples to rank layers on: sensitivity_samples, fewer when a timeout leaves
        RANKING_SHARE of it too little time for them (one FP32 forward per layer and sample)."""
        wanted, allowance = self.config.sensitivity_samples, self.budget.share(RANKING_SHARE)
        if allowance == math.inf or not self.batches:
            return wanted
        layers = sum(len(arms.layers(recipe)) for recipe in arms.recipes if not RECIPE_KINDS[recipe].fine_tunes)
        affordable = int(allowance / max(RANKING_OVERHEAD * layers * self._forward_seconds(), 1e-9))
        samples = min(max(affordable, 1), wanted)
        if samples < wanted:
            self.reporter.line(f"ranking layers on {samples} samples instead of {wanted}: the timeout leaves "
                               f"{allowance:.0f} s for it")
        return samples

    def _announce_guarantee(self) -> None:
        """Say up front what the evaluation data can certify (and what more would)."""
        scorer, line = self.scorer, self.reporter.line
        if not scorer.per_sample:
            line("eval_fn returns one number: no held-back confirmation and no confidence bound; return per-sample "
                 "scores (a 1-D array whose mean is the metric) or pass eval_data and metric for both")
            return
        line(f"evaluation: {scorer.size(SEARCH)} search samples, {scorer.size(CONFIRM)} held back to confirm the pick")
        if reason := scorer.certifiable():
            line(reason)
            warnings.warn(f"autoq: {reason}", stacklevel=4)

    def _arms(self) -> Arms:
        """The recipes that apply, captured and calibrated once."""
        config, line = self.config, self.reporter.line
        with self.reporter.bar("calibrate", 2 * len(self.batches) * calibrated(config.space.recipes)) as advance:
            arms = applicable_arms(self.fp32, self.example_inputs, self.batches, config.space.recipes,
                                   config.non_traceable_modules, progress=advance, training=self.training,
                                   precisions=config.space.precisions)
        line(isa_note(arms))
        for recipe in arms.recipes:
            line(f"recipe {recipe}: {len(arms.layers(recipe))} quantizable layers")
        for recipe, reason in arms.skipped.items():
            line(f"recipe {recipe} skipped: {reason}")
        return arms

    def _join(self, study: optuna.Study) -> None:
        """Register this worker; warn about unlocked neighbours; re-queue trials cut short."""
        neighbours = register_worker(study, self.config.measure_lock)
        if neighbours and not self.config.measure_lock:
            warnings.warn(f"autoq: other workers of study '{study.study_name}' run on this machine ({neighbours}); "
                          f"their timings disturb each other. Run every worker with measure_lock=true "
                          f"(`autoq tune --measure-lock`) so they take turns to measure.", stacklevel=4)
        if reclaimed := reclaim_interrupted(study):
            self.reporter.line(f"trials {reclaimed} were cut short (worker died or stopped): queued again")

    def _optimize(self, study: optuna.Study, objective: Objective, after_trial_policy: Callable[[], None]) -> None:
        """Run trials until the study counts n_trials (over all workers) or this call's timeout ends."""
        config = self.config
        remaining = None if config.n_trials is None else max(config.n_trials - counted_trials(study), 0)
        if remaining == 0:
            return
        with self.reporter.bar("trials", remaining) as advance:
            def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                if not trial.user_attrs.get(DROPPED_ATTR):
                    advance(1)
                after_trial_policy()
                if config.n_trials is not None and counted_trials(study, running=True) >= config.n_trials:
                    study.stop()  # other workers' running trials complete the count
                if not self.budget.fits(0.0, objective.reserve() if objective.outcomes else 0.0):
                    study.stop()  # the time left is the final phase's (or none is left, after one trial at least)

            with warnings.catch_warnings(), CTRL_C.deferred():  # Ctrl-C never cuts a storage write in half
                warnings.simplefilter("ignore")
                # neither n_trials nor timeout here: trials of dropped recipes do not count and after_trial
                # stops at the budget; Objective starts no trial that would overrun the timeout, but runs
                # one at least when no plan was measured yet
                study.optimize(objective, catch=(CandidateFailed,), callbacks=[after_trial])

    @staticmethod
    def _dispatch_table(timer: LayerTimer) -> DispatchTable:
        """This CPU's shipped table (if autoq has one) plus this study's in-model layer timings."""
        table = shipped_table() or DispatchTable.for_this_machine()
        table.add(timer.entries())
        return table

    def _baseline(self) -> float:
        """The FP32 metric on the search part (every sample scored once, then split)."""
        try:
            baseline = self.scorer.baseline(copy.deepcopy(self.fp32))
        except (TypeError, ValueError) as error:
            raise type(error)(f"on the FP32 model: {error}") from error
        except Exception as error:
            raise RuntimeError(f"evaluating the FP32 model failed, so there is no baseline: "
                               f"{type(error).__name__}: {error}") from error
        if self.config.loss_type == "relative" and baseline == 0:
            raise ValueError("The FP32 metric is 0, so a relative loss is undefined: use loss_type='absolute'.")
        return baseline

    def _study(self, baseline: float, cut: int | None) -> tuple[optuna.Study, bool]:
        """The study of this model, evaluation and search space (and calibration, when a timeout cut it)."""
        config = self.config
        name = config.study_name or "autoq-" + fingerprint(self.fp32, self.example_inputs, baseline, config.space, cut)
        n_startup = max(3, min(10, (config.n_trials or 40) // 4))
        sampler = optuna.samplers.TPESampler(seed=config.seed, multivariate=True, n_startup_trials=n_startup)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return open_study(storage_url(config.storage), name, sampler, must_exist=config.resume)

    def _result(self, study, arms: Arms, baseline, scores, objective: Objective, table: DispatchTable) -> TuneResult:
        """The fastest finalist confirmed within budget on held-back samples (`confirmed_pick`; as many
        finalists as the time left allows), timed against FP32; every stored trial judged by this run's
        settings."""
        config, budget = self.config, self.budget
        rows = trial_rows(study, lambda metric: config.loss(baseline, metric), config.max_loss)
        recipes = [plan.recipe for _, plan in finalists(rows, CANDIDATES)]
        count = len(recipes)
        while count > 1 and not budget.fits(objective.final_seconds(recipes[:count])):
            count -= 1
        pick = confirmed_pick(arms, rows, config, self.scorer, max(count, 1))
        if pick is None:
            raise RuntimeError(
                f"No trial of study '{study.study_name}' produced an evaluated model; see the errors in "
                f"its trials: {[r['error'] for r in rows if r['error']][:3]}"
            )
        record_layer_shapes(pick.model, self.example_inputs, config.non_traceable_modules)
        seconds = min(4 * config.latency_seconds, max(budget.remaining() - FINAL_OVERHEAD, config.latency_seconds))
        precision = recipe_kind(pick.plan.recipe).precision
        timed = against_fp32(pick.model, self.references, self.example_inputs, threads=config.threads,
                             seconds=seconds, lock=config.measure_lock, confidence=config.confidence or DEFAULT_CONFIDENCE,
                             precision=precision)
        verdict = self._verdict(pick, rows)
        notes = [isa_note(arms), *(f"recipe {recipe} skipped: {why}" for recipe, why in arms.skipped.items()),
                 *timed.notes, *int8_alternative(pick, rows)]
        if config.timeout is not None and budget.elapsed() > config.timeout + slack(config.timeout):
            overrun = (f"timeout={config.timeout:.0f} s was too short for this model: the call took "
                       f"{budget.elapsed():.0f} s (setup {budget.spent['setup']:.0f} s and one trial at least)")
            warnings.warn(f"autoq: {overrun}", stacklevel=3)
            notes.append(overrun)
        if (direction := study.user_attrs.get(DIRECTION_ATTR)) and config.higher_is_better is None:
            warnings.warn(f"autoq: {direction}", stacklevel=3)
            notes.append(direction)
        if not pick.confirmed:
            warnings.warn(f"autoq: no plan met the accuracy budget (max_loss={config.max_loss}, {config.loss_type}): "
                          f"{verdict['guarantee']}; returning the closest (loss {pick.judgement.loss:+.4f}). See "
                          f"result.verdict and result.pareto_front.", stacklevel=3)
        if table.entries:
            table.refit()
        result = TuneResult(
            model=pick.model, accuracy=pick.judgement.metric, baseline_accuracy=self.scorer.metric(pick.part),
            loss=pick.judgement.loss, speedup=timed.speedup, latency_ms=timed.latency_ms, plan=pick.plan.to_dict(),
            trials=rows, pareto_front=pareto_front(rows), feasible=pick.confirmed,
            layers=pick.plan.layer_table(arms.layers(pick.plan.recipe), scores[pick.plan.recipe]),
            study_name=study.study_name, storage=redacted(storage_url(config.storage)), notes=notes,
            dispatch_table=table, verdict=verdict, speedup_interval=timed.speedup_interval,
            vs_best_fp32=timed.vs_best, timing=budget.as_dict(),
        )
        study.set_user_attr(RESULT_ATTR, result.stored())
        self.reporter.line("\n" + result.summary())
        return result

    def _verdict(self, pick: Pick, rows: list[dict]) -> dict:
        """The evidence for the pick and what it promises, in words (TuneResult.verdict)."""
        config, estimate = self.config, pick.judgement.estimate
        part = pick.part if self.scorer.per_sample else "all"
        search_loss = next(r["loss"] for r in rows if r["plan"] and QuantPlan.from_dict(r["plan"]).key()
                           == pick.plan.key())
        if not self.scorer.per_sample:
            promise = ("none beyond the point estimate: eval_fn returns one number (return per-sample scores, or "
                       "pass eval_data and metric, for held-back confirmation and a confidence bound)")
        elif estimate is None:
            promise = f"point estimate on {self.scorer.size(part)} {part} samples, no confidence bound (confidence=None)"
        else:
            where = ("held-back samples the search never saw" if part == CONFIRM else
                     "the samples the search chose on (optimistic: confirm_fraction=0)")
            verb = "is at most" if pick.confirmed else "is NOT certified at"
            promise = (f"the loss {verb} max_loss={config.max_loss} with {config.confidence:.0%} confidence "
                       f"(one-sided {estimate.method} bound {estimate.upper:+.4f}) on {estimate.n} {where}, "
                       f"assuming they are independent draws from the data the model will see")
        return {"part": part, "samples": self.scorer.size(part) or None, "loss": pick.judgement.loss,
                "upper": estimate.upper if estimate else None, "confidence": config.confidence if estimate else None,
                "method": estimate.method if estimate else None, "search_loss": search_loss,
                "tried": pick.tried, "guarantee": promise}
