"""Timing int8 layers under each kernel library: inside whole-model runs, alone, or from a shape alone.

Alone, a layer is called over and over with its weights hot in cache; inside a model its weights
are cold, and the libraries' order can flip (benchmarks/dispatch_effects.py: a 128x512x512 linear
is faster on oneDNN hot and on FBGEMM cold). Tuning therefore times each layer inside whole-model
runs; the shape suite, which has no model around its shapes, times them alone.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn

from autoq.dispatch.layers import LIBRARIES, LayerShape, pack, weighted_layers
from autoq.measure.latency import measurement_settings

_CONV_CLASSES = {"conv1d": nnq.Conv1d, "conv2d": nnq.Conv2d, "conv3d": nnq.Conv3d}


def time_libraries(module: nn.Module, x: torch.Tensor, *, libraries: Sequence[str] = LIBRARIES,
                   others: Mapping[str, tuple[Callable, torch.Tensor]] | None = None,
                   seconds: float = 0.1, min_calls: int = 20, warmup: int = 3,
                   threads: int | None = None) -> dict[str, float]:
    """Median time of `module(x)` per call, in microseconds, with weights packed for each library; also of
    each of `others` ({name: (function, its input)}, e.g. `float_kernels`), by name.

    Single calls alternate (order rotating) until `seconds` have passed and each ran at least `min_calls`
    times, so drift of the machine's speed hits all alike (on this project's VM it halved the run-to-run
    change of the FBGEMM/oneDNN ratio compared with timing each library in blocks). `module` is not modified.
    """
    calls: dict[str, tuple[Callable, torch.Tensor]] = {}
    for library in libraries:
        variant = copy.deepcopy(module)
        pack(variant, library)
        calls[library] = (variant, x)
    calls.update(others or {})
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad(), measurement_settings(threads):
        for function, inputs in calls.values():
            for _ in range(warmup):
                function(inputs)
        deadline = time.perf_counter() + seconds
        rounds = 0
        while rounds < min_calls or time.perf_counter() < deadline:
            shift = rounds % len(names)
            for name in names[shift:] + names[:shift]:
                function, inputs = calls[name]
                start = time.perf_counter()
                function(inputs)
                samples[name].append((time.perf_counter() - start) * 1e6)
            rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}


def float_kernels(module: nn.Module, x: torch.Tensor) -> dict[str, tuple[Callable, torch.Tensor]]:
    """The FP32 layer a quantized conv/linear `module` stands for, as PyTorch's float kernels run it, each
    with `x` dequantized (same layout): {'fp32 eager': the eager op (a linear: MKL's GEMM), 'fp32 packed':
    a conv on oneDNN with its weights packed ahead, as torch.compile's freezing packs them (where oneDNN
    takes the shape)}. Which is faster is measured, not assumed."""
    weight, bias = module.weight().dequantize(), module.bias()
    inputs = x.dequantize()
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    if isinstance(module, nnq.Linear):
        return {"fp32 eager": (lambda a: F.linear(a, weight, bias), inputs)}
    geometry = (list(module.padding), list(module.stride), list(module.dilation), module.groups)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[inputs.dim()]
    kernels = {"fp32 eager": (lambda a: conv(a, weight, bias, module.stride, module.padding, module.dilation,
                                             module.groups), inputs)}
    try:
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, list(inputs.shape))
        def run(a: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._convolution_pointwise(a, packed, bias, *geometry, "none", [], "")
        run(inputs)
        kernels["fp32 packed"] = (run, inputs)
    except (RuntimeError, AttributeError):  # no oneDNN in this build, or a shape its packed conv does not take
        pass
    return kernels


def time_layers_in_model(variants: Mapping[str, nn.Module], example_inputs: tuple, *, seconds: float = 1.0,
                         min_runs: int = 5, warmup: int = 2, threads: int | None = None) -> dict[str, dict[str, float]]:
    """{layer: {variant: median microseconds}} of every weighted layer's segment inside whole-model runs.

    A layer's segment runs from its call to the next weighted layer's call (or the end of the
    model), so whatever a library does to the ops after it (thread state, cache contents) counts
    towards its time.
    `variants` are the same model packed differently (e.g. {'fbgemm': ..., 'onednn': ...}); their
    runs alternate until `seconds` have passed and each ran `min_runs` times.
    """
    marks: dict[str, list[tuple[str, float]]] = {name: [] for name in variants}
    hooks = []
    for variant_name, model in variants.items():
        for layer, module in weighted_layers(model).items():
            hooks.append(module.register_forward_pre_hook(
                lambda *_, layer=layer, log=marks[variant_name]: log.append((layer, time.perf_counter()))))
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        with measurement_settings(threads):
            for model in variants.values():
                for _ in range(warmup):
                    model(*example_inputs)
            names = list(variants)
            deadline = time.perf_counter() + seconds
            runs = 0
            while runs < min_runs or time.perf_counter() < deadline:
                shift = runs % len(names)
                for name in names[shift:] + names[:shift]:
                    marks[name].clear()
                    variants[name](*example_inputs)
                    ends = [t for _, t in marks[name][1:]] + [time.perf_counter()]
                    for (layer, start), end in zip(marks[name], ends):
                        samples.setdefault(layer, {}).setdefault(name, []).append((end - start) * 1e6)
                runs += 1
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: {name: statistics.median(values) for name, values in per_variant.items()}
            for layer, per_variant in samples.items() if len(per_variant) == len(variants)}


def synthetic_layer(shape: LayerShape, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A quantized layer of `shape` with random symmetric per-channel int8 weights, and an input for it."""
    generator = torch.Generator().manual_seed(seed)
    if shape.kind == "linear":
        module = nnq.Linear(shape.in_channels, shape.out_channels)
        weight_shape = (shape.out_channels, shape.in_channels)
        x = torch.rand(shape.batch, shape.in_channels, generator=generator)
    else:
        module = _CONV_CLASSES[shape.kind](
            shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.padding,
            shape.dilation, shape.groups,
        )
        weight_shape = (shape.out_channels, shape.in_channels // shape.groups, *shape.kernel)
        x = torch.rand(shape.batch, shape.in_channels, *shape.spatial, generator=generator)
        if shape.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(weight_shape, generator=generator)
    scales = weight.abs().flatten(1).amax(1).clamp_min(1e-6) / 127
    qweight = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
    module.set_weight_bias(qweight, torch.randn(shape.out_channels, generator=generator))
    module.scale, module.zero_point = 0.05, 64
    return module, torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
