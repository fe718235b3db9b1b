"""What a report says, read from an Optuna study alone (finished, running or interrupted)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import optuna

from autoq.plan import QuantPlan
from autoq.search.study import RESULT_ATTR, RUN_ATTR, SENSITIVITY_ATTR, best_row, pareto_front, trial_rows


@dataclass
class ReportContent:
    """The facts of one study, in the units autoq stores them.

    finished: the run chose its plan (RESULT_ATTR is set); otherwise `chosen` is the best trial so far.
    baseline: FP32 metric. max_loss / loss_type: the accuracy budget (relative: fraction of baseline).
    rows: `trial_rows(study)`; front: their Pareto front (lowest loss first).
    state_counts: trials per Optuna state name, including RUNNING (a killed run leaves some).
    chosen: the trial row of the chosen (or best so far) plan.
    outcome: accuracy, loss, speedup (x vs FP32 eager), latency_ms, feasible, plan — the final side-by-side
      measurement when finished, else the chosen trial's own measurement.
    layers: per layer in model order: name, sqnr_db (sensitivity), quantized, observer, engine.
    """

    study_name: str
    finished: bool
    baseline: float
    max_loss: float
    loss_type: str
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    state_counts: dict[str, int]
    chosen: dict[str, Any]
    outcome: dict[str, Any]
    layers: list[dict[str, Any]]
    notes: list[str]

    @property
    def chosen_label(self) -> str:
        """How the report names `chosen`: 'chosen' (finished run) or 'best so far'."""
        return "chosen" if self.finished else "best so far"

    @property
    def loss_scale(self) -> float:
        """Factor from stored loss to displayed loss (relative losses are shown in %)."""
        return 100.0 if self.loss_type == "relative" else 1.0

    @property
    def loss_unit(self) -> str:
        return "% of baseline" if self.loss_type == "relative" else "metric units"

    @property
    def budget_text(self) -> str:
        """The accuracy budget as a reader would say it, e.g. 'loss <= 1.00% of baseline (relative)'."""
        if self.loss_type == "relative":
            return f"loss <= {self.max_loss * 100:.2f}% of baseline (relative)"
        return f"loss <= {self.max_loss:.4f} (absolute, metric units)"

    def format_loss(self, loss: float | None) -> str:
        """A loss for display: signed %, or signed metric units; '–' when not evaluated."""
        if loss is None:
            return "–"
        return f"{loss * 100:+.2f}%" if self.loss_type == "relative" else f"{loss:+.4f}"


def gather(study: optuna.Study) -> ReportContent:
    """Read everything the report shows from `study`; ValueError if it has no evaluated trial."""
    run = study.user_attrs.get(RUN_ATTR)
    if run is None:
        raise ValueError(
            f"study '{study.study_name}' has no '{RUN_ATTR}' attribute, so it was not written by this autoq "
            f"version; run `autoq tune` on it again (finished trials are kept) to record it."
        )
    rows = trial_rows(study)
    best, _ = best_row(rows)
    if best is None:
        errors = [row["error"] for row in rows if row["error"]]
        raise ValueError(
            f"study '{study.study_name}' has no evaluated trial yet ({len(rows)} finished"
            f"{', first error: ' + errors[0] if errors else ''}); run `autoq tune` first."
        )
    result = study.user_attrs.get(RESULT_ATTR)
    sensitivity = study.user_attrs.get(SENSITIVITY_ATTR, {})
    if result is not None:
        chosen = _row_of_plan(rows, result["plan"]) or best
        outcome = {key: result[key] for key in ("accuracy", "loss", "speedup", "latency_ms", "feasible", "plan")}
        # (results of autoq 0.2 have neither)
        outcome.update(guarantee=result.get("verdict", {}).get("guarantee"), fp32=result.get("baseline_accuracy"))
        layers, notes = result["layers"], list(result["notes"])
    else:
        chosen = best
        outcome = {
            "accuracy": best["metric"], "loss": best["loss"], "speedup": best["speedup"],
            "latency_ms": {"fp32_eager": best["fp32_ms"], "int8": best["int8_ms"]},
            "feasible": best["feasible"], "plan": best["plan"],
        }
        plan = QuantPlan.from_dict(best["plan"])
        layers = plan.layer_table(run["layers"][plan.recipe], sensitivity.get(plan.recipe, {}))
        notes = ["the run has not finished (still running, or interrupted): this is the best trial so far; "
                 "run `autoq tune` again with the same settings to resume it"]
        if not best["feasible"]:
            notes.append("no trial meets the accuracy budget yet: showing the lowest-loss trial")
    config = run["config"]
    return ReportContent(
        study_name=study.study_name, finished=result is not None, baseline=run["baseline"],
        max_loss=config["max_loss"], loss_type=config["loss_type"], rows=rows, front=pareto_front(rows),
        state_counts=dict(Counter(trial.state.name for trial in study.get_trials(deepcopy=False))),
        chosen=chosen, outcome=outcome, layers=layers, notes=notes,
    )


def _row_of_plan(rows: list[dict[str, Any]], plan: dict[str, Any]) -> dict[str, Any] | None:
    """The first evaluated trial that built `plan` (the final choice is re-measured, not a new trial)."""
    wanted = QuantPlan.from_dict(plan)
    for row in rows:
        if row["state"] == "COMPLETE" and row["plan"] and QuantPlan.from_dict(row["plan"]) == wanted:
            return row
    return None
