"""Time-series task: an LSTM classifier trained on a UCR/UEA set bundled with ``sktime``.

sktime's ``.ts`` data files are read as files; the package is never imported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from autoq.run.datasets import installed_file
from autoq_zoo.task import Task
from autoq_zoo.training import CACHE_VERSION, cached, resolve_cache_dir, train_classifier

# UCR/UEA sets bundled with sktime: <dir>/<NAME>/<NAME>_TRAIN.ts and _TEST.ts.
_UCR_PACKAGE, _UCR_DATA_DIR, _UCR_PIP_ARGS = "sktime", "datasets/data", "sktime"
# LSTM on a UCR set (ItalyPowerDemand: 67 training series of 24 steps): Adam with a one-cycle
# schedule, ~1 s single-threaded. 1 layer and 60 epochs were the steadiest of {1, 2} x {30, 60}
# over seeds 0-4 (val 0.953-0.971); 2 layers gain nothing and one seed of them fell to 0.938.
_UCR_EPOCHS = 60
_UCR_TRAIN_BATCH_SIZE = 16
_UCR_LEARNING_RATE = 1e-2


def ucr_dataset(name: str, split: str) -> tuple[Tensor, Tensor]:
    """A UCR/UEA time-series classification set bundled with ``sktime`` (read as files, never imported).

    ``name`` is a folder of ``sktime/datasets/data`` holding equal-length series without missing
    values, e.g. "ItalyPowerDemand" (67 train / 1029 test series of 24 steps, 2 classes),
    "GunPoint", "ArrowHead", "OSULeaf" or "BasicMotions" (6 channels); ``split`` is "train" or
    "test" (the archive's official split). Returns ``(series, labels)``: float32 ``[N, steps,
    channels]`` values as stored (``ucr_inputs`` z-normalizes them) and int64 ``[N]`` labels, the
    index of each series' class in the file's ``@classLabel`` list.
    """
    if split not in ("train", "test"):
        raise ValueError(f"UCR split must be 'train' or 'test'; got {split!r}.")
    relative_path = f"{_UCR_DATA_DIR}/{name}/{name}_{split.upper()}.ts"
    try:
        path = installed_file(_UCR_PACKAGE, relative_path, _UCR_PIP_ARGS)
    except FileNotFoundError:
        # sktime is installed (else ModuleNotFoundError): tell a wrong name from a broken install.
        spec = importlib.util.find_spec(_UCR_PACKAGE)
        data_dir = Path(next(iter(spec.submodule_search_locations))) / _UCR_DATA_DIR
        bundled = sorted(file.parent.name for file in data_dir.glob("*/*_TRAIN.ts"))
        if name not in bundled:
            raise ValueError(
                f"sktime bundles no time-series set {name!r}; it has {', '.join(bundled)}."
            ) from None
        raise
    return _read_ts(path)


def ucr_inputs(series: Tensor) -> Tensor:
    """Float ``[N, steps, channels]`` series -> each series z-normalized over time, per channel.

    Uses the sample standard deviation, as the UCR archive does (its univariate sets are stored
    z-normalized already, so this leaves them as they are); a constant series becomes zeros.
    """
    mean = series.mean(dim=1, keepdim=True)
    std = series.std(dim=1, keepdim=True)
    return ((series - mean) / std.clamp_min(1e-8)).float()


class LSTMClassifier(nn.Module):
    """An ``nn.LSTM`` (batch_first) and a linear head on its last step's output, as one module.

    ``forward(series)`` (float32 ``[N, steps, channels]``) returns logits ``[N, classes]``.
    """

    def __init__(self, channels: int, hidden_size: int, num_layers: int, num_classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(channels, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, series: Tensor) -> Tensor:
        outputs, _ = self.lstm(series)
        return self.head(outputs[:, -1])


def ucr_lstm_task(
    name: str = "ItalyPowerDemand",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 1,
    batch_size: int = 32,
    calib_batches: int = 2,
    cache_dir: Path | None = None,
) -> Task:
    """An ``LSTMClassifier`` trained on a UCR time-series set bundled with sktime (``ucr_dataset``).

    The model is trained from scratch with ``seed`` on the official train split (Adam, 60 epochs
    of batches of 16, one-cycle learning rate 0.01; ~1 s single-threaded for ItalyPowerDemand).
    The official test split is shuffled with ``seed`` and halved: val is the first half (514 of
    ItalyPowerDemand's 1029 series), test the rest (515). Model inputs are ``ucr_inputs``: float32
    ``[N, steps, channels]``, each series z-normalized over time; ``val`` and ``test`` hold them
    already (``preprocess`` is None). ``calib`` is ``calib_batches`` batches of ``batch_size``
    training series in file order and ``example_inputs`` its first batch; evaluation runs in
    batches of ``batch_size`` too (dynamic quantization picks activation ranges per batch). The
    ``nn.LSTM`` and the head are what ``quantize_dynamic`` converts.

    At the defaults (ItalyPowerDemand, seed 0, 64 hidden units, 1 layer) FP32 accuracy is
    0.963 on val and 0.971 on test; PyTorch's default dynamic int8 (``quantize_dynamic``) gets
    0.961 and 0.971 in batches of 32. The state_dict (~70 KB) is cached under ``cache_dir``
    (default ``$AUTOQ_CACHE`` or ``~/.cache/autoq``), keyed by a digest of the training code and
    hyper-parameters, so editing them retrains.
    """
    if min(hidden_size, num_layers, batch_size, calib_batches) < 1:
        raise ValueError(
            "hidden_size, num_layers, batch_size and calib_batches must all be positive; got "
            f"{hidden_size}, {num_layers}, {batch_size}, {calib_batches}."
        )
    train_series, train_labels = ucr_dataset(name, "train")
    test_series, test_labels = ucr_dataset(name, "test")
    n_calib = calib_batches * batch_size
    if n_calib > len(train_labels):
        raise ValueError(
            f"{name} has {len(train_labels)} training series, fewer than the {n_calib} calibration "
            f"series requested (calib_batches {calib_batches} x batch_size {batch_size}); lower them."
        )
    if train_series.shape[1:] != test_series.shape[1:]:
        raise ValueError(
            f"{name}'s train and test series differ in (steps, channels): "
            f"{tuple(train_series.shape[1:])} vs {tuple(test_series.shape[1:])}."
        )
    train_inputs = ucr_inputs(train_series)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    architecture = (train_series.shape[2], hidden_size, num_layers, num_classes)
    cache_file = resolve_cache_dir(cache_dir) / (
        f"ucr_lstm-v{CACHE_VERSION}-{name}-seed{seed}-h{hidden_size}-l{num_layers}-"
        f"{_ucr_lstm_code_digest()}.pt"
    )
    state = cached(cache_file, lambda: _train_ucr_lstm(train_inputs, train_labels, architecture, seed))
    with torch.device("meta"):
        model = LSTMClassifier(*architecture)
    model.load_state_dict(state, assign=True)
    model.eval()

    order = torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(seed))
    val_rows, test_rows = order[: len(order) // 2], order[len(order) // 2 :]
    test_inputs = ucr_inputs(test_series)
    calib = list(train_inputs[:n_calib].split(batch_size))
    return Task(
        name=f"ucr_lstm_{name}",
        model=model,
        example_inputs=(calib[0],),
        calib=calib,
        val=(test_inputs[val_rows], test_labels[val_rows]),
        test=(test_inputs[test_rows], test_labels[test_rows]),
        preprocess=None,
        batch_size=batch_size,
        train=(train_inputs, train_labels),
    )


def _read_ts(path: Path) -> tuple[Tensor, Tensor]:
    """Parse a classification ``.ts`` file (sktime's format) of equal-length series without missing values.

    ``#`` lines are comments, ``@`` lines the header up to ``@data``; then one series per line:
    each channel's comma-separated values, channels and the final class label separated by ``:``.
    """
    classes: list[str] | None = None
    rows: list[list[str]] = []
    in_data = False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if in_data:
            rows.append(line.split(":"))
            continue
        key, *values = line.split()
        if key.lower() == "@classlabel" and values and values[0].lower() == "true":
            classes = values[1:]
        elif key.lower() == "@data":
            in_data = True
    if not classes or not rows:
        raise ValueError(
            f"{path} is not a time-series classification file (class labels {classes}, "
            f"{len(rows)} series); pick a UCR classification set such as 'ItalyPowerDemand'."
        )
    series, labels = [], []
    for number, (*channels, label) in enumerate(rows, 1):
        try:
            values = [[float(value) for value in channel.split(",")] for channel in channels]
        except ValueError as error:
            raise ValueError(
                f"{path}, series {number}: {error}; autoq_zoo reads plain comma-separated values "
                f"(no timestamps, no '?' for missing values)."
            ) from None
        lengths = {len(channel) for channel in values}
        if label not in classes or len(lengths) != 1 or not np.isfinite(values).all():
            raise ValueError(
                f"{path}, series {number}: autoq_zoo reads equal-length series without missing values "
                f"and a label in {classes}; got channel lengths {sorted(lengths)} and label {label!r}."
            )
        series.append(values)
        labels.append(classes.index(label))
    shapes = {np.shape(values) for values in series}
    if len(shapes) != 1:
        raise ValueError(
            f"{path} holds series of {len(shapes)} different shapes (channels, steps), e.g. "
            f"{sorted(shapes)[:3]}; autoq_zoo reads equal-length sets only."
        )
    array = np.asarray(series, dtype=np.float32).transpose(0, 2, 1)  # [N, steps, channels]
    return torch.from_numpy(np.ascontiguousarray(array)), torch.tensor(labels, dtype=torch.int64)


def _train_ucr_lstm(
    inputs: Tensor, labels: Tensor, architecture: tuple[int, int, int, int], seed: int
) -> dict[str, Tensor]:
    """Train ``LSTMClassifier(*architecture)`` (Adam, one-cycle), single-threaded.

    Steps of 16 short series are too small to split across threads; on a busy 2-core machine the
    default ItalyPowerDemand model trained in 28 s with two threads and 1.1 s with one. One thread
    also keeps the weights independent of the machine's core count.
    """
    return train_classifier(functools.partial(LSTMClassifier, *architecture), inputs, labels, seed,
                             epochs=_UCR_EPOCHS, batch_size=_UCR_TRAIN_BATCH_SIZE,
                             learning_rate=_UCR_LEARNING_RATE, threads=1)


def _ucr_lstm_code_digest() -> str:
    """8 hex digits of the LSTM task's training code and hyper-parameters, for its cache key."""
    parts = [repr((_UCR_EPOCHS, _UCR_TRAIN_BATCH_SIZE, _UCR_LEARNING_RATE))]
    for function in (LSTMClassifier, ucr_inputs, _read_ts, _train_ucr_lstm, train_classifier):
        try:
            parts.append(inspect.getsource(function))
        except (OSError, TypeError):  # no source (e.g. a frozen install): fall back to the name
            parts.append(function.__qualname__)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]
