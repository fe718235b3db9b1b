"""Folding ReLU6 into the int8 conv before it (fold_relu6)."""

import pytest
import torch
import torch.ao.nn.intrinsic.quantized as nniq
from torch import nn

import autoq
from autoq.dispatch.isa import int8_path
from autoq.plan import QuantPlan

from nets import Block


@pytest.fixture(scope="module")
def block_and_data():
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        for conv in (model.a, model.b, model.c, model.d):
            conv.weight.mul_(3.0)  # pre-activations well beyond [0, 6]: folding must clamp them
    data = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    return model, data


# folded convs output the full 8-bit range: where oneDNN's conv saturates on that (no VNNI), 7-bit weights
SAFE_WEIGHT_BITS = 8 if int8_path().full_range_safe("onednn", ("conv", "depthwise")) else 7


def build(block_and_data, fold, reduce_range=False, weight_bits=SAFE_WEIGHT_BITS):
    model, data = block_and_data
    plan = QuantPlan(engine="onednn", reduce_range=reduce_range, activation_observer="minmax", fold_relu6=fold,
                     weight_bits=weight_bits)
    return autoq.quantize(model, plan, data[0][:1], data)


@pytest.mark.isa
@pytest.mark.parametrize("reduce_range", [False, True])
def test_relu6_after_an_int8_conv_becomes_a_conv_relu_saturating_at_6(block_and_data, reduce_range):
    folded = build(block_and_data, fold=True, reduce_range=reduce_range)
    fused = {name for name, m in folded.named_modules() if isinstance(m, nniq.ConvReLU2d)}
    assert fused == {"a", "b", "c"}
    assert not any(isinstance(m, (nn.ReLU6, nn.Hardtanh)) for m in folded.modules())
    assert "relu6" in folded.code  # the reused conv output keeps its own ReLU6
    for name in fused:
        module = folded.get_submodule(name)
        assert module.zero_point == 0 and module.scale * 255 <= 6.0 + 1e-6  # uint8 saturation caps at 6
    outputs = {}
    hooks = [folded.get_submodule(name).register_forward_hook(
        lambda m, args, out, name=name: outputs.__setitem__(name, out.dequantize())) for name in fused]
    with torch.no_grad():
        folded(block_and_data[1][2])
    for hook in hooks:
        hook.remove()
    assert all(0 <= float(out.min()) and float(out.max()) <= 6.0 + 1e-5 for out in outputs.values())


@pytest.mark.isa
def test_folding_keeps_the_model_at_least_as_accurate(block_and_data):
    model, data = block_and_data
    x = data[1]
    with torch.no_grad():
        expected = model(x)
        errors = {fold: float((build(block_and_data, fold)(x) - expected).abs().mean()) for fold in (False, True)}
    assert errors[True] <= errors[False] * 1.05
    assert errors[True] < 0.05 * float(expected.abs().mean())


def test_plans_without_relu6_do_not_offer_the_choice(mnist_task, tmp_path):
    from conftest import fast_settings

    result = autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn(),
                        n_trials=4, **fast_settings(tmp_path))
    assert all("fold_relu6" not in trial["params"] for trial in result.trials)
