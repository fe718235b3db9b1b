"""One PT2E plan, two lowerings: the same int8 graph compiled by Inductor and by OpenVINO (issue 18.3).

    python benchmarks/lowering.py [--models mobilenet_v2_fashion,...] [--out benchmarks/LOWERING.md]

Per model, in one process and one interleaved timing run: autoq's PT2E seed plan (X86InductorQuantizer's
defaults, histogram ranges from autoq's calibration; where this CPU's int8 kernels saturate, once with
7-bit activations and once with 7-bit weights) lowered by Inductor (plan.lowering='inductor') and by
OpenVINO (plan.lowering='openvino'); beside them the best PyTorch FP32, OpenVINO FP32 and NNCF's default PTQ
(benchmarks/peers.py). Top-1 on the validation and held-out test splits; speedups are medians of per-round
ratios with 90% intervals. The quantization is the same in both lowerings, so any accuracy difference
between them is the lowering's.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from autoq.dispatch.isa import int8_path
from autoq.measure.fp32 import best_float
from autoq.measure.latency import measure_latency, speedup_interval
from autoq.plan import INDUCTOR, QuantPlan
from autoq.recipes.pt2e import Pt2eBuilder
from core import TASKS, chosen_models, cpu_name, isa_flags, why_not_run
from peers import nncf_default, openvino_fp32

LOWERINGS = ("inductor", "openvino")


def range_variants() -> dict[str, dict]:
    """The int8 ranges a static PT2E plan gets on this CPU: full 8-bit where its kernels cannot saturate; else
    7-bit activations (reduce_range, autoq's seed) and 7-bit weights with 8-bit activations (the sweep's other
    choice; NNCF's overflow fix does this on the first layer only)."""
    if int8_path().full_range_safe(INDUCTOR):
        return {"8-bit": {"reduce_range": False}}
    return {"7-bit activations": {"reduce_range": True}, "7-bit weights": {"reduce_range": False, "weight_bits": 7}}


def bench_task(name: str) -> tuple[list[str], dict[str, str]]:
    """Table rows of `name`'s model, and {method: reason} for methods that did not run."""
    task = TASKS[name]()
    x, calib = task.example_inputs, [batch if isinstance(batch, tuple) else (batch,) for batch in task.calib]
    builds = {
        "FP32 eager": lambda: task.model,
        "FP32 folded+channels_last": lambda: best_float(task.model, x, rewrite="folded").model,
        "FP32 torch.compile(freezing)": lambda: best_float(task.model, x, rewrite="compiled").model,
        "OpenVINO FP32": lambda: openvino_fp32(task.model, x)[0],
        "NNCF default PTQ (OpenVINO)": lambda: nncf_default(task.model, x, task.calib)[0],
    }
    builder = None
    for ranges, fields in range_variants().items():
        for lowering in LOWERINGS:
            plan = QuantPlan(recipe="pt2e-static", lowering=lowering, **fields)

            def build(plan: QuantPlan = plan) -> torch.nn.Module:
                nonlocal builder
                builder = builder or Pt2eBuilder(task.model, x, calib)
                return builder.build(plan)
            builds[f"autoq PT2E ({ranges}), {lowering}"] = build
    models, skipped = {}, {}
    for method, build in builds.items():
        try:
            models[method] = build()
        except Exception as error:  # a lowering that cannot take this model is a finding
            skipped[method] = why_not_run(error)
    timing = measure_latency(models, x, target_seconds=6.0, min_repeats=30)
    fp32_methods = [m for m in models if m.startswith("FP32")]
    best = min(fp32_methods, key=lambda m: timing[m].median_ms)
    fp32_test = task.accuracy(task.model, "test")
    rows = []
    for method, model in models.items():
        val, test = (task.accuracy(model, split) for split in ("val", "test"))
        ratio, low, high = speedup_interval(timing[best], timing[method])
        rows.append(f"| {name} | {method} | {val:.4f} | {test:.4f} | {(fp32_test - test) / fp32_test:+.2%} | "
                    f"{timing[method].median_ms:.3f} | {ratio:.2f}x [{low:.2f}-{high:.2f}] |")
    for ranges in range_variants():
        same_graph = [f"autoq PT2E ({ranges}), {lowering}" for lowering in LOWERINGS]
        if all(method in models for method in same_graph):
            ratio, low, high = speedup_interval(*(timing[method] for method in same_graph))
            rows.append(f"| {name} | OpenVINO vs Inductor lowering ({ranges}, same graph) | | | | | "
                        f"{ratio:.2f}x [{low:.2f}-{high:.2f}] |")
    return rows, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(TASKS))
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    rows, skipped = [], {}
    for name in chosen_models(parser, args.models):
        task_rows, task_skipped = bench_task(name)
        rows += task_rows
        skipped.update({(name, method): reason for method, reason in task_skipped.items()})
    text = "\n".join([
        f"machine: {cpu_name()} (ISA flags: {isa_flags()}; {int8_path().describe()}), "
        f"{torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; python {platform.python_version()}; {time.perf_counter() - started:.0f} s in all",
        f"command: python {' '.join(sys.argv)}",
        "plans: QuantPlan(recipe='pt2e-static') (X86InductorQuantizer's defaults, histogram ranges) with "
        f"{range_variants()}",
        "",
        "| model | method | val acc | test acc | test loss | ms | vs best PyTorch FP32 [90% interval] |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        *[f"- not run: {model} / {method}: {reason}" for (model, method), reason in skipped.items()],
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(f"# One PT2E plan, two lowerings\n\n{text}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
