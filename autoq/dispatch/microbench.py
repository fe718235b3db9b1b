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
                   rounds: int = 7, seconds: float = 0.06, threads: int | None = None) -> dict[str, float]:
    """Median time of `module(x)` per call, in microseconds, with weights packed for each library.

    The variants are timed interleaved: each of `rounds` rounds times every library once, over as
    many calls as fit in `seconds / rounds`, so drift hits them alike. `module` is not modified.
    """
    variants = {}
    for library in libraries:
        variant = copy.deepcopy(module)
        pack(variant, library)
        variants[library] = variant
    samples: dict[str, list[float]] = {library: [] for library in libraries}
    with measurement_settings(threads):
        for variant in variants.values():
            variant(x)
        start = time.perf_counter()
        variants[libraries[0]](x)
        single = max(time.perf_counter() - start, 1e-6)
        calls = max(1, min(1000, int(seconds / rounds / len(libraries) / single)))
        for round_index in range(rounds):
            order = libraries[round_index % len(libraries):] + libraries[:round_index % len(libraries)]
            for library in order:
                variant = variants[library]
                start = time.perf_counter()
                for _ in range(calls):
                    variant(x)
                samples[library].append((time.perf_counter() - start) / calls * 1e6)
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
