"""Rank layers by how much quantizing each one alone hurts the model's output.

For each layer, the FP32 graph runs with only that layer simulated in int8: its weights
fake-quantized as the plan would (per-channel symmetric int8) and the activations it reads and
writes fake-quantized with the plan's ranges. One FP32 forward per layer instead of one int8
conversion per layer; the int8 kernels compute the same arithmetic.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from autoq.measure.outputs import float_outputs, sqnr_db
from autoq.plan import QuantPlan

if TYPE_CHECKING:
    from autoq.recipes.static import StaticBuilder


class _FakeQuant(nn.Module):
    """Identity until given qparams; then fake-quantizes per tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.qparams: tuple[float, int, int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qparams is None or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        scale, zero_point, quant_min, quant_max = self.qparams
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)


def _fake_quantized_weight(weight: torch.Tensor) -> torch.Tensor:
    observer = PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point.int(), 0, -128, 127)


def _weight_owner(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[nn.Module, str]:
    """(module, attribute) holding the weight of a layer node."""
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return (module[0] if isinstance(module, nn.Sequential) else module), "weight"
    weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    while weight.op == "call_module":  # the weight observer prepare_fx put in front of a functional call
        weight = weight.args[0]
    path, _, attribute = weight.target.rpartition(".")
    return graph_module.get_submodule(path), attribute


@torch.no_grad()
def layer_sensitivity(
    builder: StaticBuilder, fp32_model: nn.Module, batches: Sequence[tuple], plan: QuantPlan
) -> dict[str, float]:
    """{layer: output SQNR in dB with only that layer in (simulated) int8}; lower is more sensitive."""
    reference = [t for batch in batches for t in float_outputs(fp32_model(*batch))]
    model = copy.deepcopy(builder.prepared())
    switches = {}
    for name, aliases in builder.observer_names.items():
        switches[name] = _FakeQuant()
        for alias in aliases:
            setattr(model, alias, switches[name])
    nodes = {node.name: node for node in model.graph.nodes}
    scores = {}
    for layer_name in builder.layers:
        node = nodes[builder.layer(layer_name).node]
        neighbours = [n for n in (*node.all_input_nodes, *node.users) if n.op == "call_module"]
        observed = {name for name, aliases in builder.observer_names.items()
                    if any(n.target in aliases for n in neighbours)}
        for name in observed:
            observer = builder.activation_observer(name, plan)
            scale, zero_point = observer.calculate_qparams()
            switches[name].qparams = (float(scale), int(zero_point), observer.quant_min, observer.quant_max)
        owner, attribute = _weight_owner(model, node)
        weight = getattr(owner, attribute)
        setattr(owner, attribute, nn.Parameter(_fake_quantized_weight(weight), requires_grad=False))
        candidate = [t for batch in batches for t in float_outputs(model(*batch))]
        setattr(owner, attribute, weight)
        for name in observed:
            switches[name].qparams = None
        scores[layer_name] = sqnr_db(reference, candidate)
    return scores


@torch.no_grad()
def single_layer_sensitivity(build: Callable[[str], nn.Module], layers: Sequence[str], fp32_model: nn.Module,
                             batches: Sequence[tuple]) -> dict[str, float]:
    """{layer: output SQNR in dB of `build(layer)`, a model with only that layer quantized}.

    For the recipes without a cheaper simulation: dynamic (real int8 kernels) and PT2E (its
    quantize/dequantize reference graph).
    """
    reference = [t for batch in batches for t in float_outputs(fp32_model(*batch))]
    scores = {}
    for layer in layers:
        model = build(layer)
        scores[layer] = sqnr_db(reference, [t for batch in batches for t in float_outputs(model(*batch))])
    return scores
