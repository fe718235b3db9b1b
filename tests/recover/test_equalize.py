"""Cross-layer equalization: BatchNorm folding, equalized pairs (grouped, chained), ReLU6, what is skipped."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from autoq.recover.equalize import equalized

from conftest import state_of

X = torch.randn(4, 8, 12, 12, generator=torch.Generator().manual_seed(0))


def randomized(model: nn.Module) -> nn.Module:
    """`model` in eval mode with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


class ConvBnReluConv(nn.Module):
    """conv1 -> bn -> relu -> conv2 whose BN output channel 0 is 100x larger and conv2's matching input
    column 100x smaller: the same function, with one huge channel in conv1's folded weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.relu = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        randomized(self)
        with torch.no_grad():
            self.bn.weight[0] *= 100
            self.bn.bias[0] *= 100
            self.conv2.weight[:, 0] /= 100

    def forward(self, x):
        return self.conv2(self.relu(self.bn(self.conv1(x))))


def per_tensor_int8(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-tensor int8 quantize-dequantize."""
    scale = weight.abs().max() / 127
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return 10 * math.log10(float(reference.pow(2).sum() / (reference - candidate).pow(2).sum()))


def output_sqnr_with_int8_weight(model: nn.Module, conv: nn.Conv2d, reference: torch.Tensor) -> float:
    """SQNR (dB) of the model's output against `reference` with `conv`'s weight quantized per tensor."""
    with torch.no_grad():
        original = conv.weight.clone()
        conv.weight.copy_(per_tensor_int8(original))
        output = model(X)
        conv.weight.copy_(original)
    return sqnr_db(reference, output)


def test_equalizing_a_scaled_channel_keeps_the_function_and_makes_per_tensor_weights_accurate():
    model = ConvBnReluConv()
    before = state_of(model)
    with torch.no_grad():
        reference = model(X)
    result = equalized(model)
    assert result.folded == ["bn"] and not hasattr(result.model, "bn")
    assert result.pairs == [("conv1", "conv2")]
    with torch.no_grad():
        assert torch.allclose(result.model(X), reference, rtol=1e-4, atol=1e-4)
    folded_only = copy.deepcopy(model)
    folded_only.conv1, folded_only.bn = fuse_conv_bn_eval(folded_only.conv1, folded_only.bn), nn.Identity()
    gain = (output_sqnr_with_int8_weight(result.model, result.model.conv1, reference)
            - output_sqnr_with_int8_weight(folded_only, folded_only.conv1, reference))
    assert gain > 20, f"per-tensor int8 conv1 gains only {gain:.1f} dB of output SQNR"
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


def channel_ranges(first: nn.Module, second: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel between the layers: max |weight| of first's output channel and of second's input channel,
    found by walking second's groups one output at a time."""
    first_weight, second_weight = first.weight.detach(), second.weight.detach()
    channels, groups = first_weight.shape[0], getattr(second, "groups", 1)
    per_group, outputs_per_group = channels // groups, second_weight.shape[0] // groups
    second_range = torch.zeros(channels)
    for output in range(second_weight.shape[0]):
        group = output // outputs_per_group
        for index in range(per_group):
            channel = group * per_group + index
            second_range[channel] = max(second_range[channel], second_weight[output, index].abs().max())
    return first_weight.abs().reshape(channels, -1).amax(1), second_range


@pytest.mark.parametrize("groups", [1, 4, 16], ids=["regular", "grouped", "depthwise"])
def test_a_pair_through_zero_padding_ends_with_equal_ranges_per_channel(groups):
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.LeakyReLU(0.1), nn.ZeroPad2d(1),
                          nn.Conv2d(16, 16, 3, groups=groups)).eval()
    with torch.no_grad():
        model[0].weight[3] *= 50
        reference = model(X)
    result = equalized(model)
    assert result.pairs == [("0", "3")]
    first_range, second_range = channel_ranges(result.model.get_submodule("0"), result.model.get_submodule("3"))
    assert torch.allclose(first_range, second_range, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(result.model(X), reference, rtol=1e-4, atol=1e-5)


def test_linear_pairs_are_equalized():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.5), nn.Linear(10, 3)).eval()
    with torch.no_grad():
        model[0].weight[2] *= 30
    x = torch.randn(5, 6)
    result = equalized(model)
    assert result.pairs == [("0", "3")]
    assert torch.allclose(*channel_ranges(result.model.get_submodule("0"), result.model.get_submodule("3")), rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def separable_block() -> nn.Module:
    """MobileNet's pointwise -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> pointwise."""
    return randomized(nn.Sequential(
        nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Conv2d(32, 8, 1)))


def test_a_separable_chain_is_equalized_with_relu6_replaced_by_relu():
    model = separable_block()
    result = equalized(model)
    assert result.folded == ["1", "4"] and result.pairs == [("0", "3"), ("3", "6")]
    assert result.relu6_replaced == ["2", "5"]
    assert all(type(result.model.get_submodule(str(i))) is nn.ReLU for i in (2, 5)) and type(model[2]) is nn.ReLU6
    as_relu = copy.deepcopy(model)
    as_relu[2], as_relu[5] = nn.ReLU(), nn.ReLU()
    with torch.no_grad():
        assert torch.allclose(result.model(X), as_relu(X), rtol=1e-4, atol=1e-4)
    depthwise_range, last_range = channel_ranges(result.model.get_submodule("3"), result.model.get_submodule("6"))
    spread = depthwise_range / last_range
    assert float(spread.max() / spread.min()) < 1.5, "the chain should end close to equal ranges"


def test_without_relu6_to_relu_the_separable_chain_is_only_folded():
    model = separable_block()
    result = equalized(model, relu6_to_relu=False)
    assert result.folded == ["1", "4"] and result.pairs == [] and result.relu6_replaced == []
    assert "ReLU6 '2'" in result.skipped["0"] and "ReLU6 '5'" in result.skipped["3"]
    with torch.no_grad():
        assert torch.allclose(result.model(X), model(X), rtol=1e-4, atol=1e-5)


class Conv2dSame(nn.Conv2d):
    """TensorFlow's 'SAME' padding, computed from the input size in forward."""

    def forward(self, x):
        height, width = x.shape[-2:]
        pad_h = max((math.ceil(height / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - height, 0)
        pad_w = max((math.ceil(width / self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - width, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_a_conv_subclass_with_its_own_forward_is_a_layer_and_its_batchnorm_is_folded():
    model = randomized(nn.Sequential(Conv2dSame(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                                     Conv2dSame(16, 4, 3)))
    result = equalized(model)
    assert result.folded == ["1"] and not hasattr(result.model, "1")
    assert result.pairs == [("0", "3")] and type(result.model.get_submodule("0")) is Conv2dSame
    with torch.no_grad():
        assert torch.allclose(result.model(X), model(X), rtol=1e-4, atol=1e-5)


class StaticSamePadConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding fixed at construction, as EfficientNet-Lite's port does it: a ZeroPad2d,
    then the conv without padding."""

    def __init__(self, *args, pad=(0, 1, 0, 1), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_a_conv_subclass_that_pads_then_convolves_becomes_a_pad_and_a_plain_conv():
    model = randomized(nn.Sequential(StaticSamePadConv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU6(),
                                     StaticSamePadConv2d(16, 16, 3, groups=16, pad=(1, 1, 1, 1))))
    result = equalized(model, scale_pairs=False)
    assert result.plain == ["0", "3"] and result.folded == ["1"]
    assert all(type(result.model.get_submodule(name)) is nn.Conv2d for name in ("0", "3"))  # FX sees modules
    assert isinstance(model[0], StaticSamePadConv2d)  # the input model is untouched
    with torch.no_grad():
        assert torch.allclose(result.model(X), model(X), rtol=1e-4, atol=1e-5)
    dynamic = equalized(nn.Sequential(Conv2dSame(8, 16, 3)))  # padding computed from the input's shape: kept
    assert dynamic.plain == [] and type(dynamic.model.get_submodule("0")) is Conv2dSame


class StandardizedConv2d(nn.Conv2d):
    """Weight standardization (as in BiT): scaling its weight does not scale its output."""

    def forward(self, x):
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_conv_that_ignores_its_weight_scale_is_not_folded_or_equalized():
    model = randomized(nn.Sequential(StandardizedConv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Conv2d(16, 4, 3)))
    result = equalized(model)
    assert result.folded == [] and result.pairs == []
    assert "does not scale its output with its weight" in result.skipped["1"]
    with torch.no_grad():
        assert torch.allclose(result.model(X), model(X))


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv1(x)
        return self.conv2(y) + self.conv3(y)


def test_a_layer_whose_output_has_two_consumers_is_skipped_with_the_reason():
    result = equalized(Branch().eval())
    assert result.pairs == []
    assert result.skipped["conv1"] == "the output of 'conv1' is used 2 times"


class FunctionalActivations(nn.Module):
    """conv1 -> F.relu6 -> conv2, then conv2 -> F.relu -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.head = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 3), nn.Linear(4 * 10 * 10, 3)

    def forward(self, x):
        y = self.conv2(F.relu6(self.conv1(x)))
        return self.head(torch.flatten(F.relu(y), 1))


def test_functional_relu6_and_flatten_stop_the_search_with_reasons():
    model = FunctionalActivations().eval()
    result = equalized(model)
    assert result.pairs == []
    assert "functional relu6" in result.skipped["conv1"]
    assert "flatten" in result.skipped["conv2"]
    with torch.no_grad():
        assert torch.equal(result.model(X), model(X))


class DataDependent(Branch):
    def forward(self, x):
        y = self.conv1(x)
        return self.conv2(y) if y.sum() > 0 else y


def test_an_untraceable_model_comes_back_as_an_unchanged_copy():
    model = DataDependent().eval()
    result = equalized(model)
    assert result.model is not model and result.pairs == []
    assert "could not trace" in result.skipped["<model>"]
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in result.model.state_dict().items())
    with pytest.raises(ValueError, match="rounds"):
        equalized(model, rounds=0)
