"""Optuna study handling: storage by URL, stable study names for resuming, trial history."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import optuna
import torch

DEFAULT_RUN_DIR = "autoq-runs"
LAYER_TIMINGS_ATTR = "layer_timings"  # study user attr: in-model per-layer kernel timings ('measured' trials)
SENSITIVITY_ATTR = "sensitivity_sqnr_db"  # study user attr: {layer: output SQNR dB quantized alone}, model order
RUN_ATTR = "autoq_run"  # study user attr: {baseline, config (TuneConfig as a dict), layers}
RESULT_ATTR = "autoq_result"  # study user attr: the final choice {plan, accuracy, loss, speedup, latency_ms, ...}
SPEED_TIE = 0.02  # speedups this close (fraction) are measurement noise: prefer the lower loss
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def storage_url(storage: str | None) -> str:
    """The Optuna storage URL; None means a SQLite file under ./autoq-runs/ (created if needed)."""
    if storage is None:
        Path(DEFAULT_RUN_DIR).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{os.path.join(DEFAULT_RUN_DIR, 'autoq.db')}"
    if not isinstance(storage, str) or "://" not in storage:
        raise ValueError(
            f"`storage` must be an Optuna storage URL such as 'sqlite:///runs.db' or "
            f"'postgresql://user@host/db'. Got {storage!r} instead."
        )
    return storage


def fingerprint(model: torch.nn.Module, example_inputs: tuple, baseline: float, settings: Any) -> str:
    """A short hash of what makes trials comparable: weights, input shapes, baseline metric, settings."""
    digest = hashlib.sha1()
    digest.update(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        values = tensor.detach().double()
        digest.update(f"{name}{tuple(tensor.shape)}{float(values.sum()):.6e}{float(values.abs().sum()):.6e}".encode())
    for value in example_inputs:
        digest.update(str((getattr(value, "shape", None), getattr(value, "dtype", type(value)))).encode())
    digest.update(f"{baseline:.8e}".encode())
    digest.update(json.dumps(dataclasses.asdict(settings), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain dict per finished trial: number, state, params, metric, loss, speedup, feasible, error.

    Queued (not yet run) and running trials are left out.
    """
    rows = []
    for trial in study.get_trials(deepcopy=False, states=FINISHED):
        attrs = trial.user_attrs
        constraint = trial.system_attrs.get("constraints:accuracy_loss")
        rows.append({
            "number": trial.number,
            "state": trial.state.name,
            "params": dict(trial.params),
            "metric": attrs.get("metric"),
            "loss": attrs.get("loss"),
            "speedup": attrs.get("speedup"),
            "int8_ms": attrs.get("int8_ms"),
            "fp32_ms": attrs.get("fp32_ms"),
            "feasible": constraint is not None and constraint <= 0,
            "plan": attrs.get("plan"),
            "plan_key": attrs.get("plan_key"),
            "error": attrs.get("error"),
            "seconds": trial.duration.total_seconds() if trial.duration else None,
        })
    return rows


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluated trials that no other trial beats in both loss (lower) and speedup (higher)."""
    evaluated = [r for r in rows if r["state"] == "COMPLETE" and r["loss"] is not None and r["speedup"] is not None]
    front = []
    for row in evaluated:
        dominated = any(
            other["loss"] <= row["loss"] and other["speedup"] >= row["speedup"]
            and (other["loss"] < row["loss"] or other["speedup"] > row["speedup"])
            for other in evaluated
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda r: (r["loss"], -r["speedup"]))


def best_row(rows: list[dict[str, Any]], speed_tie: float = SPEED_TIE) -> tuple[dict[str, Any] | None, bool]:
    """The fastest feasible trial (True), else the lowest-loss evaluated trial (False).

    Feasible trials within `speed_tie` (fraction) of the fastest count as equally fast (that is
    measurement noise); among them the lowest loss wins.
    """
    evaluated = [r for r in rows if r["state"] == "COMPLETE" and r["loss"] is not None and math.isfinite(r["loss"])]
    feasible = [r for r in evaluated if r["feasible"]]
    if feasible:
        fastest = max(r["speedup"] for r in feasible)
        tied = [r for r in feasible if r["speedup"] >= fastest * (1 - speed_tie)]
        return min(tied, key=lambda r: (r["loss"], -r["speedup"])), True
    if evaluated:
        return min(evaluated, key=lambda r: (r["loss"], -r["speedup"])), False
    return None, False


def layer_timings(study: optuna.Study) -> list[dict[str, Any]]:
    """The per-layer kernel timings 'measured' trials of `study` stored (LayerTimer.records() format)."""
    return list(study.user_attrs.get(LAYER_TIMINGS_ATTR, []))


def store_layer_timings(study: optuna.Study, records: list[dict[str, Any]]) -> None:
    """Merge `records` into the study's layer timings (other workers may have added theirs)."""
    def key(record: dict[str, Any]) -> tuple:
        return record["layer"], record["module"], json.dumps(record["shape"], sort_keys=True)
    merged = {key(record): record for record in layer_timings(study)}
    merged.update((key(record), record) for record in records)
    study.set_user_attr(LAYER_TIMINGS_ATTR, list(merged.values()))
