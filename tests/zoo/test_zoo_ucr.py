"""An LSTM classifier on a UCR time-series set bundled with sktime (autoq_zoo.ucr_lstm_task).

Training the default model (ItalyPowerDemand) takes ~1 s single-threaded; its state_dict is cached
under ``~/.cache/autoq`` (or ``$AUTOQ_CACHE``), so later runs build the task in well under 1 s.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.ao.nn.quantized import dynamic as nnqd

import autoq
import autoq_zoo as zoo
from autoq_zoo import LSTMClassifier, Task

# Measured at the defaults (seed 0): FP32 0.963 val / 0.971 test; default dynamic int8 0.961 val.
MIN_FP32_ACCURACY = 0.93
MAX_INT8_DROP = 0.02


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Evaluate single-threaded: on a busy 2-core machine, 2 threads made the FP32 LSTM's val pass
    take ~5 s instead of 0.03 s (tiny per-step matmuls, threads waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task() -> Task:
    rng_state = torch.get_rng_state()
    task = zoo.ucr_lstm_task()
    assert torch.equal(torch.get_rng_state(), rng_state), "building must not consume the caller's RNG"
    return task


def _rows(series: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in series]


def test_ucr_dataset_reads_the_official_italy_power_demand_split() -> None:
    train_series, train_labels = zoo.ucr_dataset("ItalyPowerDemand", "train")
    test_series, test_labels = zoo.ucr_dataset("ItalyPowerDemand", "test")
    assert train_series.shape == (67, 24, 1) and test_series.shape == (1029, 24, 1)
    assert train_series.dtype == test_series.dtype == torch.float32
    assert train_labels.dtype == test_labels.dtype == torch.int64
    assert train_labels.bincount().tolist() == [34, 33] and test_labels.bincount().tolist() == [513, 516]
    # First training series of the file: -0.71051757,-1.1833204,... with class "1" (index 0).
    assert train_series[0, :2, 0].tolist() == pytest.approx([-0.71051757, -1.1833204])
    assert train_labels[0] == 0
    # The archive stores these series z-normalized already (sample std), so ucr_inputs keeps them.
    assert torch.allclose(zoo.ucr_inputs(train_series), train_series, atol=1e-5)
    assert not set(_rows(train_series)) & set(_rows(test_series))


def test_ucr_dataset_reads_multivariate_sets_as_steps_by_channels() -> None:
    series, labels = zoo.ucr_dataset("BasicMotions", "train")
    assert series.shape == (40, 100, 6) and labels.bincount().tolist() == [10, 10, 10, 10]


def test_unusable_sets_are_rejected_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="no time-series set 'Nope'; it has .*ItalyPowerDemand"):
        zoo.ucr_dataset("Nope", "train")
    with pytest.raises(ValueError, match="not a time-series classification file"):
        zoo.ucr_dataset("Covid3Month", "train")  # a regression set
    with pytest.raises(ValueError, match="equal-length sets only"):
        zoo.ucr_dataset("JapaneseVowels", "train")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        zoo.ucr_dataset("ItalyPowerDemand", "val")
    with pytest.raises(ValueError, match="67 training series, fewer than the 128 calibration"):
        zoo.ucr_lstm_task(calib_batches=4)


def test_missing_sktime_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "sktime" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match="pip install sktime"):
        zoo.ucr_lstm_task()


def test_a_broken_sktime_install_says_reinstall(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "datasets" / "data" / "ItalyPowerDemand").mkdir(parents=True)
    (tmp_path / "datasets" / "data" / "ItalyPowerDemand" / "ItalyPowerDemand_TRAIN.ts").write_text("")
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        if name == "sktime":
            return SimpleNamespace(submodule_search_locations=[str(tmp_path)])
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match="pip install --force-reinstall sktime"):
        zoo.ucr_dataset("ItalyPowerDemand", "test")


def test_inputs_and_splits(task: Task) -> None:
    assert task.name == "ucr_lstm_ItalyPowerDemand" and task.preprocess is None and task.batch_size == 32
    assert isinstance(task.model, LSTMClassifier) and not task.model.training
    assert task.model.lstm.batch_first and task.model.lstm.hidden_size == 64
    assert len(task.calib) == 2 and all(batch.shape == (32, 24, 1) for batch in task.calib)
    assert len(task.example_inputs) == 1 and torch.equal(task.example_inputs[0], task.calib[0])
    (val_inputs, val_labels), (test_inputs, test_labels) = task.val, task.test
    assert val_inputs.shape == (514, 24, 1) and test_inputs.shape == (515, 24, 1)
    assert val_labels.shape == (514,) and test_labels.shape == (515,)
    for inputs in (val_inputs, test_inputs, *task.calib):
        assert inputs.dtype == torch.float32
        assert torch.allclose(inputs.mean(dim=1), torch.zeros(1), atol=1e-5)
        assert torch.allclose(inputs.std(dim=1), torch.ones(1), atol=1e-5)

    # val and test are disjoint halves of the official test split, with their own labels; calib
    # comes from the official train split.
    official_train, _ = zoo.ucr_dataset("ItalyPowerDemand", "train")
    official_test, official_labels = zoo.ucr_dataset("ItalyPowerDemand", "test")
    label_of = dict(zip(_rows(zoo.ucr_inputs(official_test)), official_labels.tolist()))
    val_rows, test_rows = _rows(val_inputs), _rows(test_inputs)
    assert len(set(val_rows)) == 514 and len(set(test_rows)) == 515 and not set(val_rows) & set(test_rows)
    assert set(val_rows) | set(test_rows) == set(label_of)
    assert [label_of[row] for row in val_rows] == val_labels.tolist()
    assert [label_of[row] for row in test_rows] == test_labels.tolist()
    train_rows = set(_rows(zoo.ucr_inputs(official_train)))
    assert all(row in train_rows for batch in task.calib for row in _rows(batch))
    train_inputs, train_labels = task.train
    assert set(_rows(train_inputs)) == train_rows and len(train_labels) == len(official_train) == 67
    assert val_labels.bincount().min() > 200  # both classes well represented in each half


def test_the_seed_fixes_the_split(task: Task) -> None:
    again = zoo.ucr_lstm_task()
    assert torch.equal(again.val[0], task.val[0]) and torch.equal(again.test[1], task.test[1])
    for name, tensor in task.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name


def test_training_is_deterministic_and_cached(task: Task, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    try:
        fresh = zoo.ucr_lstm_task(cache_dir=tmp_path)  # trains again (~1 s), single-threaded
        assert torch.get_num_threads() == 2, "training must restore the caller's thread count"
    finally:
        torch.set_num_threads(1)
    for name, tensor in task.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], tensor), name
    [cache_file] = tmp_path.iterdir()
    assert cache_file.name.startswith("ucr_lstm-v") and "ItalyPowerDemand-seed0-h64-l1-" in cache_file.name


def test_the_cache_key_follows_the_training_code(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = zoo.series._ucr_lstm_code_digest()
    assert len(digest) == 8 and digest == zoo.series._ucr_lstm_code_digest()
    monkeypatch.setattr(zoo.series, "_UCR_EPOCHS", zoo.series._UCR_EPOCHS + 1)
    assert zoo.series._ucr_lstm_code_digest() != digest


def test_fp32_accuracy(task: Task) -> None:
    assert task.accuracy(task.model, "val") >= MIN_FP32_ACCURACY
    assert task.accuracy(task.model, "test") >= MIN_FP32_ACCURACY


def test_default_dynamic_int8_keeps_the_accuracy(task: Task) -> None:
    quantized = autoq.quantize(task.model, autoq.QuantPlan(recipe="dynamic"), task.example_inputs, [])
    assert isinstance(quantized.lstm, nnqd.LSTM) and isinstance(quantized.head, nnqd.Linear)
    fp32, int8 = task.accuracy(task.model, "val"), task.accuracy(quantized, "val")
    assert int8 >= fp32 - MAX_INT8_DROP, (fp32, int8)
    assert isinstance(task.model.lstm, torch.nn.LSTM), "quantize must not modify the FP32 model"
