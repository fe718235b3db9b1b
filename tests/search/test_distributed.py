"""Worker processes on one PostgreSQL study: the trial budget is shared exactly, and opening a fresh
database together is safe."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from autoq.search import study as study_module
from autoq.search.study import DROPPED_ATTR, FINISHED, SURPLUS_ATTR, WORKER_ATTR, counted_trials, open_study

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mnist_cnn.toml"
TRIALS = 10


def test_two_workers_share_one_study_without_losing_or_repeating_trials(postgres_url, tmp_path):
    workers = [
        subprocess.Popen([sys.executable, "-m", "autoq.cli", "tune", str(EXAMPLE), "--storage", postgres_url,
                          "--trials", str(TRIALS), "--out", str(tmp_path / f"worker{index}")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in range(2)
    ]
    outputs = [worker.communicate(timeout=900) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]

    (name,) = optuna.get_all_study_names(postgres_url)
    study = optuna.load_study(study_name=name, storage=postgres_url)
    # a worker that started a trial just after the other took the last one marks it surplus: it
    # measures nothing and does not count
    surplus = [t for t in study.get_trials(states=FINISHED) if t.user_attrs.get(SURPLUS_ATTR)]
    assert all("plan" not in t.user_attrs for t in surplus)
    # nor does a trial of a dropped recipe or of a float plan measured already (it measures nothing either)
    finished = [t for t in study.get_trials(states=FINISHED)
                if not t.user_attrs.get(SURPLUS_ATTR) and not t.user_attrs.get(DROPPED_ATTR)]
    assert len(finished) == TRIALS == counted_trials(study)  # none lost, none extra
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert sorted(t.number for t in finished) == sorted(set(t.number for t in finished))
    by_worker = Counter(t.user_attrs[WORKER_ATTR] for t in finished)
    assert len(by_worker) == 2, by_worker  # both workers ran trials
    measured = [t.user_attrs["plan_key"] for t in finished
                if t.state == TrialState.COMPLETE and "duplicate_of_plan" not in t.user_attrs]
    assert len(measured) == len(set(measured))  # no plan measured twice, by either worker
    # the worker that joined second saw the first one on this machine and warned about timing
    assert any("measure_lock" in err for _, err in outputs)
    for index in range(2):
        assert (tmp_path / f"worker{index}" / "model.autoq").is_file()


# Imports autoq, says it is ready, then opens the study the moment the go-file appears.
OPENER = """
import os, sys, time
import optuna
from autoq.search.study import open_study
url, go_file = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go_file):
    time.sleep(0.001)
study, created = open_study(url, "race", optuna.samplers.RandomSampler())
print("created" if created else "loaded", flush=True)
"""


def test_workers_opening_a_fresh_database_together_all_get_the_study(fresh_postgres_url, tmp_path):
    # they race to create Optuna's tables: the losers see "relation already exists" or a unique-key
    # violation, and must retry rather than fail (without the retry this failed 2 runs in 3)
    go_file = tmp_path / "go"
    openers = [subprocess.Popen([sys.executable, "-c", OPENER, fresh_postgres_url, str(go_file)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for opener in openers:
        assert opener.stdout.readline().strip() == "ready", opener.communicate()[1][-3000:]
    go_file.touch()
    outputs = [opener.communicate(timeout=120) for opener in openers]
    for opener, (_, err) in zip(openers, outputs):
        assert opener.returncode == 0, err[-3000:]
    assert sorted(out.strip() for out, _ in outputs) == ["created", "loaded", "loaded", "loaded"]
    assert optuna.get_all_study_names(fresh_postgres_url) == ["race"]


@pytest.mark.parametrize("lost_race", [
    sqlalchemy.exc.IntegrityError("CREATE TABLE studies", {}, Exception("duplicate key value (pg_type)")),
    sqlalchemy.exc.ProgrammingError("CREATE TABLE studies", {}, Exception('relation "studies" already exists')),
    sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists")),
], ids=["postgres-unique-key", "postgres-duplicate-table", "sqlite-table-exists"])
def test_each_way_of_losing_the_table_creation_race_is_retried(lost_race, tmp_path, monkeypatch):
    real_storage, calls = study_module.RDBStorage, []

    def storage_after_losing_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise lost_race
        return real_storage(*args, **kwargs)

    monkeypatch.setattr(study_module, "RDBStorage", storage_after_losing_once)
    monkeypatch.setattr(study_module.time, "sleep", lambda seconds: None)
    study, created = open_study(f"sqlite:///{tmp_path / 'race.db'}", "race", optuna.samplers.RandomSampler())
    assert created and study.study_name == "race" and len(calls) == 2
