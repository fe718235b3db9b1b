"""Calibration statistics, gathered once per model and reused by every candidate.

Calibration runs the FP32 model with a `StatsCollector` on every activation that any candidate may
quantize. Two passes over the calibration batches record, per tensor: min/max, moving-average
min/max and histograms (of x and of |x|). Snapshots are taken after given sample counts, so
`calib_samples` is a free search dimension. Every observer method (`autoq.calibrate.ranges`)
computes its range from these statistics: no candidate ever re-runs calibration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch.ao.quantization.observer import ObserverBase

HIST_BINS = 2048
HIST_MAX_ELEMENTS = 1 << 20  # histograms of larger batches use an evenly strided sample
EMA_CONSTANT = 0.01  # same averaging constant as torch's MovingAverageMinMaxObserver


@dataclass
class TensorStats:
    """Statistics of one activation tensor after `samples` calibration samples."""

    samples: int
    min_val: float
    max_val: float
    ema_min: float
    ema_max: float
    hist: torch.Tensor  # counts over [hist_min, hist_max] in HIST_BINS bins
    hist_min: float
    hist_max: float
    abs_hist: torch.Tensor  # counts of |x| over [0, abs_max]
    abs_max: float
    ranges: dict = field(default_factory=dict, repr=False, compare=False)  # memo for ranges.py


class StatsCollector(ObserverBase):
    """Identity observer that records range (phase 'range') or histograms (phase 'histogram')."""

    def __init__(self, dtype: torch.dtype = torch.quint8, **kwargs) -> None:
        super().__init__(dtype=dtype, is_dynamic=False)
        self.phase = "range"
        self.min_val = float("inf")
        self.max_val = float("-inf")
        self.ema_min: float | None = None
        self.ema_max: float | None = None
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64)
        self.abs_hist = torch.zeros(HIST_BINS, dtype=torch.float64)
        self.range_snapshots: list[tuple[float, float, float, float]] = []
        self.hist_snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return x
        values = x.detach().float()
        low, high = (float(v) for v in torch.aminmax(values))
        if not (math.isfinite(low) and math.isfinite(high)):
            values = values[torch.isfinite(values)]
            if values.numel() == 0:
                return x
            low, high = (float(v) for v in torch.aminmax(values))
        if self.phase == "range":
            self.min_val, self.max_val = min(self.min_val, low), max(self.max_val, high)
            if self.ema_min is None:
                self.ema_min, self.ema_max = low, high
            else:
                self.ema_min += EMA_CONSTANT * (low - self.ema_min)
                self.ema_max += EMA_CONSTANT * (high - self.ema_max)
        else:
            if values.numel() > HIST_MAX_ELEMENTS:  # strided sample; min/max above stay exact
                values = values.flatten()[:: values.numel() // HIST_MAX_ELEMENTS + 1]
            low, high = self._hist_range()
            self.hist += torch.histc(values, HIST_BINS, low, high).double()
            self.abs_hist += torch.histc(values.abs(), HIST_BINS, 0.0, self._abs_max()).double()
        return x

    def _hist_range(self) -> tuple[float, float]:
        if self.max_val > self.min_val:
            return self.min_val, self.max_val
        return self.min_val - 1e-6, self.min_val + 1e-6  # constant tensor: any tiny range

    def _abs_max(self) -> float:
        return max(abs(self.min_val), abs(self.max_val), 1e-6)

    def snapshot(self) -> None:
        """Record the statistics so far (called by `collect_stats` at each checkpoint)."""
        if self.phase == "range":
            self.range_snapshots.append((self.min_val, self.max_val, self.ema_min, self.ema_max))
        else:
            self.hist_snapshots.append((self.hist.clone(), self.abs_hist.clone()))

    def results(self, checkpoints: Sequence[int]) -> list[TensorStats]:
        low, high = self._hist_range()
        stats = []
        for samples, ranges, hists in zip(checkpoints, self.range_snapshots, self.hist_snapshots):
            min_val, max_val, ema_min, ema_max = ranges
            if ema_min is None:  # the tensor was never seen (dead branch): no information
                return []
            stats.append(
                TensorStats(samples, min_val, max_val, ema_min, ema_max, hists[0], low, high,
                            hists[1], self._abs_max())
            )
        return stats

    def calculate_qparams(self):  # pragma: no cover - collectors are replaced before convert
        raise RuntimeError("StatsCollector only gathers statistics; autoq replaces it before convert.")


def snapshot_at(snapshots: list[TensorStats], samples: int | None) -> TensorStats | None:
    """The statistics after `samples` calibration samples (None: all; no snapshots: None)."""
    if not snapshots:
        return None
    if samples is None:
        return snapshots[-1]
    fitting = [s for s in snapshots if s.samples <= samples]
    return fitting[-1] if fitting else snapshots[0]


def _batch_size(batch: tuple) -> int:
    first = next((t for t in batch if isinstance(t, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() > 0 else 1


def checkpoints_for(batches: Sequence[tuple], candidates: Iterable[int] = (32, 64, 128, 256, 512, 1024)) -> list[int]:
    """Sample counts (at batch boundaries) where snapshots are taken; the last one is all samples."""
    total, cumulative = 0, []
    for batch in batches:
        total += _batch_size(batch)
        cumulative.append(total)
    points = sorted({next(c for c in cumulative if c >= want) for want in candidates if want < total})
    return sorted(set(points) | {total})


@torch.no_grad()
def collect_stats(model: torch.nn.Module, batches: Sequence[tuple], checkpoints: Sequence[int],
                  progress: Callable[[int], None] | None = None) -> dict[str, list[TensorStats]]:
    """Run two calibration passes over `batches` and return {collector module name: snapshots}.

    progress: called with 1 after each batch of each pass.
    """
    collectors = {name: m for name, m in model.named_modules() if isinstance(m, StatsCollector)}
    for phase in ("range", "histogram"):
        for collector in collectors.values():
            collector.phase = phase
        seen, pending = 0, list(checkpoints)
        for batch in batches:
            model(*batch)
            if progress is not None:
                progress(1)
            seen += _batch_size(batch)
            while pending and seen >= pending[0]:
                pending.pop(0)
                for collector in collectors.values():
                    collector.snapshot()
    return {name: c.results(checkpoints) for name, c in collectors.items()}
