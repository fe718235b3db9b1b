"""The int8 weighted layers of a converted model: their shapes, and which library packs them.

PyTorch prepacks a quantized conv/linear weight for one kernel library (FBGEMM or oneDNN) when the
layer is created; the op then always runs that library, whatever `torch.backends.quantized.engine`
says later. Re-packing a layer under another engine is therefore a per-layer kernel choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from autoq.dispatch.engine import quantized_engine
from autoq.plan import LIBRARIES

__all__ = ["LIBRARIES", "LayerShape", "layer_inputs", "layer_shape", "layer_shapes", "pack", "set_layer_engines",
           "weighted_layers"]
_CONVS = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)  # fused ConvReLU variants are subclasses


@dataclass(frozen=True)
class LayerShape:
    """What a kernel library sees of one int8 layer call.

    kind: 'conv1d' | 'conv2d' | 'conv3d' | 'linear'. For a linear, `batch` is the number of rows
    (all leading dims), `in_channels`/`out_channels` are K/N and the conv-only fields are trivial.
    spatial: input spatial size; channels_last: input laid out NHWC (convs only).
    """

    kind: str
    batch: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    spatial: tuple[int, ...] = ()
    channels_last: bool = False

    def key(self) -> str:
        """Exact signature, e.g. 'conv2d b1 c144>144 k3x3 s1x1 p1x1 d1x1 g144 i56x56 nhwc'."""
        if self.kind == "linear":
            return f"linear m{self.batch} k{self.in_channels} n{self.out_channels}"
        def dims(values: tuple[int, ...]) -> str:
            return "x".join(map(str, values))
        return (f"{self.kind} b{self.batch} c{self.in_channels}>{self.out_channels} k{dims(self.kernel)} "
                f"s{dims(self.stride)} p{dims(self.padding)} d{dims(self.dilation)} g{self.groups} "
                f"i{dims(self.spatial)} {'nhwc' if self.channels_last else 'nchw'}")

    def output_spatial(self) -> tuple[int, ...]:
        return tuple(
            (size + 2 * pad - dil * (k - 1) - 1) // step + 1
            for size, k, step, pad, dil in zip(self.spatial, self.kernel, self.stride, self.padding, self.dilation)
        )

    def kernel_kind(self) -> str:
        """'linear', 'depthwise' (a conv with groups == in_channels > 1) or 'conv'."""
        if self.kind == "linear":
            return "linear"
        return "depthwise" if self.groups == self.in_channels > 1 else "conv"

    def gemm(self) -> tuple[int, int, int]:
        """The per-group GEMM (M rows, K reduction, N columns) the layer amounts to."""
        if self.kind == "linear":
            return self.batch, self.in_channels, self.out_channels
        rows = self.batch * math.prod(self.output_spatial())
        return rows, self.in_channels // self.groups * math.prod(self.kernel), self.out_channels // self.groups

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerShape:
        fields = dict(data)
        for name in ("kernel", "stride", "padding", "dilation", "spatial"):
            fields[name] = tuple(fields.get(name, ()))
        return cls(**fields)


def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized conv and linear modules (static, dynamic and ReLU-fused) by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, (*_CONVS, nnq.Linear))}


def layer_inputs(model: nn.Module, example_inputs: tuple) -> dict[str, torch.Tensor]:
    """The input tensor each weighted layer receives when `model` runs on `example_inputs`."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _, args, name=name: captured.setdefault(name, args[0]))
        for name, module in weighted_layers(model).items()
    ]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def layer_shape(module: nn.Module, x: torch.Tensor) -> LayerShape:
    """The shape signature of `module` called on `x`."""
    if isinstance(module, nnq.Linear):
        return LayerShape("linear", math.prod(x.shape[:-1]), module.in_features, module.out_features)
    kind = f"conv{x.dim() - 2}d"
    return LayerShape(
        kind, int(x.shape[0]), module.in_channels, module.out_channels, tuple(module.kernel_size),
        tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.groups,
        tuple(int(s) for s in x.shape[2:]),
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
    )


def layer_shapes(model: nn.Module, example_inputs: tuple) -> dict[str, LayerShape]:
    """Shape signatures of every weighted layer reached by `example_inputs`."""
    modules = weighted_layers(model)
    return {name: layer_shape(modules[name], x) for name, x in layer_inputs(model, example_inputs).items()}


def pack(module: nn.Module, engine: str) -> None:
    """Re-pack a quantized conv/linear module's weights for `engine` ('fbgemm', 'onednn' or 'x86')."""
    with quantized_engine(engine):
        module.set_weight_bias(module.weight(), module.bias())


def set_layer_engines(model: nn.Module, engines: Mapping[str, str]) -> None:
    """Re-pack the named weighted layers of `model` (in place) under their engines."""
    modules = weighted_layers(model)
    unknown = sorted(set(engines) - set(modules))
    if unknown:
        raise ValueError(
            f"layer_engines names {unknown}, which are not quantized conv/linear modules of this model. "
            f"Known: {sorted(modules)[:20]}{' ...' if len(modules) > 20 else ''}"
        )
    for name, engine in engines.items():
        pack(modules[name], engine)
