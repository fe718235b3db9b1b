"""AdaRound: learned weight rounding of single layers, and the StaticBuilder flow that puts it into int8 models."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoq.plan import QuantPlan
from autoq.recipes.static import StaticBuilder
from autoq.recover.adaround import _InputMoments, adaround_layer, adarounded, set_int8_weights, weight_scales
from autoq.recover.bias import float_weights

MIX = torch.randn(16, 4, generator=torch.Generator().manual_seed(123))  # 4 latent signals -> 16 channels


def smooth_images(samples: int, seed: int, channels: int = 16, size: int = 16) -> torch.Tensor:
    """Images whose channels mix 4 smooth latent signals, plus a little noise: neighbouring pixels and channels
    are correlated, as in a network's feature maps."""
    generator = torch.Generator().manual_seed(seed)
    latent = F.interpolate(torch.randn(samples, 4, size // 4, size // 4, generator=generator), size=(size, size),
                           mode="bilinear")
    mixed = torch.einsum("nlhw,cl->nchw", latent, MIX[:channels])
    return mixed + 0.1 * torch.randn(samples, channels, size, size, generator=generator)


def correlated_rows(samples: int, seed: int) -> torch.Tensor:
    """Rows of 32 features that mix 4 latent signals, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 4, generator=generator) @ MIX.T.repeat(1, 2) + 0.1 * torch.randn(
        samples, 32, generator=generator)


class SamePaddingConv(nn.Conv2d):
    """TensorFlow-'same' padding as EfficientNet ports do it: pad inside forward (asymmetric for even kernels),
    then an unpadded conv."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def seeded(factory):
    torch.manual_seed(0)
    return factory().eval()


LAYERS = {  # layer, inputs (train, held out), per-channel scales?
    "conv3x3": (lambda: nn.Conv2d(16, 16, 3, padding=1), smooth_images, True),
    "depthwise": (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16), smooth_images, True),
    "strided_grouped_per_tensor": (lambda: nn.Conv2d(16, 8, 3, stride=2, padding=1, groups=2), smooth_images, False),
    "same_padding": (lambda: SamePaddingConv(16, 8, 2, stride=2), smooth_images, True),
    "linear": (lambda: nn.Linear(32, 24), correlated_rows, True),
}


def nearest(weight: torch.Tensor, scale: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    return torch.round(weight / scale).clamp(quant_min, quant_max)


def coarse_scale(weight: torch.Tensor, per_channel: bool, levels: int = 7) -> torch.Tensor:
    """Symmetric 4-bit scales ([-7, 7]): rounding errors large enough to matter."""
    if per_channel:
        return weight.abs().reshape(len(weight), -1).amax(1) / levels
    return weight.abs().max() / levels


def output_mse(layer: nn.Module, integers: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> float:
    shape = (-1, *[1] * (integers.dim() - 1)) if scale.numel() > 1 else ()
    with torch.no_grad():
        rounded = torch.func.functional_call(layer, {"weight": integers.float() * scale.reshape(shape)}, (x,))
        return float((rounded - layer(x)).square().mean())


@pytest.mark.parametrize("kind", LAYERS)
def test_learned_rounding_lowers_the_held_out_output_error_of_coarse_weights(kind):
    factory, inputs, per_channel = LAYERS[kind]
    layer = seeded(factory)
    weight = layer.weight.detach()
    scale = coarse_scale(weight, per_channel)
    integers = adaround_layer(layer, inputs(64, seed=1), scale, -7, 7, iterations=300)
    closest = nearest(weight, scale.reshape(-1, *[1] * (weight.dim() - 1)) if per_channel else scale, -7, 7)
    assert integers.dtype == torch.int8 and integers.shape == weight.shape
    assert int(integers.min()) >= -7 and int(integers.max()) <= 7
    assert int((integers - closest).abs().max()) == 1, "rounding should change, by one step at most"
    held_out = inputs(64, seed=2)
    before, after = output_mse(layer, closest, scale, held_out), output_mse(layer, integers, scale, held_out)
    assert after * 1.5 <= before, f"held-out output MSE {before:.3g} (nearest) -> {after:.3g} (learned)"


@pytest.mark.parametrize("kind", ["conv3x3", "strided_grouped_per_tensor", "same_padding", "linear"])
@pytest.mark.parametrize("samples", [1, 8])  # 1: fewer positions than patch elements per group (patches kept)
def test_the_output_error_is_exact_over_all_inputs(kind, samples):
    factory, inputs, _ = LAYERS[kind]
    layer = seeded(factory)
    if kind == "linear":  # sequences of 5 rows, 5 positions per sample
        x = correlated_rows(5 * samples, seed=1).reshape(samples, 5, 32)
    else:
        x = inputs(samples, seed=1)[..., :4, :4] if samples == 1 else inputs(samples, seed=1)
    change = 0.01 * torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(3))
    moments = _InputMoments(layer, x, layer.weight.detach())
    assert (moments.gram is None) == (samples == 1)
    with torch.no_grad():
        shifted = torch.func.functional_call(layer, {"weight": layer.weight + change}, (x,))
        expected = (shifted - layer(x)).square().sum(-1 if kind == "linear" else 1).mean()
    assert torch.allclose(moments.output_error(change), expected, rtol=1e-4)


def test_a_forward_that_is_not_weight_times_patches_is_refused():
    class Standardized(nn.Conv2d):  # weight standardization: the output is not linear in the weight
        def forward(self, x):
            return self._conv_forward(x, (self.weight - self.weight.mean()) / self.weight.std(), self.bias)

    layer = seeded(lambda: Standardized(16, 4, 3))
    with pytest.raises(ValueError, match="not its weight times its input patches"):
        adaround_layer(layer, smooth_images(2, seed=1), torch.tensor(0.1), -7, 7, iterations=1)


class SmallCnn(nn.Module):
    """conv -> BN -> ReLU -> depthwise conv -> ReLU -> 1x1 conv, and a linear head on the pooled features. One
    weight of each conv output channel is 8x larger (outliers are common in trained weights), so 7-bit
    per-channel scales are coarse for the others and rounding matters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.depthwise, self.pointwise = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.25, 4)
            for layer in (self.conv, self.depthwise, self.pointwise):
                layer.weight[:, 0, 0, 0] *= 8

    def forward(self, x):
        y = self.pointwise(F.relu(self.depthwise(F.relu(self.bn(self.conv(x))))))
        return y, self.head(y.mean((2, 3)))


def cnn_setup(plan: QuantPlan):
    """The StaticBuilder flow up to AdaRound: FP32 model, builder, calibration batches, the prepared graph's
    BN-folded weights and the plan's scales for them."""
    model = seeded(SmallCnn)
    batches = [(smooth_images(16, seed=seed, channels=3),) for seed in range(4)]
    builder = StaticBuilder(model, batches[0], batches)
    weights = float_weights(builder.prepared(), builder.layers)
    scales = weight_scales(weights, plan.weight_granularity,
                           lambda name: plan.layer_weight_bits.get(name, plan.weight_bits))
    return model, builder, batches, weights, scales


def cnn_flow(plan: QuantPlan):
    """(FP32 model, builder, learned integers by layer) of the StaticBuilder flow."""
    model, builder, batches, weights, scales = cnn_setup(plan)
    return model, builder, adarounded(model, builder.layers, batches, scales, weights=weights, samples=32,
                                      iterations=300)


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_weight_scales_are_those_of_the_converted_model(granularity):
    plan = QuantPlan(weight_granularity=granularity, weight_bits=7, layer_weight_bits={"pointwise": 8})
    _, builder, _, _, scales = cnn_setup(plan)
    quantized = builder.build(plan)
    assert set(scales) == {"conv", "depthwise", "pointwise", "head"}
    for name, (scale, quant_min, quant_max) in scales.items():
        weight = quantized.get_submodule(name).weight()
        converted = weight.q_per_channel_scales() if granularity == "per_channel" else torch.tensor([weight.q_scale()])
        assert torch.allclose(scale.double().reshape(-1), converted.double(), rtol=1e-6), name
        assert (quant_min, quant_max) == ((-128, 127) if name == "pointwise" else (-63, 63))
        assert int(weight.int_repr().abs().max()) <= quant_max


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_set_int8_weights_changes_the_integers_only(granularity):
    plan = QuantPlan(weight_bits=7, reduce_range=False, fp32_layers=["head"], weight_granularity=granularity)
    model, builder, rounded = cnn_flow(plan)
    assert set(rounded) == {"conv", "depthwise", "pointwise", "head"}
    quantized = builder.build(plan)
    before = {name: (module.weight(), module.bias()) for name, module in quantized.named_modules()
              if name in rounded and hasattr(module, "set_weight_bias")}
    assert set_int8_weights(quantized, rounded, engine=plan.engine) == ["conv", "depthwise", "pointwise"]
    for name, (weight, bias) in before.items():
        module = quantized.get_submodule(name)
        assert torch.equal(module.weight().int_repr(), rounded[name])
        assert not torch.equal(module.weight().int_repr(), weight.int_repr()), f"{name}: rounding should change"
        assert module.weight().qscheme() == weight.qscheme()
        if granularity == "per_channel":
            assert torch.equal(module.weight().q_per_channel_scales(), weight.q_per_channel_scales())
        else:
            assert module.weight().q_scale() == weight.q_scale()
        assert torch.equal(module.bias(), bias)
    assert type(quantized.head) is nn.Linear and torch.equal(quantized.head.weight, model.head.weight)
    with pytest.raises(ValueError, match="shape"):
        set_int8_weights(quantized, {"conv": rounded["conv"][:1]}, engine=plan.engine)


def test_the_static_builder_flow_lowers_the_output_error_of_7_bit_weights():
    plan = QuantPlan(weight_bits=7, reduce_range=False)
    model, builder, rounded = cnn_flow(plan)
    held_out = smooth_images(64, seed=10, channels=3)
    with torch.no_grad():
        reference = model(held_out)

        def error(quantized) -> float:
            return sum(float((out - ref).square().mean() / ref.square().mean())
                       for out, ref in zip(quantized(held_out), reference))

        quantized = builder.build(plan)
        before = error(quantized)
        set_int8_weights(quantized, rounded, engine=plan.engine)
        after = error(quantized)
        planned = error(builder.build(dataclasses.replace(plan, adaround=True)))  # the plan field does the same
    assert after < 0.75 * before, f"relative output MSE vs FP32 {before:.3g} -> {after:.3g}"
    assert planned < 0.75 * before, f"with adaround=True in the plan: {before:.3g} -> {planned:.3g}"


def test_layers_out_of_time_functional_or_never_reached_are_left_out():
    model, builder, batches, weights, scales = cnn_setup(QuantPlan(weight_bits=7))
    assert adarounded(model, builder.layers, batches, scales, weights=weights, time_limit=0) == {}
    assert adarounded(model, ["bn", "missing", "head"], batches, scales, iterations=5).keys() == {"head"}
    assert adarounded(model, ["conv"], [], scales) == {}
