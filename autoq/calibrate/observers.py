"""Observers: the int8 weight observer of a plan, and those that carry a precomputed activation range into
torch's convert_fx and torchao's convert_pt2e."""

from __future__ import annotations

import torch
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver, UniformQuantizationObserverBase
from torchao.quantization.pt2e import observer as pt2e_observer

# int8 weight range by QuantPlan.weight_bits: 7 bits keep u8 x s8 pair sums within int16 (255 * 63 * 2 <
# 32767), so kernels without VNNI cannot saturate; symmetric, so the largest weight maps to 63 exactly in
# both a fake-quant's clamp and convert's rounding
WEIGHT_RANGES = {8: (-128, 127), 7: (-63, 63)}
_WEIGHT_OBSERVERS = {"per_channel": (PerChannelMinMaxObserver, torch.per_channel_symmetric),
                     "per_tensor": (MinMaxObserver, torch.per_tensor_symmetric)}


def weight_observer(weight_granularity: str, weight_bits: int = 8) -> type:
    """The symmetric int8 weight observer of a plan's weight granularity and bits (7: [-63, 63])."""
    observer, qscheme = _WEIGHT_OBSERVERS[weight_granularity]
    quant_min, quant_max = WEIGHT_RANGES[weight_bits]
    return observer.with_args(dtype=torch.qint8, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max)


class FixedRangeObserver(UniformQuantizationObserverBase):
    """Reports qparams for a fixed (min, max) range using torch's own qparam arithmetic."""

    def __init__(self, min_val: float, max_val: float, *, symmetric: bool, reduce_range: bool) -> None:
        super().__init__(
            dtype=torch.quint8,
            qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
            quant_min=0,
            quant_max=127 if reduce_range else 255,
        )
        self.register_buffer("min_val", torch.tensor(float(min_val)))
        self.register_buffer("max_val", torch.tensor(float(max_val)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._calculate_qparams(self.min_val, self.max_val)


class Pt2eFixedRangeObserver(pt2e_observer.UniformQuantizationObserverBase):
    """`FixedRangeObserver` for torchao's PT2E flow: the range is set after prepare_pt2e
    (`set_range`), from the calibration statistics of the tensor it observes."""

    def __init__(self, dtype: torch.dtype = torch.uint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 quant_min: int = 0, quant_max: int = 255, eps: float = torch.finfo(torch.float32).eps,
                 **kwargs) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, eps=eps)
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(1.0))

    def set_range(self, min_val: float, max_val: float) -> None:
        self.min_val.fill_(float(min_val))
        self.max_val.fill_(float(max_val))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._calculate_qparams(self.min_val, self.max_val)
