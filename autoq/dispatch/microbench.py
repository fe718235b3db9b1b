"""Timing one int8 layer under each kernel library, in place (real input) or from a shape alone."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from autoq.dispatch.layers import LIBRARIES, LayerShape, pack
from autoq.measure.latency import measurement_settings

_CONV_CLASSES = {"conv1d": nnq.Conv1d, "conv2d": nnq.Conv2d, "conv3d": nnq.Conv3d}


def time_libraries(module: nn.Module, x: torch.Tensor, *, libraries: Sequence[str] = LIBRARIES,
                   seconds: float = 0.1, min_calls: int = 20, warmup: int = 3,
                   threads: int | None = None) -> dict[str, float]:
    """Median time of `module(x)` per call, in microseconds, with weights packed for each library.

    Single calls of the libraries alternate (order rotating) until `seconds` have passed and each
    ran at least `min_calls` times: on a shared VM the speed drifts by 10-20% within a second, and
    only call-by-call alternation keeps that drift out of the comparison. `module` is not modified.
    """
    variants = {}
    for library in libraries:
        variant = copy.deepcopy(module)
        pack(variant, library)
        variants[library] = variant
    samples: dict[str, list[float]] = {library: [] for library in libraries}
    with measurement_settings(threads):
        for variant in variants.values():
            for _ in range(warmup):
                variant(x)
        deadline = time.perf_counter() + seconds
        calls = 0
        while calls < min_calls or time.perf_counter() < deadline:
            shift = calls % len(libraries)
            for library in libraries[shift:] + libraries[:shift]:
                start = time.perf_counter()
                variants[library](x)
                samples[library].append((time.perf_counter() - start) * 1e6)
            calls += 1
    return {library: statistics.median(values) for library, values in samples.items()}


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
