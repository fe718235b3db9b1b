"""The report page: one self-contained HTML file (CSS inline, PNGs as base64 data URIs, no JS)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import optuna

from autoq.files import write_atomic
from autoq.plan import QuantPlan, recipe_kind
from autoq.report.content import ReportContent, gather
from autoq.report.plots import history_png, pareto_png

LATENCY_LABELS = {"fp32_eager": "FP32 eager", "fp32_best": "best FP32", "int8": "int8"}
STATE_LABELS = {"WAITING": "queued, not started", "RUNNING": "running (or left by a killed run)"}
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.status { font-size: 1.1em; } .finished { color: #2a7d2a; } .unfinished { color: #b35900; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
td { white-space: nowrap; }
thead th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { font-weight: normal; color: #555; }
tr.chosen td { background: #fff3c4; font-weight: 600; }
tr.front td:first-child { border-left: 4px solid #264653; }
td.error { white-space: normal; overflow-wrap: anywhere; max-width: 28em;
           color: #9b2226; font-family: monospace; font-size: 12px; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption, .legend, footer { color: #555; font-size: 0.92em; }
"""


def write_report(study: optuna.Study, out_dir: str | Path) -> dict[str, Path]:
    """Write report.html, pareto.png and history.png for `study` into `out_dir` (created if needed).

    report.html is self-contained (CSS inline, the PNGs inlined as base64; no JS, no network). Works on
    a finished study and on one still running or interrupted (it then shows the best trial so far).
    Raises ValueError if the study has no evaluated trial. Returns {"html", "pareto", "history"} -> path.
    """
    content = gather(study)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {"pareto": pareto_png(content), "history": history_png(content)}
    paths = {}
    for name, png in images.items():
        paths[name] = out / f"{name}.png"
        write_atomic(paths[name], png)
    paths["html"] = out / "report.html"
    write_atomic(paths["html"], render_page(content, images))
    return paths


def render_page(content: ReportContent, images: dict[str, bytes]) -> str:
    """The report as an HTML string; `images` maps 'pareto' and 'history' to PNG bytes."""
    counts = {kind: sum(row["state"] == kind for row in content.rows) for kind in ("PRUNED", "FAIL")}
    status = "finished" if content.finished else f"not finished: {content.chosen_label}"
    chosen = content.chosen_label
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>autoq report: {_text(content.study_name)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>autoq tuning report</h1>",
        f'<p class="status {"finished" if content.finished else "unfinished"}">Study '
        f"<code>{_text(content.study_name)}</code> &mdash; {_text(status)}</p>",
        _facts([
            ("baseline metric (FP32)", f"{content.baseline:.4f}"),
            ("accuracy budget", content.budget_text),
            ("trials", ", ".join(f"{STATE_LABELS.get(state, state)}: {n}"
                                 for state, n in sorted(content.state_counts.items()))),
        ]),
        f"<h2>{'Chosen plan' if content.finished else 'Best plan so far'} (trial {content.chosen['number']})</h2>",
        _facts(_outcome_facts(content)),
        "<ul class=\"notes\">" + "".join(f"<li>{_text(note)}</li>" for note in content.notes) + "</ul>",
        "<h2>Accuracy loss vs speed</h2>",
        _figure(images["pareto"], "Pareto front: accuracy loss vs speedup",
                f"Each dot is an evaluated trial; the step line is the Pareto front (no other trial is both faster "
                f"and more accurate), the dashed line the budget, the star the "
                f"{chosen} trial. {counts['PRUNED']} pruned trials "
                f"(speed measured, accuracy not evaluated) are ticks on the y axis; {counts['FAIL']} failed trials "
                f"are not shown."),
        "<h2>Trial history</h2>",
        _figure(images["history"], "Speedup and accuracy loss per trial",
                "Top: speedup of each trial and the best feasible speedup so far; failed trials are crosses on "
                "the x axis. Bottom: accuracy loss of each evaluated trial and the budget."),
        f"<h2>Trials ({len(content.rows)} finished)</h2>",
        f'<p class="legend">Highlighted: the {chosen} trial. Dark left border: on the Pareto front. '
        "Kernels: the engine, or for per-layer dispatch 'measured oneDNN/FBGEMM' layer counts.</p>",
        _trials_table(content),
        "<h2>Layers</h2>",
        f'<p class="legend">The {chosen} plan per layer, in model order. '
        "Sensitivity: SQNR (dB) of the model output with only that layer int8; lower is more sensitive.</p>",
        _layers_table(content),
        "<footer><p>Written by autoq from the Optuna study alone; the figures are also saved as pareto.png "
        "and history.png next to this file.</p></footer>",
        "</body></html>",
    ])


def _outcome_facts(content: ReportContent) -> list[tuple[str, str]]:
    outcome = content.outcome
    plan = QuantPlan.from_dict(outcome["plan"])
    latency = outcome["latency_ms"]
    where = "final side-by-side measurement" if content.finished else f"trial {content.chosen['number']}"
    precision = recipe_kind(plan.recipe).precision
    labels = {**LATENCY_LABELS, "int8": precision}  # the returned model's, whatever its precision
    facts = [
        (f"{precision} metric", f"{outcome['accuracy']:.4f}" + (f" (FP32 {outcome['fp32']:.4f} on the same samples)"
                                                        if outcome.get("fp32") is not None else "")),
        ("accuracy loss", f"{content.format_loss(outcome['loss'])} "
                          f"({'within' if outcome['feasible'] else 'OVER'} budget)"),
        ("speedup vs FP32 eager", f"{outcome['speedup']:.2f}x ({where})"),
        ("latency per call", " · ".join(f"{labels[name]} {ms:.3f} ms" for name, ms in latency.items())),
    ]
    if "fp32_best" in latency:
        facts.append(("speedup vs best FP32", f"{latency['fp32_best'] / latency['int8']:.2f}x"))
    if outcome.get("guarantee"):
        facts.append(("what is promised", outcome["guarantee"]))
    return facts + [
        ("kernels", plan.kernels()),
        ("activation observer", _observer(plan)),
        ("weights", f"{plan.weight_granularity}, reduce_range={plan.reduce_range}"),
        ("FP32 fallback layers", ", ".join(plan.fp32_layers) or "none"),
        ("recipe", ", ".join([plan.recipe] + [f"{name}={getattr(plan, name)}" for name in recipe_kind(plan.recipe).fields]
                             + [f"calib_samples={plan.calib_samples}"] * recipe_kind(plan.recipe).calibrated)),
    ]


def _trials_table(content: ReportContent) -> str:
    front = {row["number"] for row in content.front}
    body, classes = [], []
    for row in content.rows:
        plan = QuantPlan.from_dict(row["plan"]) if row["plan"] else None
        evaluated = row["state"] == "COMPLETE" and row["loss"] is not None
        body.append([
            row["number"], row["state"],
            plan.kernels() if plan else "–",
            _observer(plan) if plan else "–",
            len(plan.fp32_layers) if plan else "–",
            _number(row["metric"], "{:.4f}"),
            content.format_loss(row["loss"]),
            _number(row["speedup"], "{:.2f}x") + (" [{:.2f}-{:.2f}]".format(*row["speedup_interval"])
                                                   if row.get("speedup_interval") else ""),
            ("yes" if row["feasible"] else "no") if evaluated else "–",
            row["error"] or "",
        ])
        classes.append(" ".join(name for name, on in (("chosen", row is content.chosen),
                                                      ("front", row["number"] in front)) if on))
    headers = ["trial", "state", "kernels", "observer", "FP32 layers", "metric", "loss", "speedup [90% interval]",
               "feasible", "error"]
    return _table("trials", headers, body, classes, numeric={0, 4, 5, 6, 7}, error_column=9)


def _layers_table(content: ReportContent) -> str:
    scores = [layer["sqnr_db"] for layer in content.layers]
    rank = {index: position + 1 for position, index in enumerate(
        sorted((i for i, score in enumerate(scores) if score is not None), key=lambda i: scores[i]))}
    body = [[
        layer["name"],
        _number(layer["sqnr_db"], "{:.1f}") if (layer["sqnr_db"] or 0) < 1e9 else "lossless",
        rank.get(index, "–"),
        "int8" if layer["quantized"] else "FP32",
        layer["observer"] if layer["quantized"] else "–",
        layer["engine"] if layer["quantized"] else "–",
    ] for index, layer in enumerate(content.layers)]
    headers = ["layer", "sensitivity (dB)", "rank (1 = most sensitive)", "precision", "observer", "kernel library"]
    return _table("layers", headers, body, [""] * len(body), numeric={1, 2})


def _table(table_id: str, headers: list[str], body: list[list[Any]], classes: list[str],
           numeric: set[int], error_column: int | None = None) -> str:
    def cell(column: int, value: Any) -> str:
        css = "num" if column in numeric else "error" if column == error_column else ""
        return f'<td class="{css}">{_text(value)}</td>' if css else f"<td>{_text(value)}</td>"

    head = "".join(f"<th>{_text(header)}</th>" for header in headers)
    rows = "".join(
        (f'<tr class="{css}">' if css else "<tr>") + "".join(cell(i, v) for i, v in enumerate(values)) + "</tr>"
        for values, css in zip(body, classes)
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _facts(pairs: list[tuple[str, str]]) -> str:
    rows = "".join(f'<tr><th scope="row">{_text(name)}</th><td>{_text(value)}</td></tr>' for name, value in pairs)
    return f'<table class="facts">{rows}</table>'


def _figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_text(alt)}">'
            f"<figcaption>{_text(caption)}</figcaption></figure>")


def _observer(plan: QuantPlan) -> str:
    overrides = len(plan.layer_observers)
    return plan.activation_observer + (f" (+{overrides} per-layer)" if overrides else "")


def _number(value: float | None, template: str) -> str:
    return "–" if value is None else template.format(value)


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)
