"""`autoq.tune`: the whole pipeline, from the FP32 model to a measured, in-budget int8 model."""

from __future__ import annotations

import copy
import dataclasses
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
from autoq.measure.fp32 import against_fp32
from autoq.plan import ENGINES, INDUCTOR, QuantPlan, recipe_kind
from autoq.progress import Reporter
from autoq.recipes.arms import Arms, applicable_arms, builder, calibrated
from autoq.recipes.qat import Training
from autoq.result import TuneResult
from autoq.search.ctrl_c import CTRL_C
from autoq.search.objective import CandidateFailed, Objective
from autoq.search.policy import after_seeds, fastest_finalist
from autoq.search.rankings import layer_scores, rank_layers
from autoq.search.space import PlanProposer
from autoq.search.study import (
    DROPPED_ATTR, RESULT_ATTR, RUN_ATTR, best_row, counted_trials, fingerprint, layer_timings, open_study,
    optuna_quiet, pareto_front, reclaim_interrupted, redacted, register_worker, storage_url, trial_rows,
)


def tune(
    model: torch.nn.Module,
    example_inputs: Any,
    calib_data: Iterable,
    eval_fn: Callable[[torch.nn.Module], float],
    *,
    train_data: Iterable | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    train_fn: Callable[[torch.nn.Module, int, float], None] | None = None,
    config: TuneConfig | None = None,
    **settings: Any,
) -> TuneResult:
    """Search int8 quantization plans for `model`; return the fastest one within the accuracy budget.

    example_inputs: inputs for capture and latency measurement (a tensor or a tuple).
    calib_data: iterable of batches: inputs, or (inputs, target) pairs.
    eval_fn: eval_fn(model) -> metric (float; higher is better unless higher_is_better=False).
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
    if not callable(eval_fn):
        raise TypeError(f"`eval_fn` must be callable as eval_fn(model) -> float. Got {type(eval_fn).__name__}.")
    batches = calibration_batches(calib_data, len(example_inputs), config.calib_max_samples)
    training = None
    if train_data is not None or loss_fn is not None or train_fn is not None:
        training = Training(train_data, loss_fn, train_fn, max_seconds=config.qat_seconds)
    with optuna_quiet():  # autoq prints its own line per trial
        return _Run(model, example_inputs, batches, eval_fn, config, training).execute()


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
    batches = [] if plan.observer_for(None) == "dynamic" else calibration_batches(
        calib_data, len(example_inputs), plan.calib_samples)
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

    def __init__(self, model, example_inputs, batches, eval_fn, config: TuneConfig,
                 training: Training | None) -> None:
        self.example_inputs, self.batches, self.eval_fn, self.config = example_inputs, batches, eval_fn, config
        self.training = training
        self.reporter = Reporter.shared(config.verbose)
        try:
            self.fp32 = copy.deepcopy(model).eval()
        except Exception as error:
            raise TypeError(f"autoq works on a copy of the model, but copy.deepcopy(model) failed: {error}") from error

    def execute(self) -> TuneResult:
        config, line = self.config, self.reporter.line
        started = time.perf_counter()
        baseline = self._baseline()
        samples = sum(int(batch[0].shape[0]) for batch in self.batches)
        line(f"FP32 baseline metric {baseline:.4f}; {samples} calibration samples")
        arms = self._arms()
        study, created = self._study(baseline)
        line(f"study '{study.study_name}' in {redacted(storage_url(config.storage))}")
        study.set_user_attr(RESULT_ATTR, None)  # running again: the last final choice is stale until the end
        stored_config = {**dataclasses.asdict(config), "storage": config.storage and redacted(config.storage)}
        study.set_user_attr(RUN_ATTR, {"baseline": baseline, "config": stored_config,
                                       "layers": {recipe: arms.layers(recipe) for recipe in arms.recipes}})
        self._join(study)
        scores = layer_scores(study, arms, self.fp32, self.batches, config.sensitivity_samples, line)
        proposer = PlanProposer(config.space, arms, {recipe: rank_layers(s) for recipe, s in scores.items()})
        seeds = proposer.seed_params()
        if created or not study.get_trials(deepcopy=False):
            for params in seeds:
                study.enqueue_trial(params, skip_if_exists=True)
        if kept := counted_trials(study):
            line(f"resuming study '{study.study_name}': {kept} finished trials kept")
        timer = LayerTimer(layer_timings(study), seconds=config.latency_seconds, threads=config.threads)
        objective = Objective(arms, proposer, self.fp32, self.eval_fn, baseline, config, timer, self.reporter)
        self._optimize(study, objective, lambda: after_seeds(study, len(seeds), proposer, config.max_loss, line))
        return self._result(study, arms, baseline, scores, started, self._dispatch_table(timer))

    def _arms(self) -> Arms:
        """The recipes that apply, captured and calibrated once."""
        config, line = self.config, self.reporter.line
        with self.reporter.bar("calibrate", 2 * len(self.batches) * calibrated(config.space.recipes)) as advance:
            arms = applicable_arms(self.fp32, self.example_inputs, self.batches, config.space.recipes,
                                   config.non_traceable_modules, progress=advance, training=self.training)
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

            with warnings.catch_warnings(), CTRL_C.deferred():  # Ctrl-C never cuts a storage write in half
                warnings.simplefilter("ignore")
                # no n_trials here: trials of dropped recipes do not count, after_trial stops at the budget
                study.optimize(objective, timeout=config.timeout, catch=(CandidateFailed,), callbacks=[after_trial])

    @staticmethod
    def _dispatch_table(timer: LayerTimer) -> DispatchTable:
        """This CPU's shipped table (if autoq has one) plus this study's in-model layer timings."""
        table = shipped_table() or DispatchTable.for_this_machine()
        table.add(timer.entries())
        return table

    def _baseline(self) -> float:
        try:
            with torch.no_grad():
                baseline = float(self.eval_fn(copy.deepcopy(self.fp32)))
        except Exception as error:
            raise RuntimeError(f"eval_fn failed on the FP32 model, so there is no baseline: "
                               f"{type(error).__name__}: {error}") from error
        if not math.isfinite(baseline):
            raise ValueError(f"eval_fn returned {baseline} for the FP32 model; it must return a finite number.")
        if self.config.loss_type == "relative" and baseline == 0:
            raise ValueError("The FP32 metric is 0, so a relative loss is undefined: use loss_type='absolute'.")
        return baseline

    def _study(self, baseline: float) -> tuple[optuna.Study, bool]:
        config = self.config
        name = config.study_name or "autoq-" + fingerprint(self.fp32, self.example_inputs, baseline, config.space)
        n_startup = max(3, min(10, (config.n_trials or 40) // 4))
        sampler = optuna.samplers.TPESampler(seed=config.seed, multivariate=True, n_startup_trials=n_startup)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return open_study(storage_url(config.storage), name, sampler, must_exist=config.resume)

    def _result(self, study, arms: Arms, baseline, scores, started, table: DispatchTable) -> TuneResult:
        """The fastest feasible finalist (else the lowest-loss plan), evaluated and timed against FP32."""
        config, rows = self.config, trial_rows(study)
        best, feasible = best_row(rows)
        if best is None:
            raise RuntimeError(
                f"No trial of study '{study.study_name}' produced an evaluated model; see the errors in "
                f"its trials: {[r['error'] for r in rows if r['error']][:3]}"
            )
        if feasible:
            plan, model = fastest_finalist(arms, rows, config)
        else:
            plan = QuantPlan.from_dict(best["plan"])
            model = arms.build(plan)
        record_layer_shapes(model, self.example_inputs, config.non_traceable_modules)
        with torch.no_grad():
            accuracy = float(self.eval_fn(model))
        loss = config.loss(baseline, accuracy)
        timed = against_fp32(model, self.fp32, self.example_inputs, compile_fp32=config.compile_fp32,
                             threads=config.threads, seconds=4 * config.latency_seconds, lock=config.measure_lock)
        notes = [isa_note(arms), *(f"recipe {recipe} skipped: {why}" for recipe, why in arms.skipped.items()),
                 *timed.notes, f"tuning took {time.perf_counter() - started:.0f} s"]
        feasible = loss <= config.max_loss
        if not feasible:
            warnings.warn(
                f"autoq: no candidate met the accuracy budget (max_loss={config.max_loss}, {config.loss_type}); "
                f"returning the lowest-loss model (loss {loss:.4f}). See result.pareto_front for the trade-offs.",
                stacklevel=3,
            )
        if table.entries:
            table.refit()
        result = TuneResult(
            model=model, accuracy=accuracy, baseline_accuracy=baseline, loss=loss, speedup=timed.speedup,
            latency_ms=timed.latency_ms, plan=plan.to_dict(), trials=rows, pareto_front=pareto_front(rows),
            feasible=feasible, layers=plan.layer_table(arms.layers(plan.recipe), scores[plan.recipe]),
            study_name=study.study_name, storage=redacted(storage_url(config.storage)), notes=notes,
            dispatch_table=table,
        )
        study.set_user_attr(RESULT_ATTR, result.stored())
        self.reporter.line("\n" + result.summary())
        return result
