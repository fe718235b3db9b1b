"""Post-convert graph rewrites that remove int8 ops the kernel libraries cannot fuse themselves.

ReLU6 after a quantized conv runs as a separate `hardtanh` over the whole int8 tensor (FX fuses
Conv+ReLU, not Conv+ReLU6). It is redundant once the conv's output range is [0, min(6, max)]:
the conv fused with ReLU then saturates at 6 by quantization itself, and the 8-bit grid covers only
values that can occur after the clamp instead of the conv's negative outputs too.
"""

from __future__ import annotations

import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import fx, nn

from autoq.dispatch.engine import quantized_engine

_FUSED = {nnq.Conv1d: nniq.ConvReLU1d, nnq.Conv2d: nniq.ConvReLU2d, nnq.Conv3d: nniq.ConvReLU3d}
RELU6_MAX = 6.0
QUINT8_MAX = 255


def is_relu6(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` computes ReLU6 (module, F.relu6 or F.hardtanh with bounds 0 and 6)."""
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return isinstance(module, nn.ReLU6) or (
            type(module) is nn.Hardtanh and (module.min_val, module.max_val) == (0.0, RELU6_MAX))
    if node.op == "call_function" and node.target is F.hardtanh:
        bounds = list(node.args[1:3]) + [node.kwargs.get(k) for k in ("min_val", "max_val")]
        return [b for b in bounds if b is not None] == [0.0, RELU6_MAX]
    return node.op == "call_function" and node.target is F.relu6


def fold_relu6(graph_module: fx.GraphModule, engine: str, observed_quant_max: int) -> list[str]:
    """Fuse every int8 Conv -> ReLU6 pair into ConvReLU with output range [0, min(6, max)] (in place).

    engine: library to pack the fused layers' weights for; observed_quant_max: the top of the conv
    outputs' observed range (255, or 127 with reduce_range). The fused output always uses the full
    uint8 range, whose saturation at 255 is what caps it at min(6, max).
    Returns the names of the fused conv modules. A conv whose output has other users is left alone.
    """
    fused = []
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        conv = graph_module.get_submodule(node.target)
        fused_class = _FUSED.get(type(conv))
        user = next(iter(node.users))
        if fused_class is None or not is_relu6(graph_module, user):
            continue
        high = min(RELU6_MAX, float(conv.scale) * (observed_quant_max - int(conv.zero_point)))
        if high <= 0:
            continue
        replacement = fused_class(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, True, conv.padding_mode,
        )
        with quantized_engine(engine):
            replacement.set_weight_bias(conv.weight(), conv.bias())
        replacement.scale, replacement.zero_point = high / QUINT8_MAX, 0
        parent, _, attribute = node.target.rpartition(".")
        setattr(graph_module.get_submodule(parent) if parent else graph_module, attribute, replacement)
        user.replace_all_uses_with(node)
        graph_module.graph.erase_node(user)
        fused.append(node.target)
    if fused:
        graph_module.delete_all_unused_submodules()
        graph_module.graph.lint()
        graph_module.recompile()
    return fused
