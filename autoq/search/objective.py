"""One trial: build the plan's int8 model, measure its speed against FP32, evaluate its accuracy."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

import optuna
import torch

from autoq.config import TuneConfig
from autoq.dispatch.layers import set_layer_engines
from autoq.dispatch.measured import LayerTimer
from autoq.measure.latency import measure_latency, speedup
from autoq.plan import QuantPlan
from autoq.recipes.static import StaticBuilder
from autoq.search.space import GLOBAL
from autoq.search.study import store_layer_timings

PRUNE_MARGIN = 0.05  # a candidate this much slower than the best feasible one is not evaluated


class CandidateFailed(Exception):
    """A candidate could not be built or evaluated; its trial is marked failed and the study goes on."""


class Objective:
    """Callable for study.optimize: returns the measured speedup; accuracy loss is a constraint."""

    def __init__(
        self,
        builder: StaticBuilder,
        fp32_model: torch.nn.Module,
        eval_fn: Callable[[torch.nn.Module], float],
        baseline: float,
        ranking: Sequence[str],
        config: TuneConfig,
        previous: Sequence[dict],
        timer: LayerTimer,
    ) -> None:
        self.builder, self.fp32_model, self.eval_fn = builder, fp32_model, eval_fn
        self.baseline, self.ranking, self.config, self.timer = baseline, list(ranking), config, timer
        self.outcomes: dict[str, dict] = {}  # plan key -> measured attributes, to never measure a plan twice
        self.best_feasible_speedup = 0.0
        for row in previous:
            if row["state"] == "COMPLETE" and row["plan"] and row["loss"] is not None:
                self._remember(row["plan_key"] or QuantPlan.from_dict(row["plan"]).key(), row)

    def _remember(self, key: str, outcome: dict) -> None:
        self.outcomes[key] = {k: outcome[k] for k in ("metric", "loss", "speedup", "int8_ms", "fp32_ms")}
        if outcome["loss"] <= self.config.max_loss:
            self.best_feasible_speedup = max(self.best_feasible_speedup, outcome["speedup"])

    def __call__(self, trial: optuna.Trial) -> float:
        plan = self.config.space.suggest(trial, self.ranking, self.builder.checkpoints, self.builder.has_relu6)
        trial.set_user_attr("plan", plan.to_dict())
        key = plan.key()  # a 'measured' plan is keyed before its layers are timed
        trial.set_user_attr("plan_key", key)
        if key in self.outcomes:
            outcome = self.outcomes[key]
            trial.set_user_attr("duplicate_of_plan", key)
        else:
            outcome = self._measure(trial, plan)
            self._remember(key, outcome)
        for name, value in outcome.items():
            trial.set_user_attr(name, value)
        feasible = outcome["loss"] <= self.config.max_loss
        trial.set_constraint("accuracy_loss", outcome["loss"] - self.config.max_loss)
        self._report(trial, plan, outcome, "feasible" if feasible else "over budget")
        return outcome["speedup"]

    def _measure(self, trial: optuna.Trial, plan: QuantPlan) -> dict:
        try:
            model = self.builder.build(plan)
            if plan.dispatch == "measured" and not plan.layer_engines:
                known = len(self.timer.records())
                plan.layer_engines = self.timer.choose(model, self.builder.example_inputs)
                set_layer_engines(model, plan.layer_engines)
                trial.set_user_attr("plan", plan.to_dict())
                if len(self.timer.records()) > known:  # stored at once: a killed run keeps them
                    store_layer_timings(trial.study, self.timer.records())
            timing = measure_latency(
                {"fp32": self.fp32_model, "int8": model}, self.builder.example_inputs,
                threads=self.config.threads, target_seconds=self.config.latency_seconds,
            )
        except Exception as error:
            self._fail(trial, plan, f"building or running the candidate failed: {type(error).__name__}: {error}")
        measured = {
            "speedup": speedup(timing["fp32"], timing["int8"]),
            "int8_ms": timing["int8"].median_ms,
            "fp32_ms": timing["fp32"].median_ms,
        }
        if self.config.prune_slower and measured["speedup"] < self.best_feasible_speedup * (1 - PRUNE_MARGIN):
            for name, value in measured.items():
                trial.set_user_attr(name, value)
            trial.report(measured["speedup"], step=0)
            self._report(trial, plan, measured, f"pruned: slower than the best feasible {self.best_feasible_speedup:.2f}x")
            raise optuna.TrialPruned()
        try:
            with torch.no_grad():
                metric = float(self.eval_fn(model))
        except Exception as error:
            self._fail(trial, plan, f"eval_fn raised {type(error).__name__}: {error}")
        if not math.isfinite(metric):
            self._fail(trial, plan, f"eval_fn returned {metric}, not a finite number")
        return {"metric": metric, "loss": self.config.loss(self.baseline, metric), **measured}

    def _fail(self, trial: optuna.Trial, plan: QuantPlan, message: str) -> None:
        trial.set_user_attr("error", message)
        self._report(trial, plan, {}, f"FAILED: {message}")
        raise CandidateFailed(message)

    def _report(self, trial: optuna.Trial, plan: QuantPlan, outcome: dict, verdict: str) -> None:
        if not self.config.verbose:
            return
        layer_observers = sum(1 for k, v in trial.params.items() if k.startswith("observer:") and v != GLOBAL)
        parts = [
            f"trial {trial.number:3d}", f"{_kernels(plan):13s}", f"{plan.activation_observer:14s}",
            f"w={plan.weight_granularity:11s}", f"sym={int(plan.activation_symmetric)}",
            f"rr={int(plan.reduce_range)}", f"cl={int(plan.channels_last)}", f"r6={int(plan.fold_relu6)}",
            f"calib={plan.calib_samples}",
            f"fp32_layers={len(plan.fp32_layers)}", f"layer_obs={layer_observers}",
        ]
        if "metric" in outcome:
            parts += [f"metric={outcome['metric']:.4f}", f"loss={outcome['loss']:+.4f}"]
        if "speedup" in outcome:
            parts.append(f"speedup={outcome['speedup']:.2f}x")
        print("  ".join(parts) + f"  {verdict}", file=sys.stderr, flush=True)


def _kernels(plan: QuantPlan) -> str:
    """'x86', or for per-layer dispatch the split, e.g. 'measured 31/21' (oneDNN/FBGEMM layers)."""
    if not plan.layer_engines:
        return plan.engine
    onednn = sum(library == "onednn" for library in plan.layer_engines.values())
    return f"{plan.dispatch} {onednn}/{len(plan.layer_engines) - onednn}"
