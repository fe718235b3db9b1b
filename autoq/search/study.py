"""Optuna study handling: storage by URL, stable study names for resuming, trial history."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

DEFAULT_RUN_DIR = "autoq-runs"
LAYER_TIMINGS_ATTR = "layer_timings"  # study user attr: in-model per-layer kernel timings ('measured' trials)
SENSITIVITY_ATTR = "sensitivity_sqnr_db"  # study user attr: {recipe: {layer: output SQNR dB quantized alone}}
RUN_ATTR = "autoq_run"  # study user attr: {baseline, config (TuneConfig as a dict), layers: {recipe: [layer]}}
RESULT_ATTR = "autoq_result"  # study user attr: the final choice {plan, accuracy, loss, speedup, latency_ms, ...}
MODEL_ATTR = "model"  # study user attr: fingerprint of the FP32 model (and eval data) its trials measured
SPEED_TIE = 0.02  # speedups this close (fraction) are measurement noise: prefer the lower loss
WORKER_ATTR = "worker"  # trial user attr: "host:pid" of the process that ran it
SURPLUS_ATTR = "surplus"  # trial user attr: started past n_trials by a racing worker; ran nothing, not counted
DROPPED_ATTR = "dropped_recipe"  # trial user attr: drew a recipe dropped as clearly worse; ran nothing, not counted
# SearchSpace fields added since autoq 0.2, at the values that search what it searched without them
# (the defaults but for precisions: the float candidates came later): not hashed there, so studies keep their names
SEARCHED_BEFORE = {"equalizations": ("none", "fold_bn", "cross_layer"), "bias_correction": (False, True),
                   "adaround": (False,), "precisions": ("int8",), "lowerings": ("inductor",)}
NOT_STARTED_ATTR = "not_started"  # trial user attr: would not have fit the timeout (queued again); ran nothing
DROPPED_RECIPES_ATTR = "dropped_recipes"  # study user attr: {recipe: why it was dropped}
STOPPED_ATTR = "stopped"  # trial user attr: the trial was cut short by Ctrl-C (KeyboardInterrupt)
RETRY_OF = "failed_trial"  # trial system attr of a re-run: the number of the trial it replaces (as Optuna's
#                            RetryHeartbeatStaleTrialCallback names it)
WORKER_PREFIX = "worker:"  # study user attrs "worker:host:pid" -> {"started", "measure_lock"}
HEARTBEAT_SECONDS = 30  # a trial whose worker has not beaten for GRACE_SECONDS is retried elsewhere
GRACE_SECONDS = 120
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
_USER_PASSWORD = re.compile(r"(://[^:/@?\s]*):[^\s?]*@")  # "://user:password@" up to the last '@' before '?'
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&#\s]*", re.IGNORECASE)  # libpq's "?password=..."


@contextmanager
def optuna_quiet() -> Iterator[None]:
    """Optuna logs warnings only (not a line per trial) inside the block; its verbosity is restored after."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


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


def redacted(url: str) -> str:
    """`url` with its password shown as '***', for logs, errors and files: user, host and database stay.

    A URL without a password is returned unchanged (so it still opens the study). SQLAlchemy URLs
    with one are rendered by SQLAlchemy; anything else (a journal file path, 'redis://...') has a
    'user:password@' or '?password=' masked. Never raises.
    """
    text = str(url)
    try:
        parsed = sqlalchemy.engine.make_url(text)
        if parsed.password is not None:
            text = parsed.render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: the patterns below still mask a password
        pass
    text = _USER_PASSWORD.sub(r"\1:***@", text)
    return _PASSWORD_PARAMETER.sub(r"\1***", text)


def open_study(url: str, name: str, sampler: optuna.samplers.BaseSampler, *, must_exist: bool = False,
               ) -> tuple[optuna.Study, bool]:
    """The study `name` in storage `url`, created if needed (unless must_exist); True if this call created it.

    The storage keeps a heartbeat per running trial: a trial whose worker died (killed, machine
    lost) is marked failed and queued again with the same parameters by the next worker to look.
    """
    storage = _rdb_storage(url)
    if must_exist and name not in optuna.get_all_study_names(storage):
        raise ValueError(f"There is no study {name!r} to resume in {redacted(url)}: run `autoq tune` first "
                         f"(or check the storage URL, and that the model, data and settings are unchanged: "
                         f"they name the study).")
    try:
        return optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(storage=storage, study_name=name, sampler=sampler), False


def _rdb_storage(url: str, attempts: int = 5) -> RDBStorage:
    """Optuna's RDB storage with a heartbeat; processes opening a fresh database together may race
    to create its tables (the loser sees a unique-key violation, PostgreSQL's "relation already
    exists" or SQLite's "table already exists"), so creation is retried."""
    for attempt in range(1, attempts + 1):
        try:
            return RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)


def worker_id() -> str:
    """This process as a worker: "host:pid"."""
    return f"{socket.gethostname()}:{os.getpid()}"


def register_worker(study: optuna.Study, measure_lock: bool) -> list[str]:
    """Record this worker in the study; return the other live workers on this machine."""
    host = socket.gethostname()
    others = []
    for key in study.user_attrs:
        if key.startswith(f"{WORKER_PREFIX}{host}:"):
            pid = int(key.rsplit(":", 1)[1])
            if pid != os.getpid() and _alive(pid):
                others.append(key[len(WORKER_PREFIX):])
    study.set_user_attr(f"{WORKER_PREFIX}{worker_id()}", {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "measure_lock": measure_lock,
    })
    return others


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_interrupted(study: optuna.Study) -> list[int]:
    """Re-queue trials that were cut short: running trials whose worker on this machine no longer
    exists (kill -9, crash) and trials stopped by Ctrl-C. Returns their numbers.

    Each is failed (if still marked running) and queued again once with the same parameters.
    Trials of workers on other machines are left to the storage heartbeat.
    """
    host = socket.gethostname()
    requeued = interrupted_trials(study)
    reclaimed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        worker_host, _, pid = trial.user_attrs.get(WORKER_ATTR, "").rpartition(":")
        dead = trial.state == TrialState.RUNNING and worker_host == host and pid.isdigit() and not _alive(int(pid))
        stopped = trial.state == TrialState.FAIL and trial.user_attrs.get(STOPPED_ATTR)
        if (dead or stopped) and trial.number not in requeued:
            if dead:
                study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
                system_attrs={RETRY_OF: trial.number}))
            reclaimed.append(trial.number)
    return reclaimed


def interrupted_trials(study: optuna.Study) -> dict[int, int]:
    """{number of a trial cut short (worker died, Ctrl-C): number of the trial that re-runs it}."""
    return {trial.system_attrs[RETRY_OF]: trial.number for trial in study.get_trials(deepcopy=False)
            if RETRY_OF in trial.system_attrs}


def _counting(study: optuna.Study, states: tuple) -> list[optuna.trial.FrozenTrial]:
    interrupted = interrupted_trials(study)
    return [trial for trial in study.get_trials(deepcopy=False, states=states)
            if trial.number not in interrupted and not _ran_nothing(trial)]


def _ran_nothing(trial: optuna.trial.FrozenTrial) -> bool:
    """Surplus trials, trials of a dropped recipe and trials the timeout left no time for: pruned at
    once, not counted, not listed."""
    return any(trial.user_attrs.get(attr) for attr in (SURPLUS_ATTR, DROPPED_ATTR, NOT_STARTED_ATTR))


def counted_trials(study: optuna.Study, running: bool = False) -> int:
    """Trials that count toward n_trials: finished ones (and running ones if asked), neither
    interrupted nor surplus nor of a dropped recipe."""
    return len(_counting(study, (*FINISHED, TrialState.RUNNING) if running else FINISHED))


def is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Whether trial `number` started after the study already had n_trials counting trials.

    Workers check the budget before asking for a trial, but two finishing together can both
    start one: all workers order started trials the same way (start time, then number), so
    exactly the late ones find they are surplus.
    """
    started = sorted(_counting(study, (*FINISHED, TrialState.RUNNING)),
                     key=lambda trial: (trial.datetime_start, trial.number))
    return [trial.number for trial in started].index(number) >= n_trials


def fingerprint(model: torch.nn.Module, example_inputs: tuple, baseline: float, settings: Any = None,
                calib_samples: int | None = None) -> str:
    """A short hash of what makes trials comparable: weights, input shapes, baseline metric, settings
    (None: the model alone, as `check_same_model` compares it) and the calibration samples when a
    timeout cut them (their count sets the calib_samples choices)."""
    digest = hashlib.sha1()
    digest.update(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        values = tensor.detach().double()
        digest.update(f"{name}{tuple(tensor.shape)}{float(values.sum()):.6e}{float(values.abs().sum()):.6e}".encode())
    for value in example_inputs:
        digest.update(str((getattr(value, "shape", None), getattr(value, "dtype", type(value)))).encode())
    digest.update(f"{baseline:.8e}".encode())
    fields = dataclasses.asdict(settings) if settings is not None else {}
    if "kernels" in fields:  # hashed under its name before autoq 0.3, so existing studies keep their names
        fields["engines"] = fields.pop("kernels")
    for name, before in SEARCHED_BEFORE.items():
        if fields.get(name) == before:
            fields.pop(name)
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    if calib_samples is not None:
        digest.update(f"calibration cut to {calib_samples} samples".encode())
    return digest.hexdigest()[:12]


def claim_for_model(study: optuna.Study, model_id: str) -> None:
    """Mark `study` as measuring the model `model_id` (`fingerprint(model, inputs, baseline)`); refuse a
    study whose trials measured another one: a fixed study_name reused for another model, other
    example inputs or other evaluation data (its outcomes would be judged as this model's)."""
    stored = study.user_attrs.get(MODEL_ATTR)
    if stored is not None and stored != model_id:
        raise ValueError(f"study '{study.study_name}' holds trials of another model (or other example inputs, "
                         f"evaluation data or confirmation split): their outcomes do not apply to this one. "
                         f"Pass another study_name (or none: autoq names studies after the model), or delete it.")
    study.set_user_attr(MODEL_ATTR, model_id)


def trial_rows(study: optuna.Study, judge: Callable[[float], float] | None = None,
               max_loss: float | None = None) -> list[dict[str, Any]]:
    """One plain dict per finished trial: number, state, params, metric, loss, loss_upper, speedup,
    speedup_interval, feasible, error, worker ("host:pid"), seconds (its duration) and finished (Unix
    time it ended). Queued (not yet run), running and surplus trials are left out.

    judge(metric) -> loss and max_loss: re-judge every trial by the current settings (a study resumed
    with another budget, loss type or direction); without them, the feasibility stored at trial time.
    """
    rows = []
    interrupted = interrupted_trials(study)
    for trial in study.get_trials(deepcopy=False, states=FINISHED):
        attrs = trial.user_attrs
        if _ran_nothing(trial):
            continue
        error = attrs.get("error")
        if trial.number in interrupted:
            error = f"interrupted (worker died or stopped); re-run as trial {interrupted[trial.number]}"
        constraint = trial.system_attrs.get("constraints:accuracy_loss")
        loss, feasible = attrs.get("loss"), constraint is not None and constraint <= 0
        if judge is not None and attrs.get("metric") is not None:
            loss = judge(attrs["metric"])
            feasible = trial.state == optuna.trial.TrialState.COMPLETE and loss <= max_loss
        rows.append({
            "number": trial.number,
            "state": trial.state.name,
            "params": dict(trial.params),
            "metric": attrs.get("metric"),
            "loss": loss,
            "loss_upper": attrs.get("loss_upper") if loss == attrs.get("loss") else None,
            "speedup": attrs.get("speedup"),
            "speedup_interval": attrs.get("speedup_interval"),
            "int8_ms": attrs.get("int8_ms"),
            "fp32_ms": attrs.get("fp32_ms"),
            "feasible": feasible,
            "plan": attrs.get("plan"),
            "plan_key": attrs.get("plan_key"),
            "error": error,
            "worker": attrs.get(WORKER_ATTR),
            "seconds": trial.duration.total_seconds() if trial.duration else None,
            "finished": trial.datetime_complete.timestamp() if trial.datetime_complete else None,
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
