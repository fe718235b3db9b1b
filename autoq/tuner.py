"""`autoq.tune`: the whole pipeline, from the FP32 model to a measured, in-budget int8 model."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import optuna
import torch

from autoq.capture import as_input_tuple, calibration_batches, check_model
from autoq.config import TuneConfig
from autoq.dispatch.apply import apply_dispatch, record_layer_shapes, set_model_dispatch
from autoq.dispatch.measured import LayerTimer
from autoq.dispatch.table import DispatchTable, current_cpu, shipped_table
from autoq.measure.fp32 import best_fp32
from autoq.measure.latency import fastest, measure_latency, speedup
from autoq.measure.lock import measurement_lock
from autoq.plan import ENGINES, INDUCTOR_RECIPES, QAT_TWINS, QuantPlan, default_plan
from autoq.progress import Reporter
from autoq.recipes.arms import Arms, applicable_arms, builder, calibrated
from autoq.recipes.qat import Training
from autoq.result import TuneResult
from autoq.search.ctrl_c import CTRL_C
from autoq.search.objective import CandidateFailed, Objective
from autoq.search.sensitivity import layer_sensitivity, rank_layers, single_layer_sensitivity
from autoq.search.space import INDUCTOR, PlanProposer
from autoq.search.study import (
    DROPPED_ATTR, DROPPED_RECIPES_ATTR, FINISHED, RESULT_ATTR, RUN_ATTR, SENSITIVITY_ATTR, SPEED_TIE, best_row,
    counted_trials, fingerprint, layer_timings, open_study, optuna_quiet, pareto_front, reclaim_interrupted, redacted,
    register_worker, storage_url, trial_rows,
)

SWEEP_ATTR = "sweep_enqueued"  # study user attr: the observer sweep around the best seed is queued


FINALISTS = 3  # fastest feasible plans re-measured side by side before choosing
DROP_MARGIN = 0.25  # a recipe whose best seed is this much slower than another's (as accurate) is dropped
HOPELESS_RATIO = 10  # ... or whose best seed loses this many times more than another's (and than the budget)


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
    if plan.recipe in INDUCTOR_RECIPES and dispatch is not None:
        raise ValueError(f"dispatch does not apply to recipe {plan.recipe!r}: Inductor picks its kernels itself.")
    batches = [] if plan.observer_for(None) == "dynamic" else calibration_batches(
        calib_data, len(example_inputs), plan.calib_samples)
    quantized = builder(plan.recipe, model, example_inputs, batches, list(non_traceable_modules),
                        training=training).build(plan)
    record_layer_shapes(quantized, example_inputs, list(non_traceable_modules))
    if dispatch == "measured":
        set_model_dispatch(quantized, LayerTimer().choose(quantized, example_inputs), "measured")
    elif dispatch is not None:
        apply_dispatch(quantized, dispatch)
    return quantized


class _Run:
    def __init__(self, model, example_inputs, batches, eval_fn, config: TuneConfig,
                 training: Training | None) -> None:
        self.example_inputs, self.batches, self.eval_fn, self.config = example_inputs, batches, eval_fn, config
        self.training = training
        self.reporter = Reporter.shared(config.verbose)
        self.proposer = PlanProposer(config.space)  # plans, seeds and sweeps of the search space
        try:
            self.fp32 = copy.deepcopy(model).eval()
        except Exception as error:
            raise TypeError(f"autoq works on a copy of the model, but copy.deepcopy(model) failed: {error}") from error

    def execute(self) -> TuneResult:
        config, reporter = self.config, self.reporter
        started = time.perf_counter()
        baseline = self._baseline()
        reporter.line(f"FP32 baseline metric {baseline:.4f}; {sum(int(b[0].shape[0]) for b in self.batches)} "
                      f"calibration samples")
        with reporter.bar("calibrate", 2 * len(self.batches) * calibrated(config.space.recipes)) as advance:
            arms = applicable_arms(self.fp32, self.example_inputs, self.batches, config.space.recipes,
                                   config.non_traceable_modules, progress=advance, training=self.training)
        reporter.line(isa_note(arms))
        for recipe in arms.recipes:
            reporter.line(f"recipe {recipe}: {len(arms.layers(recipe))} quantizable layers")
        for recipe, reason in arms.skipped.items():
            reporter.line(f"recipe {recipe} skipped: {reason}")
        study, created = self._study(baseline)
        reporter.line(f"study '{study.study_name}' in {redacted(storage_url(config.storage))}")
        study.set_user_attr(RESULT_ATTR, None)  # running again: the last final choice is stale until the end
        stored_config = {**dataclasses.asdict(config), "storage": config.storage and redacted(config.storage)}
        study.set_user_attr(RUN_ATTR, {"baseline": baseline, "config": stored_config,
                                       "layers": {recipe: arms.layers(recipe) for recipe in arms.recipes}})
        neighbours = register_worker(study, config.measure_lock)
        if neighbours and not config.measure_lock:
            warnings.warn(f"autoq: other workers of study '{study.study_name}' run on this machine ({neighbours}); "
                          f"their timings disturb each other. Run every worker with measure_lock=true "
                          f"(`autoq tune --measure-lock`) so they take turns to measure.", stacklevel=3)
        reclaimed = reclaim_interrupted(study)
        if reclaimed:
            reporter.line(f"trials {reclaimed} were cut short (worker died or stopped): queued again")
        scores = self._sensitivity(study, arms)
        arms.rankings = {recipe: rank_layers(recipe_scores) for recipe, recipe_scores in scores.items()}
        seeds = self.proposer.seed_params(arms)
        if created or not study.get_trials(deepcopy=False):
            for params in seeds:
                study.enqueue_trial(params, skip_if_exists=True)
        kept = counted_trials(study)
        if kept:
            reporter.line(f"resuming study '{study.study_name}': {kept} finished trials kept")
        timer = LayerTimer(layer_timings(study), seconds=config.latency_seconds, threads=config.threads)
        objective = Objective(arms, self.fp32, self.eval_fn, baseline, config, timer, reporter)
        self._optimize(study, objective, len(seeds))
        rows = trial_rows(study)
        return self._result(study, arms, rows, baseline, scores, started, self._dispatch_table(timer))

    def _optimize(self, study: optuna.Study, objective: Objective, n_seeds: int) -> None:
        """Run trials until the study counts n_trials (over all workers) or this call's timeout ends."""
        config = self.config
        remaining = None if config.n_trials is None else max(config.n_trials - counted_trials(study), 0)
        if remaining == 0:
            return
        with self.reporter.bar("trials", remaining) as advance:
            def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                if not trial.user_attrs.get(DROPPED_ATTR):
                    advance(1)
                self._enqueue_sweep(study, n_seeds, objective.arms)
                if config.n_trials is not None and counted_trials(study, running=True) >= config.n_trials:
                    study.stop()  # other workers' running trials complete the count

            with warnings.catch_warnings(), CTRL_C.deferred():  # Ctrl-C never cuts a storage write in half
                warnings.simplefilter("ignore")
                # no n_trials here: trials of dropped recipes do not count, after_trial stops at the budget
                study.optimize(objective, timeout=config.timeout, catch=(CandidateFailed,), callbacks=[after_trial])

    def _enqueue_sweep(self, study: optuna.Study, n_seeds: int, arms: Arms) -> None:
        """Once every seed trial has finished (once per study): drop the recipes that measured clearly
        worse, then queue each remaining recipe's sweep around its best seed."""
        if study.user_attrs.get(SWEEP_ATTR):
            return
        seeds = study.get_trials(deepcopy=False)[:n_seeds]
        if any(trial.state not in FINISHED for trial in seeds):
            return
        study.set_user_attr(SWEEP_ATTR, True)
        best = self._best_seeds(seeds)
        dropped = dominated_recipes({recipe: trial.user_attrs for recipe, trial in best.items()},
                                    self.config.max_loss)
        fine_tuning = [recipe for recipe in QAT_TWINS if recipe in arms.recipes]
        if fine_tuning:  # the recovery arms: only if no all-int8 post-training seed meets the budget
            feasible = [t.number for t in seeds if t.state == optuna.trial.TrialState.COMPLETE
                        and t.user_attrs.get("loss", math.inf) <= self.config.max_loss
                        and not QuantPlan.from_dict(t.user_attrs["plan"]).fp32_layers]
            if feasible:
                dropped.update({recipe: f"post-training quantization meets the budget with every layer int8 "
                                        f"(trial {feasible[0]}): QAT is only tried when it does not"
                                for recipe in fine_tuning})
            else:
                for params in self.proposer.qat_seeds(arms):
                    study.enqueue_trial(params, skip_if_exists=True)
        if dropped:
            study.set_user_attr(DROPPED_RECIPES_ATTR, dropped)
            for recipe, reason in dropped.items():
                self.reporter.line(f"recipe {recipe} dropped: {reason}")
        for recipe, trial in best.items():
            if recipe not in dropped:
                for params in self.proposer.sweep_params(dict(trial.params), arms):
                    study.enqueue_trial(params, skip_if_exists=True)

    def _best_seeds(self, seeds: list[optuna.trial.FrozenTrial]) -> dict[str, optuna.trial.FrozenTrial]:
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

    def _fastest_finalist(self, arms: Arms, rows: list[dict]) -> tuple[QuantPlan, torch.nn.Module]:
        """Re-measure the fastest feasible plans side by side and keep the truly fastest.

        Each trial is timed on its own, so the top of the ranking is partly measurement luck; the
        finalists are timed together, interleaved, and within SPEED_TIE the lowest loss wins.
        """
        feasible = sorted((r for r in rows if r["feasible"] and r["state"] == "COMPLETE"),
                          key=lambda r: -r["speedup"])
        finalists: dict[str, tuple[dict, QuantPlan]] = {}
        for row in feasible:
            plan = QuantPlan.from_dict(row["plan"])
            finalists.setdefault(plan.key(), (row, plan))
            if len(finalists) == FINALISTS:
                break
        models = {key: arms.build(plan) for key, (_, plan) in finalists.items()}
        with measurement_lock(self.config.measure_lock):
            timing = measure_latency(models, self.example_inputs, threads=self.config.threads,
                                     target_seconds=2 * self.config.latency_seconds)
        winner = timing[fastest(timing)]
        tied = [key for key in models if speedup(timing[key], winner) <= 1 + SPEED_TIE]
        key = min(tied, key=lambda k: finalists[k][0]["loss"])
        return finalists[key][1], models[key]

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

    def _sensitivity(self, study: optuna.Study, arms: Arms) -> dict[str, dict[str, float]]:
        """{recipe: {layer: output SQNR in dB when only that layer is int8}}, stored in the study."""
        stored = study.user_attrs.get(SENSITIVITY_ATTR) or {}
        samples, batches = 0, []
        for batch in self.batches:
            batches.append(batch)
            samples += int(batch[0].shape[0])
            if samples >= self.config.sensitivity_samples:
                break
        scores = {}
        for recipe in arms.recipes:
            if isinstance(stored.get(recipe), dict) and set(stored[recipe]) == set(arms.layers(recipe)):
                scores[recipe] = {layer: float(value) for layer, value in stored[recipe].items()}
                continue
            if QAT_TWINS.get(recipe) in scores:  # a QAT recipe ranks its layers as its post-training twin does
                scores[recipe] = scores[QAT_TWINS[recipe]]
                continue
            self.reporter.line(f"ranking {len(arms.layers(recipe))} layers by output SQNR when quantized alone "
                               f"({recipe})")
            arm, post_training = arms.builders[recipe], QAT_TWINS.get(recipe, recipe)
            if recipe in QAT_TWINS:  # (its twin is not searched)
                arm = arm.twin
            if post_training == "static":
                scores[recipe] = layer_sensitivity(arm, self.fp32, batches, default_plan("x86"))
                continue
            plan = QuantPlan(recipe=post_training, reduce_range=not arms.full_range_safe(INDUCTOR))
            build = partial(arm.build, plan) if recipe == "dynamic" else partial(arm.reference, plan)
            scores[recipe] = single_layer_sensitivity(lambda layer: build(layers=[layer]), arm.layers,
                                                      self.fp32, batches)
        study.set_user_attr(SENSITIVITY_ATTR, {recipe: {k: (v if math.isfinite(v) else 1e9) for k, v in s.items()}
                                               for recipe, s in scores.items()})
        return scores

    def _result(self, study, arms: Arms, rows, baseline, scores, started, table: DispatchTable) -> TuneResult:
        config = self.config
        best, feasible = best_row(rows)
        if best is None:
            raise RuntimeError(
                f"No trial of study '{study.study_name}' produced an evaluated model; see the errors in "
                f"its trials: {[r['error'] for r in rows if r['error']][:3]}"
            )
        plan, model = self._fastest_finalist(arms, rows) if feasible else (None, None)
        if plan is None:
            plan = QuantPlan.from_dict(best["plan"])
            model = arms.build(plan)
        record_layer_shapes(model, self.example_inputs, config.non_traceable_modules)
        with torch.no_grad():
            accuracy = float(self.eval_fn(model))
        loss = config.loss(baseline, accuracy)
        notes = [isa_note(arms)] + [f"recipe {recipe} skipped: {reason}" for recipe, reason in arms.skipped.items()]
        reference = best_fp32(self.fp32, self.example_inputs, compile=False)
        candidates = {"fp32_eager": self.fp32, "fp32_folded": reference.model, "int8": model}
        if config.compile_fp32:
            compiled = best_fp32(self.fp32, self.example_inputs, compile=True)
            candidates["fp32_compiled"] = compiled.model
            notes += compiled.warnings
        with measurement_lock(config.measure_lock):
            timing = measure_latency(candidates, self.example_inputs, threads=config.threads,
                                     target_seconds=4 * config.latency_seconds, min_repeats=20)
        fp32_best_name = min((n for n in timing if n.startswith("fp32_")), key=lambda n: timing[n].median_ms)
        latency = {
            "fp32_eager": timing["fp32_eager"].median_ms,
            "fp32_best": timing[fp32_best_name].median_ms,
            "int8": timing["int8"].median_ms,
        }
        notes.append(f"best FP32 is {fp32_best_name} ({', '.join(reference.steps) or 'no rewrite'}"
                     f"{' + torch.compile' if fp32_best_name == 'fp32_compiled' else ''})")
        if latency["int8"] >= latency["fp32_best"]:
            notes.append("int8 does not beat the best FP32 on this CPU for these inputs")
        feasible = loss <= config.max_loss
        if not feasible:
            warnings.warn(
                f"autoq: no candidate met the accuracy budget (max_loss={config.max_loss}, {config.loss_type}); "
                f"returning the lowest-loss model (loss {loss:.4f}). See result.pareto_front for the trade-offs.",
                stacklevel=3,
            )
        notes.append(f"tuning took {time.perf_counter() - started:.0f} s")
        layers = plan.layer_table(arms.layers(plan.recipe), scores[plan.recipe])
        if table.entries:
            table.refit()
        result = TuneResult(
            model=model, accuracy=accuracy, baseline_accuracy=baseline, loss=loss,
            speedup=latency["fp32_eager"] / latency["int8"], latency_ms=latency, plan=plan.to_dict(),
            trials=rows, pareto_front=pareto_front(rows), feasible=feasible, layers=layers,
            study_name=study.study_name, storage=redacted(storage_url(config.storage)), notes=notes,
            dispatch_table=table,
        )
        study.set_user_attr(RESULT_ATTR, {
            "plan": result.plan, "accuracy": accuracy, "loss": loss, "speedup": result.speedup,
            "latency_ms": latency, "feasible": feasible, "layers": layers, "notes": notes,
        })
        self.reporter.line("\n" + result.summary())
        return result
