"""The report's figures as PNG bytes: Pareto front (loss vs speedup) and trial history.

Figures are built with `matplotlib.figure.Figure` (Agg rendering, no pyplot global state).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from autoq.report.content import ReportContent

DPI = 110
KINDS = {  # trial category -> marker style, shared by both figures
    "feasible": {"label": "within budget", "color": "#2a9d8f", "marker": "o"},
    "over budget": {"label": "over budget", "color": "#e76f51", "marker": "o"},
    "pruned": {"label": "pruned (speed only, accuracy not evaluated)", "color": "#8d99ae", "marker": "x"},
    "failed": {"label": "failed (not measured; on the x axis)", "color": "#222222", "marker": "X"},
}
FRONT_COLOR = "#264653"
BUDGET_STYLE = {"color": "#9b2226", "linestyle": "--", "linewidth": 1.2}


def _kind(row: dict[str, Any]) -> str:
    """The category of a trial row: 'feasible', 'over budget', 'pruned' or 'failed'."""
    if row["state"] == "COMPLETE" and row["loss"] is not None:
        return "feasible" if row["feasible"] else "over budget"
    return "pruned" if row["state"] == "PRUNED" else "failed"


def pareto_png(content: ReportContent) -> bytes:
    """Accuracy loss (x) vs speedup over FP32 eager (y) of every evaluated trial, with the front and budget."""
    figure = Figure(figsize=(10, 4.8), layout="constrained")
    axes = figure.add_subplot()
    scale = content.loss_scale
    for kind in ("feasible", "over budget"):
        _scatter(axes, content.rows, kind, lambda r: r["loss"] * scale, lambda r: r["speedup"])
    pruned = [row for row in content.rows if _kind(row) == "pruned" and row["speedup"] is not None]
    if pruned:  # no loss to place them by: ticks on the y axis at their speedup
        axes.scatter([0.0] * len(pruned), [row["speedup"] for row in pruned], transform=axes.get_yaxis_transform(),
                     marker=">", color=KINDS["pruned"]["color"], clip_on=False, zorder=3,
                     label="pruned (speed only; ticks on the y axis)")
    front = content.front  # drawn as the staircase of the best speedup at each loss, out to the largest loss
    right = max([row["loss"] for row in content.rows if row["loss"] is not None] + [content.max_loss])
    axes.step([row["loss"] * scale for row in front] + [right * scale], [row["speedup"] for row in front + front[-1:]],
              where="post", color=FRONT_COLOR, linewidth=1.5, label="Pareto front")
    axes.axvline(content.max_loss * scale, **BUDGET_STYLE, label=f"budget: {content.budget_text}")
    axes.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="FP32 eager (1x)")
    _highlight(axes, content, content.chosen["loss"] * scale)
    axes.set_xlim(left=min(0.0, axes.get_xlim()[0]))  # zero loss in view
    axes.set_xlabel(f"accuracy loss ({content.loss_unit}; lower is better)")
    axes.set_ylabel("speedup vs FP32 eager (x)")
    axes.set_title(f"Loss vs speed of {len(content.rows)} finished trials")
    axes.grid(alpha=0.3)
    _legend(axes)
    return _png(figure)


def history_png(content: ReportContent) -> bytes:
    """Speedup (x) and accuracy loss per trial number, with the best feasible speedup so far and the budget."""
    figure = Figure(figsize=(10, 6.0), layout="constrained")
    speed_axes, loss_axes = figure.subplots(2, 1, sharex=True)
    scale = content.loss_scale
    for kind in ("feasible", "over budget", "pruned"):
        _scatter(speed_axes, content.rows, kind, lambda r: r["number"], lambda r: r["speedup"])
    failed = [row["number"] for row in content.rows if _kind(row) == "failed"]
    if failed:
        speed_axes.scatter(failed, [0.0] * len(failed), transform=speed_axes.get_xaxis_transform(),
                           clip_on=False, zorder=3, **KINDS["failed"])
    numbers, best = _best_feasible_so_far(content.rows)
    if numbers:
        speed_axes.step(numbers, best, where="post", color=FRONT_COLOR, label="best feasible so far")
    _highlight(speed_axes, content, content.chosen["number"])
    speed_axes.set_ylabel("speedup vs FP32 eager (x)")
    speed_axes.set_title("Trial history")
    _legend(speed_axes)
    for kind in ("feasible", "over budget"):
        _scatter(loss_axes, content.rows, kind, lambda r: r["number"], lambda r: r["loss"] * scale)
    loss_axes.axhline(content.max_loss * scale, **BUDGET_STYLE, label=f"budget: {content.budget_text}")
    loss_axes.set_ylabel(f"accuracy loss\n({content.loss_unit})")
    loss_axes.set_xlabel("trial number")
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(loss_axes)
    for axes in (speed_axes, loss_axes):
        axes.grid(alpha=0.3)
    return _png(figure)


def _scatter(axes: Axes, rows: list[dict[str, Any]], kind: str, x: Callable[[dict], float],
             y: Callable[[dict], float]) -> None:
    points = [(x(row), y(row)) for row in rows if _kind(row) == kind and row["speedup"] is not None]
    if points:
        axes.scatter(*zip(*points), alpha=0.85, zorder=3, **KINDS[kind])


def _highlight(axes: Axes, content: ReportContent, x: float) -> None:
    axes.scatter([x], [content.chosen["speedup"]], s=260, marker="*", facecolors="none", edgecolors="black",
                 linewidths=1.3, zorder=4, label=f"{content.chosen_label}: trial {content.chosen['number']}")


def _legend(axes: Axes) -> None:
    """Beside the plot, so it never hides a trial."""
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _best_feasible_so_far(rows: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Trial numbers from the first feasible trial on, and the best feasible speedup (x) up to each."""
    numbers, best, current = [], [], None
    for row in sorted(rows, key=lambda r: r["number"]):
        if _kind(row) == "feasible":
            current = max(current or 0.0, row["speedup"])
        if current is not None:
            numbers.append(row["number"])
            best.append(current)
    return numbers, best


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
