"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction"; AIMET's `equalize_model` does the same).

Per-tensor int8 weights use one grid for all output channels, so a layer whose channels have very
different ranges quantizes its small channels coarsely. If output channel i of one layer is divided by
s_i and input channel i of the next layer is multiplied by s_i, the pair computes the same function
whenever every op between them commutes with a positive per-channel scale: ReLU, LeakyReLU, PReLU,
Identity, dropout (eval) and, between convs, zero padding and pooling. Choosing s_i = sqrt(r1_i / r2_i)
(r: the channel's largest |weight| in each layer) gives both layers the same range per channel.
BatchNorm is folded into the preceding layer first. ReLU6 does not commute (min(6, x / s) != min(6, x) / s);
like DFQ and AIMET, it may be replaced by ReLU, which changes the FP32 function slightly.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS = (*CONVS, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# elementwise and positively homogeneous: f(s * x) = s * f(x) for s > 0, whatever the channel axis
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
               nn.AlphaDropout, nn.FeatureAlphaDropout)
# commute with a per-channel scale of a conv's output (channel axis 1); ZeroPad*d are ConstantPad*d
CHANNELWISE = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
               nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
LEAVES = (*LAYERS, *BATCHNORMS, *HOMOGENEOUS, *CHANNELWISE, nn.Hardtanh)  # nn.ReLU6 is a Hardtanh
RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
CLAMP_FUNCTIONS = (F.relu6, F.hardtanh, torch.clamp, torch.clip)
RELU6_MAX = 6.0
CONVERGED = 1e-3  # a round whose scales all lie within this of 1 ends the iteration


@dataclass
class Equalization:
    """What `equalized` did. model: the new FP32 model (eval mode): a GraphModule with the input's module
    names but without the folded BatchNorms (an unchanged copy when it cannot be traced); plain: conv
    subclasses that pad then convolve, now a zero pad and a plain conv at the same name; folded:
    BatchNorm modules folded into the preceding layer; pairs: (layer, next layer) equalized;
    relu6_replaced: ReLU6 modules replaced by nn.ReLU; skipped: layer, BatchNorm or '<model>' -> why it
    was left alone."""

    model: nn.Module
    plain: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    relu6_replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


class _LayerTracer(fx.Tracer):
    """torch.fx tracer that keeps convs, linears, BatchNorms, activations, padding, pooling and dropout
    whole, subclasses included: a TF-style `Conv2dSame(nn.Conv2d)` that pads in its own forward is a conv."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, LEAVES) or super().is_leaf_module(module, qualified_name)


def equalized(model: nn.Module, *, scale_pairs: bool = True, relu6_to_relu: bool = True,
              rounds: int = 4) -> Equalization:
    """A copy of `model` with BatchNorm folded and consecutive conv/linear pairs equalized (see the module doc).

    The copy is a GraphModule without the folded BatchNorms, so PyTorch's conv-ReLU fusion still applies
    to it; its layers keep their names and classes (a conv subclass stays one). scale_pairs=False only
    folds BatchNorm: the same function, and BatchNorms behind layers FX quantization traces into
    (conv subclasses with their own forward) no longer run as separate int8 ops.

    relu6_to_relu: replace a ReLU6 module (or Hardtanh(0, 6)) between a pair by nn.ReLU, or else skip the pair.
    Functional clamps (F.relu6, torch.clamp) between layers cannot be replaced: such pairs are skipped.
    rounds: passes over all pairs (a chain such as pointwise -> depthwise -> pointwise needs several); stops
    early once every scale is within 1e-3 of 1. `model` is never modified; an untraceable model comes back
    as an unchanged copy, with the reason in `skipped['<model>']`. Conv/linear subclasses that override
    forward are checked to scale their output with their weight and bias (a weight-standardized conv does not).
    Linear -> BatchNorm1d is folded when the sizes match, assuming the BatchNorm normalizes the linear's
    features (2-D outputs: a 3-D output of shape (N, F, F) would be normalized along the other axis).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be a positive number of passes over the layer pairs; got {rounds}.")
    result = Equalization(copy.deepcopy(model).eval())
    try:
        graph = _LayerTracer().trace(result.model)
    except Exception as error:  # tracing errors come in many types
        result.skipped["<model>"] = (f"torch.fx could not trace it ({type(error).__name__}: {error}); "
                                     "nothing was changed")
        return result
    _plain_convs(result, graph)
    calls = Counter(id(_module(result.model, node)) for node in graph.nodes if node.op == "call_module")
    _fold_batchnorms(result, graph, calls)
    pairs = _find_pairs(result, graph, calls, relu6_to_relu) if scale_pairs else []
    for _ in range(rounds):
        if max((_equalize(first, second) for first, second in pairs), default=0.0) < CONVERGED:
            break
    result.model = fx.GraphModule(result.model, graph, class_name=type(model).__name__).eval()
    return result


def _module(model: nn.Module, node: object) -> nn.Module | None:
    """The module a call_module node calls (None for any other node)."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        return model.get_submodule(node.target)
    return None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, module)


def _keeps_forward(module: nn.Module, bases: tuple[type, ...]) -> bool:
    """Whether `module` is an instance of one of `bases` that runs that base's own forward."""
    return any(isinstance(module, base) and type(module).forward is base.forward for base in bases)


def scales_with_weight(layer: nn.Module) -> bool:
    """Whether doubling the layer's weight and bias doubles its output: true of the stock classes, probed
    (on a seeded random input, leaving the global RNG alone) for subclasses that override forward."""
    if _keeps_forward(layer, LAYERS):
        return True
    generator = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Linear):
        shape = (2, layer.in_features)
    else:
        shape = (1, layer.in_channels, *(3 * (k - 1) * d + s + 2
                                         for k, d, s in zip(layer.kernel_size, layer.dilation, layer.stride)))
    probe = copy.deepcopy(layer)
    x = torch.randn(shape, generator=generator)
    try:
        with torch.no_grad():
            once = probe(x)
            for tensor in (probe.weight, probe.bias):
                if tensor is not None:
                    tensor.mul_(2)
            return torch.allclose(probe(x), 2 * once, rtol=1e-4, atol=1e-5)
    except Exception:  # a layer that cannot run on the probe is not equalized
        return False


def _plain_convs(result: Equalization, graph: fx.Graph) -> None:
    """Replace each conv subclass whose forward zero-pads, then convolves with its own weight (TensorFlow
    'same' padding in ports such as EfficientNet-Lite's `Conv2dStaticSamePadding`) by a padding call and a
    plain conv of the base class at the same name: FX quantization traces into the subclass, so its conv
    would be a functional call, without BatchNorm folding, ReLU fusion or per-layer weight recovery."""
    model = result.model
    for node in list(graph.nodes):
        conv = _module(model, node)
        if not isinstance(conv, CONVS) or _keeps_forward(conv, CONVS):
            continue
        base = next(base for base in CONVS if isinstance(conv, base))
        found = _pad_then_conv(conv, base)
        if found is None:
            continue
        pad, padding = found
        plain = base(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                     conv.groups, bias=conv.bias is not None, device="meta")
        plain.weight, plain.bias = conv.weight, conv.bias
        _replace(model, node.target, plain.eval())
        if any(pad):
            with graph.inserting_before(node):
                padded = graph.call_function(F.pad, (node.args[0], tuple(pad)))
            node.replace_input_with(node.args[0], padded)
        result.plain.append(node.target)


_FUNCTIONAL_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _pad_then_conv(conv: nn.Module, base: type) -> tuple[tuple[int, ...], object] | None:
    """(zero pad, conv padding) when `conv`'s forward is exactly: zero-pad the input (a ConstantPad module
    with value 0, F.pad with value 0, or nothing), then the functional conv with its own weight, bias,
    stride, dilation and groups; None for any other forward."""
    try:
        graph = fx.symbolic_trace(conv).graph
    except Exception:  # a forward torch.fx cannot trace is left as it is
        return None
    nodes = [node for node in graph.nodes if node.op not in ("placeholder", "output", "get_attr")]
    pad: tuple[int, ...] = ()
    if len(nodes) == 2:
        padder = nodes[0]
        module = conv.get_submodule(padder.target) if padder.op == "call_module" else None
        if isinstance(module, CHANNELWISE[:3]) and module.value == 0:
            pad = tuple(module.padding)
        elif padder.op == "call_function" and padder.target is F.pad and not padder.kwargs.get("value") and \
                padder.kwargs.get("mode", "constant") == "constant" and len(padder.args) == 2:
            pad = tuple(padder.args[1])
        else:
            return None
    elif len(nodes) != 1:
        return None
    call = nodes[-1]
    if call.op != "call_function" or call.target is not _FUNCTIONAL_CONVS[base] or call.kwargs:
        return None
    args = list(call.args) + [None] * (7 - len(call.args))
    weight, bias, stride, padding, dilation, groups = args[1:]
    own = (getattr(weight, "target", None) == "weight" and
           (bias is None and conv.bias is None or getattr(bias, "target", None) == "bias"))
    same = (tuple(stride or (1,)) == tuple(conv.stride) or stride is None and set(conv.stride) == {1}) and \
        tuple(dilation or conv.dilation) == tuple(conv.dilation) and (groups or 1) == conv.groups
    if not own or not same or isinstance(padding, str):
        return None
    return pad, padding if padding is not None else 0


def _fold_batchnorms(result: Equalization, graph: fx.Graph, calls: Counter) -> None:
    """Fold each BatchNorm that is the only user of a conv/linear output into that layer (eval statistics)
    and take it out of the graph."""
    model = result.model
    for node in list(graph.nodes):
        batchnorm = _module(model, node)
        if not isinstance(batchnorm, BATCHNORMS) or not node.args:
            continue
        layer = _module(model, node.args[0])
        if not isinstance(layer, LAYERS):
            continue
        reason = _fold_blocker(node.args[0], layer, batchnorm, calls)
        if reason:
            result.skipped[node.target] = reason
            continue
        with torch.no_grad():
            layer.weight, layer.bias = fuse_conv_bn_weights(
                layer.weight, layer.bias, batchnorm.running_mean, batchnorm.running_var, batchnorm.eps,
                batchnorm.weight, batchnorm.bias)
        result.folded.append(node.target)
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)


def _fold_blocker(layer_node: fx.Node, layer: nn.Module, batchnorm: nn.Module, calls: Counter) -> str:
    """Why the BatchNorm cannot be folded into the layer before it ('' if it can)."""
    channels = layer.weight.shape[0]
    if len(layer_node.users) > 1:
        return f"the output of '{layer_node.target}' is used {len(layer_node.users)} times, not only by the BatchNorm"
    if calls[id(layer)] > 1 or calls[id(batchnorm)] > 1:
        return f"'{layer_node.target}' or its BatchNorm is called more than once (shared modules)"
    if batchnorm.running_mean is None:
        return "it keeps no running statistics (track_running_stats=False)"
    not_1d_after_linear = isinstance(layer, nn.Linear) and not isinstance(batchnorm, nn.BatchNorm1d)
    if batchnorm.num_features != channels or not_1d_after_linear:
        return f"it normalizes {batchnorm.num_features} features, not the {channels} outputs of '{layer_node.target}'"
    if not scales_with_weight(layer):
        return f"'{layer_node.target}' ({type(layer).__name__}) does not scale its output with its weight"
    return ""


def _find_pairs(result: Equalization, graph: fx.Graph, calls: Counter,
                relu6_to_relu: bool) -> list[tuple[nn.Module, nn.Module]]:
    """Equalizable (layer, next layer) pairs, recorded in `result`, with their ReLU6s replaced by ReLU."""
    model, pairs = result.model, []
    for node in graph.nodes:
        if not isinstance(_module(model, node), LAYERS):
            continue
        found = _next_layer(model, node, calls, relu6_to_relu)
        if isinstance(found, str):
            result.skipped[node.target] = found
            continue
        second, bounded = found
        for name in bounded:
            _replace(model, name, nn.ReLU())
        result.relu6_replaced += bounded
        result.pairs.append((node.target, second.target))
        pairs.append((_module(model, node), _module(model, second)))
    return pairs


def _next_layer(model: nn.Module, start: fx.Node, calls: Counter,
                relu6_to_relu: bool) -> tuple[fx.Node, list[str]] | str:
    """The conv/linear that `start`'s output reaches through ops that commute with per-channel scales, with
    the ReLU6 modules on the way; or why there is none."""
    first = _module(model, start)
    node, bounded = start, []
    while True:
        if len(node.users) != 1:
            return f"the output of '{_label(node)}' is used {len(node.users)} times"
        node = next(iter(node.users))
        module = _module(model, node)
        if isinstance(module, LAYERS):
            return _pair_blocker(start, first, node, module, calls) or (node, bounded)
        if node.op == "output":
            return "its output is returned by the model"
        step = _step_kind(node, module, isinstance(first, CONVS), calls)
        if step == "bounded" and relu6_to_relu:
            bounded.append(node.target)
        elif step == "bounded":
            return f"ReLU6 '{node.target}' follows and relu6_to_relu=False (ReLU6 does not commute with scaling)"
        elif step != "through":
            return step


def _label(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _step_kind(node: fx.Node, module: nn.Module | None, after_conv: bool, calls: Counter) -> str:
    """'through' (commutes with per-channel scales), 'bounded' (a ReLU6 module, replaceable by ReLU), or why
    the op stops the search for a next layer."""
    if module is not None:
        if _keeps_forward(module, HOMOGENEOUS):
            return "through"
        if after_conv and _keeps_forward(module, CHANNELWISE) and getattr(module, "value", 0) == 0:
            return "through"
        if _keeps_forward(module, (nn.Hardtanh,)) and (module.min_val, module.max_val) == (0.0, RELU6_MAX):
            if calls[id(module)] > 1:
                return f"ReLU6 '{node.target}' is called more than once; replacing it would change every call"
            return "bounded"
        return f"'{node.target}' ({type(module).__name__}) follows, which does not commute with per-channel scales"
    if (node.op == "call_function" and node.target in RELU_FUNCTIONS) or (
            node.op == "call_method" and node.target in ("relu", "relu_")):
        return "through"
    if node.op == "call_function" and node.target in CLAMP_FUNCTIONS:
        return (f"functional {node.target.__name__} '{node.name}' follows, which does not commute with scaling "
                "and cannot be replaced (use an nn.ReLU6 module to allow relu6_to_relu)")
    target = getattr(node.target, "__name__", node.target)
    return f"'{node.name}' ({node.op} {target}) follows, which is no conv/linear and does not commute with scaling"


def _pair_blocker(start: fx.Node, first: nn.Module, node: fx.Node, second: nn.Module, calls: Counter) -> str:
    """Why the two layers cannot be equalized ('' if they can)."""
    if calls[id(first)] > 1 or calls[id(second)] > 1:
        return f"'{start.target}' or '{node.target}' is called more than once (shared weights)"
    if isinstance(first, CONVS) != isinstance(second, CONVS) or first.weight.dim() != second.weight.dim():
        return f"'{start.target}' -> '{node.target}' joins layers of different kinds, whose channel axes differ"
    inputs = second.weight.shape[1] * getattr(second, "groups", 1)
    if first.weight.shape[0] != inputs:
        return f"'{start.target}' has {first.weight.shape[0]} output channels but '{node.target}' takes {inputs}"
    for name, layer in ((start.target, first), (node.target, second)):
        if not scales_with_weight(layer):
            return f"'{name}' ({type(layer).__name__}) does not scale its output with its weight"
    return ""


@torch.no_grad()
def _equalize(first: nn.Module, second: nn.Module) -> float:
    """Divide output channel i of `first` (and its bias) by s_i and multiply input channel i of `second` by
    s_i, s_i = sqrt(r1_i / r2_i); channels with a zero range keep s_i = 1. Returns max |s_i - 1|.

    In a grouped `second`, input channel c is input c % (C / groups) of group c // (C / groups)."""
    channels, groups = first.weight.shape[0], getattr(second, "groups", 1)
    per_group = channels // groups
    # (groups, outputs per group, inputs per group, kernel elements)
    columns = second.weight.reshape(groups, second.weight.shape[0] // groups, per_group, -1)
    first_range = first.weight.abs().reshape(channels, -1).amax(1)
    second_range = columns.abs().amax(dim=(1, 3)).reshape(channels)
    usable = (first_range > 0) & (second_range > 0)
    scales = torch.where(usable, torch.sqrt(first_range / second_range.where(usable, 1.0)), 1.0)
    first.weight.div_(scales.reshape(-1, *[1] * (first.weight.dim() - 1)))
    if first.bias is not None:
        first.bias.div_(scales)
    second.weight.copy_((columns * scales.reshape(groups, 1, per_group, 1)).reshape(second.weight.shape))
    return float((scales - 1).abs().max())
