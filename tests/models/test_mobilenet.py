"""MobileNetV2 with its real ImageNet weights (Fashion-MNIST probe head)."""

import pytest
import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.intrinsic import quantized as nniq

import autoq
import autoq_zoo as zoo
from autoq.recipes.static import StaticBuilder
from conftest import fast_settings

INT8_CONVS = (nnq.Conv2d, nniq.ConvReLU2d)


@pytest.fixture(scope="module")
def small_task():
    """96 px inputs and few images keep this fast; the weights are the real ImageNet ones."""
    return zoo.mobilenet_fashion_task(resolution=96, n_train=300, n_val=200, n_test=200,
                                      calib_batches=2, calib_batch_size=16)


@pytest.fixture(scope="module")
def builder(small_task):
    return StaticBuilder(small_task.model, small_task.example_inputs, [(b,) for b in small_task.calib])


def test_every_conv_and_the_classifier_are_tunable_layers(builder, small_task):
    expected = [n for n, m in small_task.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # BN is folded into the conv, so the fused module keeps the conv's parent name
    assert len(builder.layers) == len(expected) == 53
    assert builder.layers[0] == "features.0.0" and builder.layers[-1] == "classifier.1"


def test_named_fallback_layers_stay_fp32_and_all_others_are_int8(builder):
    fallback = ["features.0.0", "features.7.conv.1.0", "classifier.1"]
    model = builder.build(autoq.QuantPlan(engine="onednn", reduce_range=False, fp32_layers=fallback))
    for name in builder.layers:
        module = model.get_submodule(name)
        if name in fallback:
            assert not isinstance(module, (*INT8_CONVS, nnq.Linear)), name
            assert isinstance(module[0] if isinstance(module, nn.Sequential) else module, (nn.Conv2d, nn.Linear))
        else:
            assert isinstance(module, (*INT8_CONVS, nnq.Linear)), name


def test_channels_last_onednn_model_survives_save_and_load(small_task, tmp_path):
    plan = autoq.QuantPlan(engine="onednn", reduce_range=False, activation_observer="kl", channels_last=True)
    model = autoq.quantize(small_task.model, plan, small_task.example_inputs, small_task.calib)
    inputs = small_task.calib[1][:4]
    with torch.no_grad():
        expected = model(inputs)
    autoq.save(model, tmp_path / "m.autoq")
    with torch.no_grad():
        assert torch.equal(autoq.load(tmp_path / "m.autoq", small_task.model)(inputs), expected)


@pytest.mark.slow
def test_tuning_mobilenet_meets_the_budget_on_held_out_images(tmp_path):
    task = zoo.mobilenet_fashion_task()
    result = autoq.tune(task.model, task.example_inputs, task.calib, task.eval_fn(), max_loss=0.01,
                        n_trials=24, sensitivity_samples=16, **fast_settings(tmp_path, latency_seconds=1.0))
    assert result.feasible
    fp32_test = task.accuracy(task.model, "test")
    assert (fp32_test - task.accuracy(result.model, "test")) / fp32_test <= 0.015
    default = next(t for t in result.trials if t["number"] == 0)
    assert result.speedup >= 0.9 * default["speedup"]
