"""Where the time goes, per op: autoq's pick beside the peers' compiled models (issue 18.2).

    python benchmarks/op_profile.py --model mobilenet_v2_fashion --plans benchmarks/plans.json \
        [--peers "NNCF default PTQ (OpenVINO),ORT static MinMax"] [--calls 200] [--out benchmarks/PROFILE.md]

autoq's pick is rebuilt from the benchmark's plans.json (`autoq.quantize`); the peers are built as the
benchmark builds them (benchmarks/core.py `peers`). Each is called `--calls` times on the task's example
inputs (the deployment shape) under its runtime's own profiler:

- PyTorch models (eager, FX int8 modules, Inductor): torch.profiler, self CPU time per op (aten, quantized
  and onednn ops; the C++ kernels Inductor generates count as their graph's call);
- OpenVINO models (autoq's OpenVINO lowering, NNCF, OpenVINO FP32): PERF_COUNT, real time per executed
  layer, by layer type and kernel (its `exec_type`, e.g. jit_avx2_I8 or brgconv_avx512_amx_I8);
- ONNX Runtime: its session profile, time per node kernel, by op type and execution provider.

Per model and variant: wall ms per call (timed without the profiler, median of 5 rounds), the ms per call
the profiler attributes to ops, the rest (per-call overhead: Python, conversions, scheduling), and the top
ops with calls per inference, ms per inference and share of the op time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

import autoq
from autoq.plan import QuantPlan
from autoq.recipes.openvino_lowering import OpenVinoLowered, openvino_core
from core import TASKS, cpu_name, peers
from peers import Runtime

TOP = 12
OpTimes = dict[str, tuple[float, float]]  # op -> (calls per inference, ms per inference)


def wall_ms(model: Callable, inputs: tuple, calls: int) -> float:
    """Median over 5 rounds of the mean ms per call, no profiler."""
    rounds = []
    with torch.no_grad():
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls // 5):
                model(*inputs)
            rounds.append((time.perf_counter() - started) * 1000 / (calls // 5))
    return statistics.median(rounds)


def torch_ops(model: Callable, inputs: tuple, calls: int) -> OpTimes:
    with torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(calls):
                model(*inputs)
    return {event.key: (event.count / calls, event.self_cpu_time_total / 1000 / calls)
            for event in profiler.key_averages() if event.self_cpu_time_total > 0}


def openvino_ops(ov_model, config: dict, inputs: tuple, calls: int) -> OpTimes:
    import openvino
    static = ov_model.clone()
    static.reshape({index: list(x.shape) for index, x in enumerate(inputs)})
    request = openvino_core().compile_model(static, "CPU", {**config, "PERF_COUNT": True}).create_infer_request()
    arrays = [x.numpy() for x in inputs]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for _ in range(calls):
        request.infer(arrays)
        for info in request.get_profiling_info():
            if info.status == openvino.ProfilingInfo.Status.EXECUTED:
                total = totals[f"{info.node_type} [{info.exec_type}]"]
                total[0] += 1
                total[1] += info.real_time.total_seconds() * 1000
    return {op: (count / calls, ms / calls) for op, (count, ms) in totals.items()}


def onnxruntime_ops(path: Path, inputs: tuple, calls: int) -> OpTimes:
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        options.enable_profiling, options.profile_file_prefix = True, f"{folder}/ort"
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = dict(zip([node.name for node in session.get_inputs()], [x.numpy() for x in inputs]))
        for _ in range(calls):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total = totals[f"{event['args']['op_name']} [{event['args'].get('provider', '')}]"]
            total[0] += 1
            total[1] += event["dur"] / 1000
    return {op: (count / calls, ms / calls) for op, (count, ms) in totals.items()}


def op_times(model: Callable, inputs: tuple, calls: int) -> tuple[str, OpTimes]:
    """The profiler that sees inside `model`, and its op times."""
    if isinstance(model, OpenVinoLowered):
        return "OpenVINO PERF_COUNT", openvino_ops(model.ov_model, model.config, inputs, calls)
    if isinstance(model, Runtime) and isinstance(model.source, Path):
        return "ONNX Runtime profiling", onnxruntime_ops(model.source, inputs, calls)
    if isinstance(model, Runtime):
        return "OpenVINO PERF_COUNT", openvino_ops(*model.source, inputs, calls)
    return "torch.profiler", torch_ops(model, inputs, calls)


def section(name: str, model: Callable, inputs: tuple, calls: int) -> list[str]:
    with torch.no_grad():
        for _ in range(10):
            model(*inputs)
    wall = wall_ms(model, inputs, calls)
    profiler, ops = op_times(model, inputs, calls)
    in_ops = sum(ms for _, ms in ops.values())
    top = sorted(ops.items(), key=lambda item: -item[1][1])[:TOP]
    return [f"### {name}", "",
            f"{profiler}: {wall:.3f} ms per inference (wall, no profiler); {in_ops:.3f} ms in {len(ops)} op kinds; "
            f"rest {wall - in_ops:+.3f} ms (per-call overhead; negative: the profiler's own cost)", "",
            "| op [kernel] | calls per inference | ms per inference | share of op time |", "|---|---|---|---|",
            *[f"| {op} | {count:.1f} | {ms:.3f} | {ms / in_ops:.0%} |" for op, (count, ms) in top], ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=list(TASKS))
    parser.add_argument("--plans", default="benchmarks/plans.json", help="the benchmark's autoq picks")
    parser.add_argument("--peers", default="NNCF default PTQ (OpenVINO)",
                        help="comma-separated peer methods, as named in the benchmark's table")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    args = parser.parse_args()
    task = TASKS[args.model]()
    inputs = task.example_inputs
    plans = json.loads(Path(args.plans).read_text())
    if args.model not in plans or "autoq" not in plans[args.model]:
        parser.error(f"{args.plans} has no autoq pick for {args.model}: run benchmarks/core.py --out on it first")
    plan = plans[args.model]["autoq"]
    variants = {"FP32 eager": task.model, f"autoq's pick ({QuantPlan.from_dict(plan).recipe})":
                autoq.quantize(task.model, plan, inputs, task.calib)}
    builders = peers(task)
    for method in args.peers.split(","):
        if method not in builders:
            parser.error(f"unknown peer {method!r}; choose from {list(builders)}")
        variants[method] = builders[method]()[0]
    lines = [f"## {args.model}", "",
             f"machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
             f"inputs {[tuple(x.shape) for x in inputs]}; {args.calls} calls each", ""]
    for name, model in variants.items():
        lines += section(name, model, inputs, args.calls)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
