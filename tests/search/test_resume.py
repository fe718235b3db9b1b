"""Stopping and resuming for real: kill -9 of a CLI run, then the same command; dead workers' trials."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from autoq.search.study import (
    FINISHED, STOPPED_ATTR, SURPLUS_ATTR, WORKER_ATTR, counted_trials, interrupted_trials, is_surplus,
    reclaim_interrupted, trial_rows,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mnist_cnn.toml"
TRIALS = 18  # more than the run file's 12: the resumed run reaches the killed trial's retry, queued after the sweep


def autoq_command(storage: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "autoq.cli", "tune", str(EXAMPLE), "--storage", storage, "--trials", str(TRIALS),
            "--out", str(out), "--quiet"]


def wait_for(condition, process, seconds=180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before it could be killed mid-trial")
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_stopped_mid_trial_then_the_same_command_resumes(tmp_path, stop):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = autoq_command(storage, tmp_path / "out")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def running_after_two_measured():
        try:  # the run may be creating the database's tables right now (locked, or both stamp alembic's version)
            names = optuna.get_all_study_names(storage) if (tmp_path / "study.db").exists() else []
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            return None
        if not names:
            return None
        study = optuna.load_study(study_name=names[0], storage=storage)
        trials = study.get_trials(deepcopy=False)
        # measured trials: where int8 does not beat the FP32 seeds (AVX2 CPUs), most are pruned as slower
        measured = [t for t in trials
                    if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "speedup" in t.user_attrs]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        # mid-trial: its parameters are chosen (a trial killed before that is re-run with new ones)
        return (study, running[0].number) if len(measured) >= 2 and running and running[0].params else None

    try:
        study, killed = wait_for(running_after_two_measured, process)
        os.kill(process.pid, stop)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    if stop == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
        assert study.trials[killed].state == TrialState.RUNNING  # left behind by the dead process
    else:
        assert process.returncode == 130 and "autoq resume" in err, err[-3000:]
        assert study.trials[killed].state == TrialState.FAIL and study.trials[killed].user_attrs[STOPPED_ATTR]
    before = {t.number: (t.state, t.value, dict(t.user_attrs)) for t in study.get_trials(states=FINISHED)}

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name=study.study_name, storage=storage)
    after = {t.number: t for t in study.get_trials()}
    # finished trials are kept as they were, and none of their plans is measured again
    assert {n: (after[n].state, after[n].value, dict(after[n].user_attrs)) for n in before if n != killed} == {
        n: value for n, value in before.items() if n != killed}
    measured_before = {attrs["plan_key"] for state, _, attrs in before.values() if state == TrialState.COMPLETE}
    new = [t for n, t in after.items() if n not in before and t.state == TrialState.COMPLETE]
    assert all(t.user_attrs["plan_key"] not in measured_before or "duplicate_of_plan" in t.user_attrs for t in new)
    # the killed trial is failed, re-run once with the same parameters, and does not count
    retry = interrupted_trials(study)[killed]
    assert after[killed].state == TrialState.FAIL and after[retry].state in FINISHED
    assert after[killed].params.items() <= after[retry].params.items()  # killed mid-suggest: the rest is new
    assert not [t for t in after.values() if t.state == TrialState.RUNNING]
    assert counted_trials(study) == TRIALS
    assert "interrupted" in next(row["error"] for row in trial_rows(study) if row["number"] == killed)
    assert (tmp_path / "out" / "model.autoq").is_file()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_trials_cut_short_on_this_machine_are_requeued(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    distribution = optuna.distributions.CategoricalDistribution(["a", "b"])
    host = socket.gethostname()
    workers = {"dead here": f"{host}:{dead_pid()}", "alive here": f"{host}:{os.getpid()}",
               "other machine": f"elsewhere.example:{dead_pid()}", "ctrl-c": f"{host}:{dead_pid()}",
               "failed candidate": f"{host}:{dead_pid()}"}
    numbers = {}
    for label, worker in workers.items():
        trial = study.ask({"x": distribution})
        trial.set_user_attr(WORKER_ATTR, worker)
        numbers[label] = trial.number
        if label == "ctrl-c":
            trial.set_user_attr(STOPPED_ATTR, True)
        if label in ("ctrl-c", "failed candidate"):
            study.tell(trial, state=TrialState.FAIL)
    assert reclaim_interrupted(study) == [numbers["dead here"], numbers["ctrl-c"]]
    states = {label: study.trials[number].state for label, number in numbers.items()}
    assert states == {"dead here": TrialState.FAIL, "alive here": TrialState.RUNNING,
                      "other machine": TrialState.RUNNING, "ctrl-c": TrialState.FAIL,
                      "failed candidate": TrialState.FAIL}
    for label in ("dead here", "ctrl-c"):
        retry = study.trials[interrupted_trials(study)[numbers[label]]]
        assert retry.state == TrialState.WAITING and retry.params == study.trials[numbers[label]].params
        assert not retry.user_attrs  # a clean re-run: no stale plan, worker or stop mark
    assert reclaim_interrupted(study) == []  # each is re-queued once
    # cut-short trials do not count toward n_trials, a failed candidate does (running ones when asked)
    assert counted_trials(study) == 1 and counted_trials(study, running=True) == 3


HOLD = """
import sys, time
from autoq.measure.lock import measurement_lock
with measurement_lock(True, sys.argv[1]):
    start = time.time(); time.sleep(0.4); print(start, time.time())
"""


def test_measurement_lock_makes_workers_on_one_machine_take_turns(tmp_path):
    lock = str(tmp_path / "measure.lock")
    workers = [subprocess.Popen([sys.executable, "-c", HOLD, lock], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    spans = sorted(tuple(map(float, worker.communicate(timeout=60)[0].split())) for worker in workers)
    assert len(spans) == 3
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:]))  # no overlap


def test_a_trial_whose_worker_on_another_machine_stops_beating_is_rerun(tmp_path, monkeypatch):
    from autoq.search import study as study_module

    monkeypatch.setattr(study_module, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(study_module, "GRACE_SECONDS", 2)
    study, created = study_module.open_study(f"sqlite:///{tmp_path / 's.db'}", "s", optuna.samplers.RandomSampler())
    assert created
    lost = study.ask({"x": optuna.distributions.CategoricalDistribution(["a", "b"])})
    lost.set_user_attr(WORKER_ATTR, "elsewhere.example:1")
    study._storage.record_heartbeat(lost._trial_id)  # then that machine goes silent
    time.sleep(3)
    study.optimize(lambda trial: float(trial.suggest_categorical("x", ["a", "b"]) == "a"), n_trials=1)
    retry = interrupted_trials(study)[lost.number]
    assert study.trials[lost.number].state == TrialState.FAIL
    assert study.trials[retry].state == TrialState.COMPLETE and study.trials[retry].params == lost.params
    assert reclaim_interrupted(study) == [] and counted_trials(study) == 1


def test_a_trial_started_after_the_budget_is_used_up_is_surplus(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    distribution = optuna.distributions.CategoricalDistribution(["a", "b"])
    trials = [study.ask({"x": distribution}) for _ in range(4)]  # started in this order
    study.tell(trials[0], 1.0)
    assert [is_surplus(study, t.number, 3) for t in trials] == [False, False, False, True]
    trials[3].set_user_attr(SURPLUS_ATTR, True)
    study.tell(trials[3], state=TrialState.PRUNED)
    later = study.ask({"x": distribution})
    assert is_surplus(study, later.number, 3)  # still three counting trials before it
    assert counted_trials(study, running=True) == 3 + 1  # surplus trials never count; 'later' is running
