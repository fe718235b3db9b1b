"""Empirical bias correction for int8 graphs converted by PT2E, as `autoq.recover.bias` does for FX models.

Each quantized conv/linear op's bias becomes b - (dequant(W_q) - W) E[x]. The ops are aten nodes of an
exported graph; prepare_pt2e and convert_pt2e keep their node names, so the FP32 weights (read from the
prepared graph, where BatchNorm is already folded into them) and the per-channel input means (from the
exported FP32 graph) are matched to the converted graph's nodes by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torchao.quantization.pt2e  # noqa: F401  registers the quantized_decomposed ops named below
from torch import fx

from autoq.recover.bias import output_shift

LAYER_OPS = {torch.ops.aten.linear.default, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
             torch.ops.aten.conv3d.default}
_DEQUANTIZE_WEIGHT = {torch.ops.quantized_decomposed.dequantize_per_channel.default,
                      torch.ops.quantized_decomposed.dequantize_per_tensor.default}
_GROUPS_ARG = 6  # aten.convNd(input, weight, bias, stride, padding, dilation, groups)


def is_layer(node: fx.Node) -> bool:
    """Whether `node` is a conv/linear op of an exported (aten) graph."""
    return node.op == "call_function" and node.target in LAYER_OPS


def graph_input_means(graph: fx.GraphModule, batches: Sequence[tuple]) -> dict[str, torch.Tensor]:
    """Per-input-channel mean of the input of each conv/linear op of an exported FP32 graph over `batches`
    (tuples of inputs), by node name; the channel axis is 1 for a conv and the last for a linear."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            if is_layer(node):
                x = self.env[node.args[0]]
                axis = -1 if node.target is torch.ops.aten.linear.default else 1
                rows = x.detach().double().movedim(axis, -1).reshape(-1, x.shape[axis])
                sums[node.name] = sums.get(node.name, 0) + rows.sum(0)
                counts[node.name] = counts.get(node.name, 0) + rows.shape[0]
            return super().run_node(node)

    with torch.no_grad():
        for batch in batches:
            Recorder(graph).run(*batch)
    return {name: (total / counts[name]).float() for name, total in sums.items()}


def graph_float_weights(prepared: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The FP32 weight (a copy) of each conv/linear op of a graph prepared by prepare_pt2e, by node name."""
    weights = {}
    for node in prepared.graph.nodes:
        if is_layer(node):
            source = node.args[1]
            while isinstance(source, fx.Node) and source.op == "call_module":  # its weight observer
                source = source.args[0]
            if isinstance(source, fx.Node) and source.op == "get_attr":
                weights[node.name] = attr_value(prepared, source).detach().clone()
    return weights


def correct_graph_bias(converted: fx.GraphModule, weights: Mapping[str, torch.Tensor],
                       means: Mapping[str, torch.Tensor]) -> list[str]:
    """Set the bias of each int8 conv/linear op of a graph converted by convert_pt2e to b - (dequant(W_q) - W) E[x]
    (in place; a layer without bias gets one); returns the node names corrected.

    weights: `graph_float_weights` of the prepared graph it was converted from; means: `graph_input_means`.
    Ops whose weight is not dequantized from int8 (FP32 fallbacks) are left alone.
    """
    corrected = []
    for node in list(converted.graph.nodes):
        dequantize = node.args[1] if is_layer(node) else None
        if (node.name not in weights or node.name not in means or not isinstance(dequantize, fx.Node)
                or dequantize.op != "call_function" or dequantize.target not in _DEQUANTIZE_WEIGHT):
            continue
        dequantized = dequantize.target(*(attr_value(converted, arg) for arg in dequantize.args),
                                        **{key: attr_value(converted, arg) for key, arg in dequantize.kwargs.items()})
        groups = node.args[_GROUPS_ARG] if len(node.args) > _GROUPS_ARG else node.kwargs.get("groups", 1)
        shift = output_shift(node.name, dequantized, weights[node.name], means[node.name], groups)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if isinstance(bias, fx.Node):
            _assign(converted, bias.target, attr_value(converted, bias) - shift)
        else:
            name = f"_autoq_bias_{node.name}"
            converted.register_buffer(name, -shift)
            with converted.graph.inserting_before(node):
                attr = converted.graph.get_attr(name)
            node.args = (*node.args[:2], attr, *node.args[3:]) if len(node.args) > 2 else (*node.args, attr)
            node.kwargs = {key: value for key, value in node.kwargs.items() if key != "bias"}
        corrected.append(node.name)
    converted.recompile()
    return corrected


def attr_value(module: fx.GraphModule, arg: object) -> object:
    """A node argument's value: a get_attr node's tensor, any other argument as it is."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = module
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        return value
    return arg


def _assign(module: fx.GraphModule, target: str, tensor: torch.Tensor) -> None:
    """Replace the tensor at a get_attr target by a new one (the old one may be shared), registered as the
    old one was (parameter, buffer or plain attribute), so the model's state_dict carries it."""
    *path, name = target.split(".")
    owner = module.get_submodule(".".join(path))
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = tensor
    else:
        setattr(owner, name, tensor)
