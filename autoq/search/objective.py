"""One trial: build the plan's int8 model, measure its speed against FP32, evaluate its accuracy."""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna
import torch
from optuna.trial import TrialState

from autoq.config import TuneConfig
from autoq.dispatch.layers import set_layer_engines
from autoq.dispatch.measured import LayerTimer
from autoq.measure.evaluation import SCREEN_CONFIDENCE, SEARCH, Scorer
from autoq.measure.latency import measure_latency, speedup, speedup_interval
from autoq.measure.lock import measurement_lock
from autoq.plan import MEASURED, QuantPlan, default_plan, recipe_kind
from autoq.progress import Reporter
from autoq.recipes.arms import Arms
from autoq.search.budget import TimeBudget
from autoq.search.ctrl_c import CTRL_C
from autoq.search.policy import CANDIDATES
from autoq.search.space import PlanProposer
from autoq.search.study import (
    DROPPED_ATTR, DROPPED_RECIPES_ATTR, NOT_STARTED_ATTR, STOPPED_ATTR, SURPLUS_ATTR, WORKER_ATTR, is_surplus, store_layer_timings,
    trial_rows, worker_id,
)

PRUNE_MARGIN = 0.05  # a candidate this much slower than the best feasible one is not evaluated
TWIN_WAIT_SECONDS = 900  # longest wait for another worker measuring the same plan
ADAROUND_LAYER_SECONDS = 5.0  # a first guess of learned rounding's cost per layer (then the trials tell)
MIN_FINE_TUNE = 30.0  # seconds a QAT trial's fine-tune needs at least to be worth starting


class CandidateFailed(Exception):
    """A candidate could not be built or evaluated; its trial is marked failed and the study goes on."""


class Objective:
    """Callable for study.optimize: returns the measured speedup; accuracy loss is a constraint."""

    def __init__(
        self,
        arms: Arms,
        proposer: PlanProposer,
        fp32_model: torch.nn.Module,
        scorer: Scorer,
        baseline: float,
        config: TuneConfig,
        timer: LayerTimer,
        reporter: Reporter,
        budget: TimeBudget,
    ) -> None:
        self.arms, self.fp32_model, self.scorer = arms, fp32_model, scorer
        self.baseline, self.config, self.timer = baseline, config, timer
        self.reporter, self.budget = reporter, budget
        self.proposer = proposer
        self.feasible: list[tuple[float, str]] = []  # (speedup, recipe) of every in-budget plan measured
        self.outcomes: dict[str, dict] = {}  # plan key -> measured attributes, to never measure a plan twice
        self.pruned: dict[str, dict] = {}  # plan key -> timings of plans pruned as too slow
        self.best_feasible_speedup = 0.0
        self.best_feasible_plan: dict | None = None  # the plan of best_feasible_speedup, as stored in its trial
        self._best_model: tuple[str, torch.nn.Module] | None = None  # (plan key, model), built when first needed
        self.default = default_plan("x86")  # the per-trial line lists what a plan changes from it
        self.default.calib_samples = arms.checkpoints[-1] if arms.checkpoints else None

    def _remember(self, key: str, outcome: dict, plan: dict) -> None:
        self.outcomes[key] = {k: outcome[k] for k in ("metric", "loss", "loss_upper", "speedup", "speedup_interval",
                                                      "int8_ms", "fp32_ms", "screened") if outcome.get(k) is not None}
        if outcome["loss"] > self.config.max_loss:
            return
        self.feasible.append((outcome["speedup"], plan["_data"]["recipe"]))
        self.budget.feasible_found()
        if outcome["speedup"] > self.best_feasible_speedup:
            self.best_feasible_speedup, self.best_feasible_plan = outcome["speedup"], plan

    def _sync(self, study: optuna.Study) -> None:
        """Learn the outcomes of plans measured so far, by this worker or any other on the storage."""
        for row in trial_rows(study, self._loss_of, self.config.max_loss):
            key = row["plan_key"] or (row["plan"] and QuantPlan.from_dict(row["plan"]).key())
            if row["state"] == "COMPLETE" and key and key not in self.outcomes and row["loss"] is not None:
                self._remember(key, row, row["plan"])
            elif row["state"] == "PRUNED" and key and row["speedup"] is not None:
                self.pruned[key] = {k: row[k] for k in ("speedup", "speedup_interval", "int8_ms", "fp32_ms")
                                    if row[k] is not None}

    def _loss_of(self, metric: float) -> float:
        """The loss of a stored trial's metric by this run's settings (a resumed study may have others)."""
        return self.config.loss(self.baseline, metric)

    def _wait_for_twin(self, trial: optuna.Trial, key: str) -> None:
        """Wait while an earlier running trial (of another worker) measures the same plan, then learn its outcome."""
        deadline = time.monotonic() + TWIN_WAIT_SECONDS
        while time.monotonic() < deadline and any(
                other.number < trial.number and other.user_attrs.get("plan_key") == key
                for other in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
            CTRL_C.check()
            time.sleep(0.5)
        self._sync(trial.study)

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except KeyboardInterrupt:
            trial.set_user_attr(STOPPED_ATTR, True)  # Optuna fails the trial; the next run re-queues it
            raise

    def _run(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, worker_id())
        plan = self.proposer.suggest(trial)
        dropped = trial.study.user_attrs.get(DROPPED_RECIPES_ATTR) or {}
        if plan.recipe in dropped:  # not counted: the sampler learns to avoid the recipe
            trial.set_user_attr(DROPPED_ATTR, plan.recipe)
            trial.report(0.0, step=0)
            raise optuna.TrialPruned()
        if self.config.n_trials is not None and is_surplus(trial.study, trial.number, self.config.n_trials):
            trial.set_user_attr(SURPLUS_ATTR, True)  # another worker took the last trial first
            trial.study.stop()
            raise optuna.TrialPruned()
        self._sync(trial.study)
        trial.set_user_attr("plan", plan.to_dict())
        key = plan.key()  # a 'measured' plan is keyed before its layers are timed
        trial.set_user_attr("plan_key", key)
        if key not in self.outcomes and key not in self.pruned:
            self._wait_for_twin(trial, key)
        if (key in self.outcomes or key in self.pruned) and recipe_kind(plan.recipe).precision != "int8":
            self._repeat_float(trial, plan)
        if key in self.pruned and key not in self.outcomes:
            trial.set_user_attr("duplicate_of_plan", key)
            self._prune(trial, plan, self.pruned[key])
        if key in self.outcomes:
            outcome = self.outcomes[key]
            trial.set_user_attr("duplicate_of_plan", key)
        else:
            self._check_time(trial, plan)
            started = time.monotonic()
            try:
                outcome = self._measure(trial, plan, key)
            finally:
                self.budget.trial_done(trial_kind(plan), time.monotonic() - started)
            self._remember(key, outcome, trial.user_attrs["plan"])
        for name, value in outcome.items():
            trial.set_user_attr(name, value)
        feasible = outcome["loss"] <= self.config.max_loss
        trial.set_constraint("accuracy_loss", outcome["loss"] - self.config.max_loss)
        verdict = "feasible" if feasible else "over budget"
        if "screened" in outcome:
            verdict += (f" (stopped after {outcome['screened']} of {self.scorer.size(SEARCH)} samples: over budget "
                        f"at {SCREEN_CONFIDENCE:.0%} confidence)")
        self._report(trial, plan, outcome, verdict)
        return outcome["speedup"]

    def _repeat_float(self, trial: optuna.Trial, plan: QuantPlan) -> None:
        """A float plan measured already: not counted (it has nothing left to search, and the sampler learns
        to avoid it); when no int8 recipe is left to search, the search is over."""
        dropped = trial.study.user_attrs.get(DROPPED_RECIPES_ATTR) or {}
        if not any(recipe_kind(recipe).precision == "int8" and recipe not in dropped for recipe in self.arms.recipes):
            trial.study.stop()
        trial.set_user_attr(DROPPED_ATTR, plan.recipe)
        trial.report(0.0, step=0)
        raise optuna.TrialPruned()

    def reserve(self) -> float:
        """Seconds the final phase needs for the in-budget plans found so far (at least one finalist)."""
        top = [recipe for _, recipe in sorted(self.feasible, reverse=True)[:CANDIDATES]]
        return self.final_seconds(top or [max(self.arms.recipes, key=self._build_seconds)])

    def final_seconds(self, recipes: list[str]) -> float:
        """The final phase for finalists of these recipes (`Costs.final`); 0 before setup measured costs."""
        costs = self.budget.costs
        return costs.final([self._build_seconds(recipe) for recipe in recipes]) if costs else 0.0

    def _build_seconds(self, recipe: str) -> float:
        """What building a plan of `recipe` again in the final phase costs: its slowest build so far, else
        an estimate. A fine-tuned plan is kept, so rebuilding it costs what its twin's build does."""
        recipe = recipe_kind(recipe).fine_tunes or recipe
        seen, costs = self.budget.build_seconds.get(recipe), self.budget.costs
        if seen or costs is None:
            return max(seen or [0.0])
        return costs.unseen_build(recipe_kind(recipe), len(self.arms.layers(recipe) if recipe in self.arms.recipes
                                                            else []))

    def fine_tune_seconds(self) -> float:
        """What a QAT fine-tune starting now may take: the time left but the rest of its trial and the
        final phase (`Training.time_left`)."""
        costs = self.budget.costs
        return self.budget.remaining() - self.reserve() - (costs.after_build() if costs else 0.0)

    def _check_time(self, trial: optuna.Trial, plan: QuantPlan) -> None:
        """Start no trial that would not end before the final phase's reserve (once a plan was measured):
        mark it, queue it again for a later run, stop the search."""
        costs, kind = self.budget.costs, recipe_kind(plan.recipe)
        if costs is None or not self.outcomes:
            return
        if kind.fine_tunes:  # its fine-tune takes the time left (Training.time_left), at least MIN_FINE_TUNE
            expected = self._build_seconds(plan.recipe) + MIN_FINE_TUNE + costs.after_build()
        else:
            unseen = (costs.unseen_build(kind, len(self.arms.layers(plan.recipe))) + costs.after_build()
                      + (costs.calibration if plan.equalization != "none" else 0.0)
                      + (ADAROUND_LAYER_SECONDS * len(self.arms.layers(plan.recipe)) if plan.adaround else 0.0))
            expected = self.budget.trial_estimate(trial_kind(plan), unseen)
        reserve = self.reserve()
        if self.budget.fits(expected, reserve):
            return
        self.budget.skipped_trials += 1
        trial.set_user_attr(NOT_STARTED_ATTR, round(expected, 1))
        trial.study.enqueue_trial(trial.params)  # a later run (or another worker with time) measures it
        trial.study.stop()
        self.reporter.line(f"trial {trial.number:3d} not started: it would take about {expected:.0f} s and "
                           f"{max(self.budget.remaining() - reserve, 0):.0f} s are left before the final phase "
                           f"({reserve:.0f} s reserved); the search stops here")
        raise optuna.TrialPruned()

    def _measure(self, trial: optuna.Trial, plan: QuantPlan, key: str) -> dict:
        try:
            started = time.perf_counter()
            with CTRL_C.work():
                model = self.arms.build(plan)
            build_seconds = time.perf_counter() - started
            if not recipe_kind(plan.recipe).fine_tunes:  # a fine-tuned plan's build is mostly its fine-tune
                self.budget.build_done(plan.recipe, build_seconds)
            with measurement_lock(self.config.measure_lock):
                if plan.dispatch == "measured" and not plan.layer_engines:
                    known = len(self.timer.records())
                    with CTRL_C.work():
                        plan.layer_engines = self.timer.choose(model, self.arms.example_inputs)
                    set_layer_engines(model, plan.layer_engines)
                    trial.set_user_attr("plan", plan.to_dict())
                    if len(self.timer.records()) > known:  # stored at once: a killed run keeps them
                        store_layer_timings(trial.study, self.timer.records())
                with CTRL_C.work():
                    timing = measure_latency(
                        {"fp32": self.fp32_model, "int8": model}, self.arms.example_inputs,
                        threads=self.config.threads, target_seconds=self.config.latency_seconds,
                    )
        except Exception as error:
            self._fail(trial, plan, f"building or running the candidate failed: {type(error).__name__}: {error}")
        measured = {
            "speedup": speedup(timing["fp32"], timing["int8"]),
            "speedup_interval": list(speedup_interval(timing["fp32"], timing["int8"])[1:]),
            "int8_ms": timing["int8"].median_ms,
            "fp32_ms": timing["fp32"].median_ms,
            "build_s": build_seconds,  # building (for Inductor recipes: compiling) the candidate
        }
        if self.config.prune_slower and measured["speedup"] < self.best_feasible_speedup * (1 - PRUNE_MARGIN):
            with CTRL_C.work():
                slower = self._slower_than_best(model)
            if slower:
                self.pruned[key] = measured
                self._prune(trial, plan, measured)
        try:
            with CTRL_C.work():
                judged = self.scorer.screen(model)
        except Exception as error:
            self._fail(trial, plan, f"evaluating the candidate failed: {type(error).__name__}: {error}")
        bound = {} if judged.estimate is None else {"loss_upper": judged.estimate.upper}
        screened = {} if judged.screened is None else {"screened": judged.screened}
        return {"metric": judged.metric, "loss": judged.loss, **bound, **screened, **measured}

    def _slower_than_best(self, model: torch.nn.Module) -> bool:
        """Whether `model` is PRUNE_MARGIN slower than the best feasible plan's model, timed side by side.

        Speedups of separate trials are separate measurements: on a noisy machine a lucky one would
        otherwise get every later equal plan pruned. The best model is rebuilt once per new best.
        """
        plan = QuantPlan.from_dict(self.best_feasible_plan)
        if self._best_model is None or self._best_model[0] != plan.key():
            try:
                self._best_model = (plan.key(), self.arms.build(plan))
            except Exception:  # e.g. another worker's recipe this worker does not search: trust the numbers
                return True
        with measurement_lock(self.config.measure_lock):
            timing = measure_latency({"best": self._best_model[1], "candidate": model}, self.arms.example_inputs,
                                     threads=self.config.threads, target_seconds=self.config.latency_seconds)
        return speedup(timing["best"], timing["candidate"]) < 1 - PRUNE_MARGIN

    def _prune(self, trial: optuna.Trial, plan: QuantPlan, measured: dict) -> None:
        for name, value in measured.items():
            trial.set_user_attr(name, value)
        trial.report(measured["speedup"], step=0)
        self._report(trial, plan, measured, f"pruned: slower than the best feasible {self.best_feasible_speedup:.2f}x")
        raise optuna.TrialPruned()

    def _fail(self, trial: optuna.Trial, plan: QuantPlan, message: str) -> None:
        trial.set_user_attr("error", message)
        self._report(trial, plan, {}, f"FAILED: {message}")
        raise CandidateFailed(message)

    def _report(self, trial: optuna.Trial, plan: QuantPlan, outcome: dict, verdict: str) -> None:
        """One line per trial: what the plan changes from PyTorch's default, metric, loss, speedup, verdict."""
        changes = " ".join(f"{name}={value}" for name, value in plan_changes(plan, self.default).items())
        parts = [f"trial {trial.number:3d}", changes or "PyTorch default recipe"]
        if "metric" in outcome:
            parts += [f"metric {outcome['metric']:.4f}", f"loss {outcome['loss']:+.4f}"
                      + (f" (bound {outcome['loss_upper']:+.4f})" if "loss_upper" in outcome else "")]
        if "speedup" in outcome:
            interval = outcome.get("speedup_interval")
            parts.append(f"speedup {outcome['speedup']:.2f}x" + (" [{:.2f}-{:.2f}]".format(*interval) if interval else ""))
        clock = self.budget.progress()
        self.reporter.line("  ".join(parts) + f"  {verdict}" + (f"  [{clock}]" if clock else ""))


def trial_kind(plan: QuantPlan) -> str:
    """What a trial's cost depends on: its recipe, whether it times its layers ('measured') and whether
    it rewrites the FP32 model (the first such build captures and calibrates the rewritten model)."""
    return ":".join([plan.recipe, *([MEASURED] if plan.dispatch == MEASURED else []),
                     *([plan.equalization] if plan.equalization != "none" else []),
                     *(["adaround"] if plan.adaround else [])])


def plan_changes(plan: QuantPlan, default: QuantPlan) -> dict[str, object]:
    """The choices of `plan` that differ from `default`, in short form (counts for per-layer lists)."""
    changes: dict[str, object] = {}
    if plan.kernels() != default.kernels():
        changes["kernels"] = plan.kernels().replace(" ", ":")
    for name in ("recipe", *recipe_kind(plan.recipe).fields):
        if getattr(plan, name) != getattr(default, name):
            changes[name] = getattr(plan, name)
    if "percentile" in (plan.activation_observer, *plan.layer_observers.values()):
        changes["percentile"] = plan.percentile
    if plan.layer_observers:
        changes["layer_observers"] = len(plan.layer_observers)
    if plan.fp32_layers:
        changes["fp32_layers"] = len(plan.fp32_layers)
    if plan.layer_weight_bits:
        changes["8bit_weight_layers"] = sum(bits == 8 for bits in plan.layer_weight_bits.values())
    if recipe_kind(plan.recipe).calibrated and plan.calib_samples != default.calib_samples:
        changes["calib_samples"] = plan.calib_samples
    return changes
