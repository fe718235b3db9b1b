"""Several worker processes share one Optuna study on the test harness's PostgreSQL server."""

import subprocess
import sys
from collections import Counter

import optuna
import pytest

WORKERS = 2
TRIALS_PER_WORKER = 8
HEARTBEAT_SECONDS = 1

# A worker as autoq runs one: its own process, the shared study loaded from an RDB storage with a heartbeat.
WORKER = """
import os, sys, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, study_name, trials, heartbeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
storage = optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=4 * heartbeat)
study = optuna.load_study(study_name=study_name, storage=storage)

def objective(trial):
    trial.set_user_attr("worker_pid", os.getpid())
    return trial.suggest_float("x", -1.0, 1.0) ** 2

study.optimize(objective, n_trials=trials)
"""


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeat_interval
def test_worker_processes_share_one_study(postgres_url):
    storage = optuna.storages.RDBStorage(postgres_url, heartbeat_interval=HEARTBEAT_SECONDS)
    study = optuna.create_study(study_name="shared", storage=storage, direction="minimize")

    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, postgres_url, study.study_name, str(TRIALS_PER_WORKER),
                          str(HEARTBEAT_SECONDS)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(WORKERS)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr

    trials = study.get_trials(deepcopy=False)
    assert len(trials) == WORKERS * TRIALS_PER_WORKER
    assert sorted(trial.number for trial in trials) == list(range(WORKERS * TRIALS_PER_WORKER))
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    trials_per_worker = Counter(trial.user_attrs["worker_pid"] for trial in trials)
    assert sorted(trials_per_worker.values()) == [TRIALS_PER_WORKER] * WORKERS
