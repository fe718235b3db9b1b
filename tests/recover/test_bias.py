"""Empirical bias correction of converted int8 models, in the flow a StaticBuilder would use."""

import pytest
import torch
import torch.ao.nn.intrinsic as nni
from torch import nn

from autoq.dispatch.engine import quantized_engine
from autoq.plan import QuantPlan
from autoq.recipes.static import StaticBuilder
from autoq.recover.bias import correct_bias, float_weights, input_means

from conftest import state_of
from nets import FBGEMM_PLAN, X, Net, biased_depthwise, positive_mean_inputs, fresh, saturation_net


def corrected_build(builder: StaticBuilder, batches: list[tuple], plan: QuantPlan) -> tuple[nn.Module, list[str]]:
    """What a builder would do: means and FP32 weights once from its prepared graph, then correct each build."""
    prepared = builder.prepared()
    means = input_means(prepared, builder.layers, batches)
    weights = float_weights(prepared, builder.layers)
    quantized = builder.build(plan)
    return quantized, correct_bias(quantized, weights, means, engine=plan.engine, layer_engines=plan.layer_engines)


def channel_bias(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean output error per channel (axis 1) of `model` against `reference` on `x`."""
    with torch.no_grad():
        error = model(x) - reference(x)
    return error.transpose(0, 1).reshape(error.shape[1], -1).mean(1)


@pytest.mark.parametrize("engine", ["x86", "fbgemm"])
def test_correction_removes_the_output_shift_of_systematically_rounded_depthwise_weights(engine):
    model = biased_depthwise()
    batches, test = positive_mean_inputs()
    builder = StaticBuilder(model, batches[0], batches)
    plan = QuantPlan(engine=engine, activation_observer="minmax")
    before = channel_bias(builder.build(plan), model, test).abs()
    corrected, layers = corrected_build(builder, batches, plan)
    after = channel_bias(corrected, model, test).abs()
    assert layers == ["0"]
    assert before.min() > 0.05, f"the weights should shift every channel's output; shifts {before}"
    assert float(after.mean()) * 5 <= float(before.mean()), f"mean |shift| {before.mean():.4f} -> {after.mean():.4f}"


class SmallCnn(nn.Module):
    """conv -> BN -> ReLU -> 1x1 conv; conv1's output channel 0 is 30x larger, so per-tensor weights round
    the other channels coarsely."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.relu = nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU()
        self.conv2 = nn.Conv2d(16, 8, 1)
        with torch.no_grad():
            self.conv1.weight[0] *= 30
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.25, 4)

    def forward(self, x):
        return self.conv2(self.relu(self.bn(self.conv1(x))))


def test_the_static_builder_flow_lowers_the_output_bias_of_per_tensor_weights():
    torch.manual_seed(0)
    model = SmallCnn().eval()
    batches = [(2 * torch.rand(32, 3, 16, 16),) for _ in range(4)]
    builder = StaticBuilder(model, batches[0], batches)
    assert isinstance(builder.prepared().conv1, nni.ConvReLU2d)  # prepare_fx folded the BN, fused the ReLU
    weights = float_weights(builder.prepared(), ["conv1"])
    assert not torch.allclose(weights["conv1"][0], model.conv1.weight)
    plan = QuantPlan(weight_granularity="per_tensor")
    test = 2 * torch.rand(256, 3, 16, 16)
    before = channel_bias(builder.build(plan), model, test).abs().mean()
    corrected, layers = corrected_build(builder, batches, plan)
    assert layers == ["conv1", "conv2"]
    after = channel_bias(corrected, model, test).abs().mean()
    assert after < 0.5 * before, f"mean |per-channel output bias| {before:.5f} -> {after:.5f}"


def test_fp32_fallbacks_and_dynamic_linears_are_left_alone():
    model = fresh(Net)
    batches = [(torch.rand(8, 3, 16, 16),)]
    builder = StaticBuilder(model, batches[0], batches)
    quantized, layers = corrected_build(builder, batches, QuantPlan(fp32_layers=["head"]))
    assert layers == ["conv", "depthwise"]
    assert type(quantized.head) is nn.Linear
    assert torch.equal(quantized.head.weight, model.head.weight) and torch.equal(quantized.head.bias, model.head.bias)
    dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear})
    weights = {"0": (torch.zeros(4, 4), None)}
    assert correct_bias(dynamic, weights, {"0": torch.ones(4)}, engine="x86") == []


def test_input_means_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 5)).train()
    before = state_of(model)
    x = torch.randn(6, 3, 2, 2) + torch.arange(3.0).reshape(1, 3, 1, 1)
    means = input_means(model, ["0", "3", "1", "missing"], [(x,), (x,)])
    assert set(means) == {"0", "3"}
    assert torch.allclose(means["0"], x.mean((0, 2, 3)), atol=1e-6)
    assert means["3"].shape == (16,)
    assert model.training and not model[0]._forward_pre_hooks
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


@pytest.mark.isa
def test_each_layer_is_repacked_for_its_own_library_whatever_the_current_engine():
    """saturation_net's depthwise layer saturates on FBGEMM and is exact on oneDNN (tests/nets.py)."""
    builder = StaticBuilder(saturation_net(), (X,), [(X,)])
    mixed = QuantPlan(**{**FBGEMM_PLAN.to_dict()["_data"], "layer_engines": {"0": "onednn"}})
    with torch.no_grad():
        fbgemm_output, mixed_output = builder.build(FBGEMM_PLAN)(X), builder.build(mixed)(X)
        assert not torch.allclose(fbgemm_output, mixed_output, atol=1.0), "the libraries should differ here"
        for plan, output in ((FBGEMM_PLAN, fbgemm_output), (mixed, mixed_output)):
            with quantized_engine("onednn" if plan is FBGEMM_PLAN else "fbgemm"):
                corrected, layers = corrected_build(builder, [(X,)], plan)
            assert layers == ["0", "1"]
            assert torch.allclose(corrected(X), output, atol=0.2)
