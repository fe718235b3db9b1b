"""Save/load and export of tuned models: do they reproduce the tuned model, and as fast?

    python benchmarks/export.py [--out benchmarks/EXPORT.md] [--rounds 3]

Two cases:
- the demo's model: MobileNetV2 (ImageNet weights) with the Fashion-MNIST probe, as the demo saved
  it (autoq-runs/mobilenet-fashion/model.autoq, written by `make demo`; else autoq's default plan),
  exported to TorchScript;
- MiniLM-L6 sentiment at a PT2E plan (7-bit activations where this CPU's kernels saturate),
  exported to an AOTInductor package.
For each: `autoq.save` -> `autoq.load` on the task's FP32 model (outputs compared), `autoq.export`
-> its run.py in a fresh `python -I` process where importing autoq fails (outputs compared), and
the latency of the exported model (loaded by run.py's own `load()`) against the tuned model,
interleaved in one process, `--rounds` times; the ratio's interval is the spread over rounds and
the rounds' 10th-90th percentiles of per-call ratios.
"""

from __future__ import annotations

import argparse
import json
import runpy
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import autoq
import autoq_zoo as zoo
from autoq.dispatch.isa import int8_path, module_kinds
from autoq.dispatch.table import current_cpu
from autoq.measure.latency import measure_latency

CHILD = ("import runpy, sys; sys.modules['autoq'] = None; sys.argv = ['run.py', {inputs!r}, {outputs!r}]; "
         "runpy.run_path({run!r}, run_name='__main__')")


DEMO_MODEL = Path("autoq-runs/mobilenet-fashion/model.autoq")  # written by `make demo`


def cases() -> list[tuple[str, zoo.Task, Callable[[], torch.nn.Module], str]]:
    """(name, task, build the tuned model, where its plan comes from)."""
    mobilenet = zoo.mobilenet_fashion_task()
    if DEMO_MODEL.is_file():
        demo, source = partial(autoq.load, DEMO_MODEL, mobilenet.model), f"the demo's model ({DEMO_MODEL})"
    else:
        demo = partial(autoq.quantize, mobilenet.model, autoq.QuantPlan(), mobilenet.example_inputs, mobilenet.calib)
        source = f"autoq's default plan (no {DEMO_MODEL}: run `make demo` first)"
    minilm = zoo.minilm_sentiment_task()
    saturating = not int8_path().full_range_safe("inductor", set(module_kinds(minilm.model).values()))
    pt2e = autoq.QuantPlan(recipe="pt2e-static", reduce_range=saturating)
    return [("MobileNetV2 Fashion-MNIST (demo)", mobilenet, demo, source),
            ("MiniLM-L6 sentiment", minilm, partial(autoq.quantize, minilm.model, pt2e, minilm.example_inputs,
                                                     minilm.calib), f"pt2e-static, reduce_range={saturating}")]


def fresh_process_outputs(folder: Path, inputs: tuple, work: Path) -> object:
    torch.save(tuple(inputs), work / "inputs.pt")
    child = CHILD.format(inputs=str(work / "inputs.pt"), outputs=str(work / "outputs.pt"), run=str(folder / "run.py"))
    done = subprocess.run([sys.executable, "-I", "-c", child], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"run.py failed in a fresh process: {done.stderr[-2000:]}")
    return torch.load(work / "outputs.pt", weights_only=True)


def max_difference(a: object, b: object) -> float:
    leaves_a = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    leaves_b = [t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(leaves_a, leaves_b, strict=True))


def bench_case(name: str, task: zoo.Task, build: Callable[[], torch.nn.Module], source: str, rounds: int,
               work: Path) -> dict:
    started = time.perf_counter()
    tuned = build()
    plan = autoq.QuantPlan.from_dict(tuned.meta["autoq"]["plan"])
    built_s = time.perf_counter() - started
    inputs = task.example_inputs
    with torch.no_grad():
        expected = tuned(*inputs)
    started = time.perf_counter()
    autoq.save(tuned, work / "model.autoq")
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = autoq.load(work / "model.autoq", task.model)
    load_s = time.perf_counter() - started
    with torch.no_grad():
        loaded_difference = max_difference(loaded(*inputs), expected)
    started = time.perf_counter()
    written = autoq.export(tuned, work / "export")
    export_s = time.perf_counter() - started
    fresh_difference = max_difference(fresh_process_outputs(written.directory, inputs, work), expected)
    load = runpy.run_path(str(written.directory / "run.py"))["load"]
    models = {"tuned": tuned, "export": load()}
    if written.format == "torchscript":  # what run.py leaves out: freezing (it re-packs every layer for one engine)
        models["frozen"] = torch.jit.freeze(load())
    ratios: dict[str, list[tuple[float, float, float]]] = {"tuned": [], "frozen": []}
    for _ in range(rounds):
        timing = measure_latency(models, inputs, target_seconds=6.0, min_repeats=30)
        for ratio, (numerator, denominator) in {"tuned": ("tuned", "export"), "frozen": ("export", "frozen")}.items():
            if denominator in timing:
                per_call = sorted(n / d for n, d in zip(timing[numerator].samples_ms, timing[denominator].samples_ms))
                ratios[ratio].append((per_call[len(per_call) // 2], per_call[len(per_call) // 10],
                                     per_call[(9 * len(per_call)) // 10]))
    return {
        "case": name, "plan": f"{plan.recipe} ({source})", "format": written.format,
        "file_mb": (work / "model.autoq").stat().st_size / 1e6, "export_mb": written.size_bytes / 1e6,
        "build_s": built_s, "save_s": save_s, "load_s": load_s, "export_s": export_s,
        "loaded_diff": loaded_difference, "fresh_diff": fresh_difference,
        "tuned_ms": timing["tuned"].median_ms, "export_ms": timing["export"].median_ms,
        "tuned_over_export": ratios["tuned"], "export_over_frozen": ratios["frozen"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/EXPORT.md")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for name, task, build, source in cases():
        with tempfile.TemporaryDirectory() as work:
            rows.append(bench_case(name, task, build, source, args.rounds, Path(work)))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Save/load and export: same outputs, same speed", "",
        f"CPU: {current_cpu().describe()}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"{int8_path().describe()}.", f"Command: `python benchmarks/export.py --rounds {args.rounds}`.", "",
        "| model | plan | export | .autoq MB | export MB | save s | load s | export s | max abs diff: loaded / "
        "fresh process | tuned ms | export ms | tuned/export per round (p10-p90 of calls) | export/frozen export |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        def rounds(values: list[tuple[float, float, float]]) -> str:
            return ", ".join(f"{r:.3f} ({low:.2f}-{high:.2f})" for r, low, high in values) or "-"
        lines.append(
            f"| {row['case']} | {row['plan']} | {row['format']} | {row['file_mb']:.1f} | {row['export_mb']:.1f} | "
            f"{row['save_s']:.1f} | {row['load_s']:.1f} | {row['export_s']:.1f} | {row['loaded_diff']:.1e} / "
            f"{row['fresh_diff']:.1e} | {row['tuned_ms']:.2f} | {row['export_ms']:.2f} | "
            f"{rounds(row['tuned_over_export'])} | {rounds(row['export_over_frozen'])} |")
    lines += ["", "Ratios above 1: the export is faster than the tuned model (tuned/export), freezing the "
              "TorchScript export would make it faster (export/frozen; run.py does not freeze: torch.jit.freeze "
              "re-packs every layer for one engine). Timed interleaved in one process (autoq's measure_latency: "
              "rounds alternate the models); the export is loaded by its own run.py."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
