"""This CPU's int8 path: its instruction set, and which kernels saturate with full 8-bit activations.

Without VNNI (AVX2-only CPUs, AVX-512 without VNNI), the u8 x s8 products of an int8 GEMM or conv
go through `vpmaddubsw`, which adds adjacent pairs in saturating int16: 255 * 127 * 2 overflows,
127 * 127 * 2 does not. PyTorch's 7-bit activation default (`reduce_range`) exists for this. Some
kernels saturate even with VNNI (FBGEMM's depthwise conv adds pairs in int16 everywhere).

Which kernels saturate is *measured*, not assumed from CPU flags: a probe runs each library's GEMM
and depthwise kernel on inputs at the top of the 8-bit (and of the 7-bit) range and compares with
the exact sum. The probe sees whatever the libraries do in this process, including the ISA caps
`ONEDNN_MAX_CPU_ISA` and `FBGEMM_ENABLE_INSTRUCTIONS` (read once, when the libraries load), so a
VNNI machine run with both set to AVX2 is an AVX2 machine here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from autoq.dispatch.engine import quantized_engine
from autoq.dispatch.table import current_cpu
from autoq.plan import LIBRARIES

KERNEL_KINDS = ("linear", "conv", "depthwise")  # depthwise: convs with groups == in_channels
ISA_OVERRIDES = ("ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
SATURATION_TOLERANCE = 0.05  # relative error of the probe's sum that counts as saturation
# the libraries a kernel choice may run: 'x86' and 'measured' pick per layer; Inductor lowers to oneDNN
_ENGINE_LIBRARIES = {"fbgemm": ("fbgemm",), "onednn": ("onednn",), "x86": LIBRARIES, "measured": LIBRARIES,
                     "inductor": ("onednn",)}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Int8Path:
    """What int8 kernels do on this CPU.

    isa: the CPU's best int8 instruction set ('amx', 'avx512-vnni', 'avx-vnni', 'avx512', 'avx2',
      'other'), from its flags.
    saturating: (library, kind) kernels whose sums saturate with 8-bit (0..255) activations and
      8-bit weights.
    saturating_7bit: those that saturate even with 7-bit activations (0..127) or with 7-bit weights
      (-63..63) (none expected).
    overrides: the ISA-capping environment variables set in this process.
    """

    isa: str
    saturating: frozenset[tuple[str, str]]
    saturating_7bit: frozenset[tuple[str, str]]
    overrides: tuple[tuple[str, str], ...] = ()

    def full_range_safe(self, engine: str, kinds: Iterable[str] = KERNEL_KINDS) -> bool:
        """Whether 8-bit activations with 8-bit weights are exact for layers of `kinds` under `engine`
        ('x86', 'fbgemm', 'onednn', 'measured' or 'inductor')."""
        kinds = tuple(kinds)
        return not any((library, kind) in self.saturating
                       for library in _ENGINE_LIBRARIES[engine] for kind in kinds)

    def describe(self) -> str:
        """One line: the ISA, and which kernels saturate at full 8-bit range."""
        overrides = f" (capped by {', '.join(f'{k}={v}' for k, v in self.overrides)})" if self.overrides else ""
        if not self.saturating:
            return f"int8 path {self.isa}{overrides}: no kernel saturates with 8-bit activations"
        kernels = ", ".join(f"{library} {kind}" for library, kind in sorted(self.saturating))
        return (f"int8 path {self.isa}{overrides}: {kernels} saturate with 8-bit activations and weights "
                f"(int16 pair sums); 7-bit activations or 7-bit weights sum exactly")


def module_kinds(model: nn.Module) -> dict[str, str]:
    """The KERNEL_KINDS of `model`'s conv and linear modules by module name (LSTM/GRU count as linear)."""
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, _CONVS):
            transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
            kinds[name] = "depthwise" if module.groups == module.in_channels > 1 and not transposed else "conv"
        elif isinstance(module, (nn.Linear, nn.LSTM, nn.GRU)):
            kinds[name] = "linear"
    return kinds


def cpu_isa() -> str:
    """The CPU's best int8 instruction set from its flags: 'amx', 'avx512-vnni', 'avx-vnni', 'avx512',
    'avx2' or 'other'."""
    flags = set(current_cpu().flags)
    for isa, flag in (("amx", "amx_int8"), ("avx512-vnni", "avx512_vnni"), ("avx-vnni", "avx_vnni"),
                      ("avx512", "avx512bw"), ("avx2", "avx2")):
        if flag in flags:
            return isa
    return "other"


@functools.cache
def int8_path() -> Int8Path:
    """This process's int8 path (probed once per process: a few milliseconds)."""
    full, seven_bit = set(), set()
    for library in LIBRARIES:
        for kind in KERNEL_KINDS:
            if _saturates(library, kind, activation=255, weight=127):
                full.add((library, kind))
            if _saturates(library, kind, activation=127, weight=127) or _saturates(library, kind, 255, -63):
                seven_bit.add((library, kind))
    overrides = tuple((name, os.environ[name]) for name in ISA_OVERRIDES if os.environ.get(name))
    return Int8Path(cpu_isa(), frozenset(full), frozenset(seven_bit), overrides)


def _saturates(library: str, kind: str, activation: int, weight: int) -> bool:
    """Whether `library`'s `kind` kernel returns a sum off by more than SATURATION_TOLERANCE when every
    input is `activation` (uint8) and every weight `weight` (int8): the worst case for int16 pair sums.
    A conv is tried unpadded and with padding 1: the libraries pick other kernels for each (on a Xeon with
    AMX, FBGEMM's depthwise saturates padded only; capped at AVX2, its conv saturates unpadded only)."""
    channels = 16
    taps = {"linear": 64, "conv": 9 * channels, "depthwise": 9}[kind]
    exact = float(activation * weight * taps)  # input and weight scale 1: the sum in integer units
    with torch.no_grad(), quantized_engine(library):
        if kind == "linear":
            layers = [(nnq.Linear(taps, channels), (4, taps))]
        else:  # a 3x3 conv on 3x3 pixels: the centre output pixel sums all 9 taps
            groups = channels if kind == "depthwise" else 1
            layers = [(nnq.Conv2d(channels, channels, 3, padding=padding, groups=groups), (1, channels, 3, 3))
                      for padding in (0, 1)]
        for layer, shape in layers:
            weights = torch.quantize_per_tensor(torch.full(layer.weight().shape, float(weight)), 1.0, 0, torch.qint8)
            layer.set_weight_bias(weights, None)
            # the exact sum lands on 200 of 0..255 (a negative one on 55, with the zero point at 255)
            layer.scale, layer.zero_point = abs(exact) / 200, 0 if exact > 0 else 255
            x = torch.quantize_per_tensor(torch.full(shape, float(activation)), 1.0, 0, torch.quint8)
            got = layer(x).dequantize()
            centre = got if kind == "linear" else got[..., got.shape[-2] // 2, got.shape[-1] // 2]
            if (centre - exact).abs().max() > SATURATION_TOLERANCE * abs(exact):
                return True
    return False
