"""Empirical bias correction for FX-converted int8 models (Nagel et al. 2019, section 4.2).

Rounding a layer's weights shifts its expected output: E[y_q - y] = (W_q - W) E[x]. With E[x] measured
on calibration data, subtracting that shift from the int8 layer's bias removes the systematic part of
its weight error. A builder does the expensive part once (`input_means` and `float_weights` on the
prepared FP32 graph) and `correct_bias` on each converted candidate.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Collection, Iterator, Mapping, Sequence

import torch
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
from torch import fx, nn

from autoq.dispatch.engine import quantized_engine

MEAN_SAMPLES = 512  # calibration samples whose mean layer inputs correct biases
FLOAT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
INT8_LAYERS = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear)  # ConvReLU, ConvAdd, LinearReLU are subclasses
FloatWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]  # layer name -> FP32 (weight, bias)


def float_layer(model: nn.Module, name: str) -> nn.Module | None:
    """The conv/linear module at `name`, or the first module of the fused ConvReLU/LinearReLU sequence
    prepare_fx puts there; None if `name` is no such module (a functional layer, a typo)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    core = module[0] if isinstance(module, nn.Sequential) and len(module) else module
    return core if isinstance(core, FLOAT_LAYERS) else None


def eval_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode that shares its parameter and buffer tensors: hooks and mode changes on
    the copy leave `model` alone."""
    runner = copy.deepcopy(model, memo={id(t): t for t in itertools.chain(model.parameters(), model.buffers())})
    return runner.eval()


def input_means(model: nn.Module, layer_names: Sequence[str], batches: Sequence[tuple]) -> dict[str, torch.Tensor]:
    """Per-input-channel mean of each named conv/linear module's input over `batches` (tuples of model inputs).

    The channel axis is 1 for a conv and the last for a linear; the mean runs over every other axis and
    every sample. The batches run through a copy of `model` in eval mode that shares its tensors, without
    autograd: neither the model nor the observers of a prepared graph change. Names that are not conv/linear
    modules (functional layers), and layers the batches never reach, are left out of the result.
    """
    runner = eval_copy(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, axis: int, inputs: tuple) -> None:
        x = inputs[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            rows = x.detach().double().movedim(axis, -1).reshape(-1, x.shape[axis])
            sums[name] = sums.get(name, 0) + rows.sum(0)
            counts[name] = counts.get(name, 0) + rows.shape[0]

    for name in layer_names:  # hooks on the throwaway copy only
        layer = float_layer(runner, name)
        if layer is not None:
            axis = -1 if isinstance(layer, nn.Linear) else 1
            runner.get_submodule(name).register_forward_pre_hook(
                lambda _, inputs, name=name, axis=axis: record(name, axis, inputs))
    with torch.no_grad():
        for batch in batches:
            runner(*batch)
    return {name: (total / counts[name]).float() for name, total in sums.items()}


def mean_batches(batches: Sequence[tuple]) -> Sequence[tuple]:
    """The first calibration batches that hold MEAN_SAMPLES samples (all of them if they hold fewer)."""
    ends = itertools.accumulate(int(batch[0].shape[0]) for batch in batches)
    return batches[:next((i + 1 for i, end in enumerate(ends) if end >= MEAN_SAMPLES), len(batches))]


def float_weights(prepared: fx.GraphModule, layer_names: Sequence[str]) -> FloatWeights:
    """The FP32 weight and bias (detached copies) of each named conv/linear of a graph prepared by prepare_fx.

    In eval mode prepare_fx has already folded BatchNorm into the layer's own weight and bias, and keeps a
    layer followed by ReLU inside a fused ConvReLU/LinearReLU sequence at the layer's name; both are
    handled. Names that are not conv/linear modules (functional layers) are left out.
    """
    weights = {}
    for name in layer_names:
        layer = float_layer(prepared, name)
        if layer is not None:
            bias = None if layer.bias is None else layer.bias.detach().clone()
            weights[name] = (layer.weight.detach().clone(), bias)
    return weights


def correct_bias(quantized: fx.GraphModule, weights: FloatWeights, means: Mapping[str, torch.Tensor], *, engine: str,
                 layer_engines: Mapping[str, str] | None = None) -> list[str]:
    """Set each static int8 conv/linear's bias to b - (dequant(W_q) - W) E[x] (in place); returns the layers set.

    weights: FP32 (W, b) by layer name (`float_weights`); means: E[x] per input channel (`input_means`).
    Layers in both mappings are corrected; FP32 fallbacks and dynamic int8 linears are left alone. The FP32
    bias b is the base, so correcting the same model twice gives the same biases. For a conv the shift of
    output o sums the kernel against the means of o's group's input channels; zero padding lowers the true
    mean near the borders, which is ignored.
    engine, layer_engines: the kernel library each layer was packed for (the plan's `engine` and
    `layer_engines`). A packed weight does not record its library and setting the bias re-packs it, so
    it is re-packed under the same one.
    """
    layer_engines = layer_engines or {}
    corrected = []
    for name, module in static_int8_layers(quantized, weights.keys() & means.keys()):
        weight, bias = weights[name]
        shift = output_shift(name, module.weight().dequantize(), weight, means[name], getattr(module, "groups", 1))
        repack(module, module.weight(), (torch.zeros_like(shift) if bias is None else bias) - shift,
               layer_engines.get(name, engine))
        corrected.append(name)
    return corrected


def static_int8_layers(quantized: fx.GraphModule, names: Collection[str]) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of each static int8 conv/linear of a converted model whose name is in `names`, in module
    order; FP32 fallbacks and dynamic int8 linears are not."""
    for name, module in quantized.named_modules():
        if name in names and isinstance(module, INT8_LAYERS) and not isinstance(module, nnqd.Linear):
            yield name, module


def repack(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, engine: str) -> None:
    """Give a static int8 conv/linear a new quantized weight and FP32 bias, packed for kernel library `engine`
    (a packed weight does not record its library, so pass the one the module was packed for)."""
    with quantized_engine(engine):
        module.set_weight_bias(weight, bias)


def output_shift(name: str, dequantized: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                 groups: int) -> torch.Tensor:
    """(W_q - W) E[x] per output channel; weights are (outputs, inputs per group, *kernel)."""
    outputs, inputs = dequantized.shape[:2]
    if weight.shape != dequantized.shape or mean.numel() != inputs * groups:
        raise ValueError(
            f"Layer '{name}' has weights of shape {tuple(dequantized.shape)} ({inputs * groups} inputs), but the "
            f"FP32 weight given has shape {tuple(weight.shape)} and its means {mean.numel()} channels: compute both "
            "with float_weights and input_means on the prepared graph this model was converted from.")
    per_input = (dequantized - weight).reshape(outputs, inputs, -1).sum(2)
    group_means = mean.reshape(groups, 1, inputs).expand(groups, outputs // groups, inputs).reshape(outputs, inputs)
    return (per_input * group_means).sum(1)
