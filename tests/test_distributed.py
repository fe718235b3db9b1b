"""Two workers (separate processes) on one PostgreSQL study: the trial budget is shared exactly."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autoq.search.study import FINISHED, SURPLUS_ATTR, WORKER_ATTR, counted_trials

EXAMPLE = Path(__file__).parent.parent / "examples" / "mnist_cnn.toml"
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
    finished = [t for t in study.get_trials(states=FINISHED) if not t.user_attrs.get(SURPLUS_ATTR)]
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
