"""The benchmark's figure: held-out accuracy loss vs speedup over the best FP32, per model and method.

Built with `matplotlib.figure.Figure` (Agg rendering, no pyplot global state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

BUDGET = 0.01
LINEAR_LOSS = 2.0  # %: the loss axis is linear up to here and logarithmic beyond (defaults lose up to 85%)
SPEEDUP_TICKS = (0.25, 0.5, 1, 2, 4, 8)
LOSS_TICKS = (-1, -0.5, 0, 0.5, 1, 2, 5, 10, 20, 50, 100)
MARKERS = "osD^vP<>hXp*d"
AUTOQ = {"marker": "*", "s": 260, "color": "#d62828", "edgecolor": "black", "zorder": 5}


class Row(Protocol):
    model: str
    method: str
    test_loss: float
    vs_best: float


def speed_vs_loss_png(rows: Sequence[Row], path: Path) -> None:
    """Write one panel per model (x: test loss, y: speedup vs best FP32, log scale) and a shared legend."""
    models = list(dict.fromkeys(r.model for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows if r.method != "autoq"))
    styles = {method: {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}", "s": 60, "zorder": 3}
              for i, method in enumerate(methods)}
    styles["autoq"] = AUTOQ
    columns = min(3, len(models) + 1)
    figure = Figure(figsize=(5 * columns, 4.2 * math.ceil((len(models) + 1) / columns)), layout="constrained")
    panels = list(figure.subplots(math.ceil((len(models) + 1) / columns), columns, squeeze=False).flat)
    for axes, model in zip(panels, models):
        losses = [r.test_loss * 100 for r in rows if r.model == model]
        for r in (r for r in rows if r.model == model):
            axes.scatter([r.test_loss * 100], [r.vs_best], **styles[r.method])
        left, right = min(losses + [0]) - 0.3, max(losses + [BUDGET * 100]) * 1.4
        axes.axvline(BUDGET * 100, color="#9b2226", linestyle="--", linewidth=1)
        axes.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        axes.set_xscale("symlog", linthresh=LINEAR_LOSS)
        axes.set_xlim(left, right)
        axes.xaxis.set_major_locator(FixedLocator([tick for tick in LOSS_TICKS if left <= tick <= right]))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}%"))
        axes.set_yscale("log", base=2)
        axes.yaxis.set_major_locator(FixedLocator(SPEEDUP_TICKS))
        axes.yaxis.set_minor_locator(NullLocator())
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        axes.set_title(model)
        axes.set_xlabel(f"held-out accuracy loss vs FP32 (%; log beyond {LINEAR_LOSS:g}%)")
        axes.set_ylabel("speedup vs best FP32 (log)")
        axes.grid(alpha=0.3)
    legend = panels[len(models)]
    legend.axis("off")
    handles = [Line2D([], [], linestyle="", marker=style["marker"], color=style["color"],
                      markersize=14 if method == "autoq" else 8, label=method) for method, style in styles.items()]
    handles += [Line2D([], [], color="#9b2226", linestyle="--", label="1% budget"),
                Line2D([], [], color="grey", linestyle=":", label="best FP32 (1x)")]
    legend.legend(handles=handles, loc="center", fontsize=9, frameon=False)
    for axes in panels[len(models) + 1:]:  # unused grid cells
        axes.axis("off")
    figure.savefig(path, dpi=100)
