"""Empirical bias correction of PT2E-converted graphs (pt2e-static plans with bias_correction)."""

import dataclasses

import torch
from torch import nn

from autoq.plan import QuantPlan
from autoq.recipes.pt2e import Pt2eBuilder
from autoq.recover.graph_bias import correct_graph_bias, graph_float_weights, graph_input_means

from nets import biased_depthwise, positive_mean_inputs


def channel_shift(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|mean output error| per channel (axis 1) of `model` against `reference` on `x`."""
    with torch.no_grad():
        error = model(x) - reference(x)
    return error.transpose(0, 1).reshape(error.shape[1], -1).mean(1).abs()


def test_a_pt2e_plan_with_bias_correction_removes_the_output_shift_of_rounded_depthwise_weights():
    model = biased_depthwise()
    batches, test = positive_mean_inputs()
    builder = Pt2eBuilder(model, batches[0], batches)
    plan = QuantPlan(recipe="pt2e-static", activation_observer="minmax")
    before = channel_shift(builder.reference(plan), model, test)
    after = channel_shift(builder.reference(dataclasses.replace(plan, bias_correction=True)), model, test)
    assert before.min() > 0.05, f"rounding should shift every channel's output; shifts {before}"
    assert float(after.mean()) * 5 <= float(before.mean()), f"mean |shift| {before.mean():.4f} -> {after.mean():.4f}"
    assert torch.equal(channel_shift(builder.reference(plan), model, test), before)  # the plan's alone


class ConvBnLinear(nn.Module):
    """conv (no bias) -> BN -> ReLU -> linear without bias, plus a linear kept in FP32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.head, self.fp32_head = nn.Linear(4 * 6 * 6, 5, bias=False), nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        features = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(features) + self.fp32_head(features)


def test_every_int8_layer_is_corrected_one_without_bias_gets_one_and_fp32_layers_are_left_alone():
    torch.manual_seed(0)
    model = ConvBnLinear().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    batches = [(torch.rand(8, 3, 8, 8) + 1,)]
    builder = Pt2eBuilder(model, batches[0], batches)
    graph = builder._graph
    means = graph_input_means(graph, batches)
    assert sorted(means) == ["conv2d", "linear", "linear_1"]
    assert torch.allclose(means["conv2d"], batches[0][0].mean((0, 2, 3)))
    plan = QuantPlan(recipe="pt2e-static", fp32_layers=["fp32_head"])
    converted = builder.reference(plan)
    with torch.no_grad():
        before = converted(*batches[0])
    weights = graph_float_weights(builder._prepare(plan, None))
    assert sorted(weights) == ["conv2d", "linear", "linear_1"]
    corrected = correct_graph_bias(converted, weights, means)
    assert corrected == ["conv2d", "linear"]  # 'linear_1' (fp32_head) is FP32: not corrected
    head = next(node for node in converted.graph.nodes if node.name == "linear")
    assert head.args[2] is not None and head.args[2].op == "get_attr"  # the bias-free linear got a bias
    assert any("_autoq_bias_linear" in key for key in converted.state_dict())  # saved with the model's numbers
    with torch.no_grad():
        assert not torch.allclose(converted(*batches[0]), before)
