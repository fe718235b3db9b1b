"""The observer that carries a precomputed activation range into torch's convert_fx."""

from __future__ import annotations

import torch
from torch.ao.quantization.observer import UniformQuantizationObserverBase


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
