"""Core benchmark: autoq beside the alternatives users weigh it against, on real trained models.

    python benchmarks/core.py [--trials N] [--models mnist_cnn,ucr_lstm,...] [--out benchmarks/RESULTS.md]

Per model, in one process and one interleaved timing run:
  FP32 eager; FP32 folded + channels_last; FP32 torch.compile (freezing); bf16 autocast (eager and
  compiled); PyTorch's default FX PTQ on the x86, fbgemm and onednn engines; PyTorch's default
  `quantize_dynamic` (models without convolutions); torchao's default PT2E static flow through
  Inductor, plain and int8-mixed-bf16; Intel Neural Compressor 3.10's static autotune (PT2E, same
  1% relative tolerance, same calibration data and metric) and its default dynamic config (models
  without convolutions; needs the `inc` extra, else listed as not run); autoq (all recipes that
  apply, 1% relative budget, same calibration data; with up to 4096 of the task's training
  samples, so QAT is tried when post-training misses); and, where the task has training data,
  autoq pinned to the QAT recipes (FX and PT2E). The peers in other runtimes (benchmarks/peers.py, the
  `peers` extra): OpenVINO FP32, NNCF default PTQ, NNCF accuracy control (1% relative, the same
  validation split), ONNX Runtime FP32, ORT static QDQ (MinMax, Entropy, Percentile) and, on models
  without convolutions, ORT dynamic.
Accuracy is top-1 on the validation split the tuner sees and on a held-out test split it never
sees. Methods that do not apply to a model are listed under the table with the reason.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import autoq
import autoq_zoo as zoo
from autoq_zoo.baselines import bf16_autocast, default_dynamic, default_fx_ptq, default_pt2e
from autoq.dispatch.isa import cpu_isa
from autoq.dispatch.table import ISA_FLAGS, current_cpu
from autoq.measure.fp32 import best_float
from autoq.measure.latency import measure_latency, speedup, speedup_interval
from autoq.plan import QuantPlan, default_plan
from autoq.search.objective import plan_changes
from inc import inc_autotune, inc_default_dynamic
from peers import VNNI_ISAS, OnnxModel, nncf_accuracy_control, nncf_default, openvino_fp32
from plot import speed_vs_loss_png

TASKS: dict[str, Callable[[], zoo.Task]] = {
    "mnist_cnn": zoo.mnist_cnn_task,
    "ucr_lstm": zoo.ucr_lstm_task,
    "resnet18_fashion": zoo.resnet18_fashion_task,
    # 2000 validation images: on 1000, autoq's fastest in-budget plan lost 1.28% on the test images
    "mobilenet_v2_fashion": lambda: zoo.mobilenet_fashion_task(n_val=2000, n_test=2000),
    # 3000 validation sentences: with 1000, a 1% loss hides in the noise (+-1.3 points)
    "minilm_sentiment": lambda: zoo.minilm_sentiment_task(n_val=3000, n_test=3000),
}
FP32_METHODS = ("FP32 eager", "FP32 folded+channels_last", "FP32 torch.compile(freezing)")
QAT_TRIALS = 6
QAT_BATCHES = 64  # of 64 samples: QAT fine-tunes on at most 4096 training samples (ResNet-18 has 12,000)


@dataclass
class Tuning:
    recipe: str  # what the tuner picked (for autoq: the recipe and what its plan changes from PyTorch's default)
    trials: int | None  # candidates evaluated (None: the tool does not say)
    first_ok: int | None  # 0-based index of the first candidate within the budget
    first_ok_s: float | None  # wall seconds from the start until that candidate was evaluated
    tune_s: float  # wall seconds, compiling and evaluating included
    confirmed: tuple[float, float | None] | None = None  # autoq: loss on its held-back val samples, upper bound
    plan: dict | None = None  # autoq: the pick's plan (QuantPlan.to_dict), which rebuilds it with autoq.quantize


@dataclass
class Row:
    model: str
    method: str
    val: float
    test: float
    test_loss: float
    ms: float
    vs_eager: float
    vs_best: float
    tuning: Tuning | None = None  # tuned methods only
    vs_best_interval: tuple[float, float] = (math.nan, math.nan)  # 90% interval of vs_best (per-round ratios)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def isa_flags() -> str:
    """This CPU's int8/bf16-relevant ISA flags."""
    return " ".join(flag for flag in ISA_FLAGS if flag in current_cpu().flags) or f"none of {' '.join(ISA_FLAGS)}"


def chosen_models(parser: argparse.ArgumentParser, models: str) -> list[str]:
    """The comma-separated `models` (a --models argument), each a key of TASKS."""
    names = models.split(",")
    unknown = set(names) - set(TASKS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(TASKS)}")
    return names


def baselines(task: zoo.Task) -> dict[str, Callable[[], nn.Module]]:
    """The non-autoq methods, as builders (a builder may raise: the method does not apply)."""
    calib = [batch if isinstance(batch, tuple) else (batch,) for batch in task.calib]
    x = task.example_inputs
    methods = {
        "FP32 eager": lambda: task.model,
        "FP32 folded+channels_last": lambda: best_float(task.model, x, rewrite="folded").model,
        "FP32 torch.compile(freezing)": lambda: best_float(task.model, x, rewrite="compiled").model,
        "bf16 autocast (eager)": lambda: bf16_autocast(task.model, x, compile=False),
        "bf16 autocast (compiled)": lambda: bf16_autocast(task.model, x, compile=True),
    }
    for engine in ("x86", "fbgemm", "onednn"):
        methods[f"default FX PTQ ({engine})"] = lambda engine=engine: default_fx_ptq(task.model, x, calib, engine)
    methods["default quantize_dynamic"] = lambda: default_dynamic(_without_conv(task.model))
    methods["INC default dynamic (PT2E)"] = lambda: inc_default_dynamic(_without_conv(task.model), x)
    methods["torchao PT2E static (Inductor)"] = lambda: default_pt2e(task.model, x, calib)
    methods["torchao PT2E int8-mixed-bf16"] = lambda: default_pt2e(task.model, x, calib, mixed_bf16=True)
    return methods


def why_not_run(error: Exception) -> str:
    """Why a method did not run: the error's type and first line."""
    return f"{type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}"


def _has_no_conv(model: nn.Module) -> bool:
    return not any(isinstance(module, nn.modules.conv._ConvNd) for module in model.modules())


def _without_conv(model: nn.Module) -> nn.Module:
    if not _has_no_conv(model):
        raise ValueError("a conv net: dynamic quantization would convert its Linear head only")
    return model


def peers(task: zoo.Task) -> dict[str, Callable[[], tuple[Callable, Tuning]]]:
    """OpenVINO + NNCF and ONNX Runtime, as their documentation tells a user to run them (benchmarks/peers.py)."""
    x, calib = task.example_inputs, task.calib
    matmul_only = _has_no_conv(task.model)
    onnx = functools.cache(lambda: OnnxModel(task.model, x))

    def tuned(description: str, build: Callable[[], tuple[Callable, float]]) -> Callable[[], tuple[Callable, Tuning]]:
        def run() -> tuple[Callable, Tuning]:
            model, seconds = build()
            return model, Tuning(description, None, None, None, seconds)
        return run
    ort_static = f"QDQ u8/s8 per-channel{', reduce_range' if cpu_isa() not in VNNI_ISAS else ''}" + (
        ", MatMul/Gemm only" if matmul_only else "")
    methods = {
        "OpenVINO FP32": tuned("f32", lambda: openvino_fp32(task.model, x)),
        "NNCF default PTQ (OpenVINO)": tuned("nncf.quantize defaults", lambda: nncf_default(task.model, x, calib)),
        "NNCF accuracy control (OpenVINO)": tuned(
            "max_drop 1% relative, val split", lambda: nncf_accuracy_control(task.model, x, calib, task.eval_data(),
                                                                             task.score)),
        "ORT FP32": tuned("opset 17", lambda: onnx().fp32()),
    }
    for method in ("MinMax", "Entropy", "Percentile"):
        methods[f"ORT static {method}"] = tuned(ort_static, lambda method=method: onnx().static(calib, method,
                                                                                                 matmul_only))
    if matmul_only:
        methods["ORT dynamic"] = tuned("MatMul/Gemm, per-channel", lambda: onnx().dynamic())
    return methods


def tune(task: zoo.Task, trials: int, storage: str, recipes: list[str] | None = None) -> tuple[nn.Module, Tuning]:
    """autoq with a 1% relative budget (and the task's training data, for QAT, where it has some)."""
    training: dict = {}
    if task.train is not None:
        training = dict(train_data=list(itertools.islice(task.batches("train", batch_size=64), QAT_BATCHES)),
                        loss_fn=F.cross_entropy)
    if recipes:
        training["space"] = {"recipes": recipes}
    started, started_at = time.perf_counter(), time.time()
    result = autoq.tune(task.model, task.example_inputs, task.calib, eval_data=task.eval_data(), metric=task.score,
                        max_loss=0.01, n_trials=trials, storage=storage, verbose=False, **training)
    first_ok = next((t for t in result.trials if t["feasible"]), None)
    plan = QuantPlan.from_dict(result.plan)
    changes = " ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
                       for name, value in plan_changes(plan, default_plan("x86")).items() if name != "recipe")
    return result.model, Tuning(f"{plan.recipe} {changes}".strip(), len(result.trials),
                                first_ok and first_ok["number"], first_ok and first_ok["finished"] - started_at,
                                time.perf_counter() - started, (result.loss, result.verdict.get("upper")),
                                result.plan)


def inc(task: zoo.Task) -> tuple[nn.Module, Tuning]:
    """Intel Neural Compressor's static autotune with the same 1% relative tolerance."""
    accuracy = functools.partial(task.accuracy, split="val")  # INC takes one number
    model, stats = inc_autotune(task.model, task.example_inputs, task.calib, accuracy, tolerable_loss=0.01)
    return model, Tuning(stats["config"], stats["trials"], stats["first_ok"], stats["first_ok_s"], stats["tune_s"])


def bench_task(name: str, trials: int, storage_dir: str) -> tuple[list[Row], dict[str, str]]:
    """Rows of every method that applies to `name`'s model, and {method: reason} for the others."""
    task = TASKS[name]()
    models, skipped, tuned = {}, {}, {}
    for method, build in baselines(task).items():
        try:
            models[method] = build()
        except Exception as error:  # a baseline that cannot handle this model is a finding, not a crash
            skipped[method] = why_not_run(error)
    storage = f"sqlite:///{storage_dir}/{name}.db"
    tuners = {"INC 3.10 autotune (PT2E static)": lambda: inc(task), **peers(task),
              "autoq": lambda: tune(task, trials, storage)}
    if task.train is not None:
        tuners["autoq, QAT recipes pinned"] = lambda: tune(task, min(trials, QAT_TRIALS),
                                                           storage.replace(".db", "-qat.db"), ["qat", "pt2e-qat"])
    for method, run in tuners.items():
        try:
            tuned[method] = run()
        except Exception as error:
            skipped[method] = why_not_run(error)
    models.update({method: model for method, (model, _) in tuned.items()})
    timing = measure_latency(models, task.example_inputs, target_seconds=6.0, min_repeats=30)
    best = min((m for m in models if m in FP32_METHODS), key=lambda m: timing[m].median_ms)
    fp32 = {split: task.accuracy(task.model, split) for split in ("val", "test")}
    rows = []
    for method, model in models.items():
        # FP32 rewrites are checked to match eager outputs (best_fp32), so they share its metrics
        metrics = fp32 if method in FP32_METHODS else {split: task.accuracy(model, split) for split in ("val", "test")}
        rows.append(Row(name, method, metrics["val"], metrics["test"], (fp32["test"] - metrics["test"]) / fp32["test"],
                        timing[method].median_ms, speedup(timing["FP32 eager"], timing[method]),
                        speedup(timing[best], timing[method]), tuned[method][1] if method in tuned else None,
                        speedup_interval(timing[best], timing[method])[1:]))
    return rows, skipped


def table(rows: list[Row]) -> list[str]:
    """Markdown table of `rows`, then one geomean row per method over the models it ran on."""
    lines = ["| model | method | recipe | val acc | test acc | test loss | confirmed loss (90% bound) | ms | vs eager "
             "| vs best PyTorch FP32 [90% interval] | trials | 1st in-budget (trial, time) | tune s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bold = "**" if r.method == "autoq" else ""
        t = r.tuning
        first_ok = "-" if t is None or t.first_ok is None else f"#{t.first_ok}, {t.first_ok_s:.0f} s"
        recipe, extra = ("", " | | ") if t is None else (
            t.recipe, f"{'-' if t.trials is None else t.trials} | {first_ok} | {t.tune_s:.0f}")
        confirmed = "" if t is None or t.confirmed is None else f"{t.confirmed[0]:+.2%}" + (
            f" ({t.confirmed[1]:+.2%})" if t.confirmed[1] is not None else "")
        lines.append(f"| {r.model} | {bold}{r.method}{bold} | {recipe} | {r.val:.4f} | {r.test:.4f} | "
                     f"{r.test_loss:+.2%} | {confirmed} | {r.ms:.3f} | {r.vs_eager:.2f}x | {r.vs_best:.2f}x "
                     f"[{r.vs_best_interval[0]:.2f}-{r.vs_best_interval[1]:.2f}] | {extra} |")
    for method in dict.fromkeys(r.method for r in rows):
        ran = [r for r in rows if r.method == method]
        geo = {key: math.exp(sum(math.log(getattr(r, key)) for r in ran) / len(ran)) for key in ("vs_eager", "vs_best")}
        lines.append(f"| geomean ({len(ran)} models) | {method} | | | | | | | {geo['vs_eager']:.2f}x | "
                     f"{geo['vs_best']:.2f}x | | | |")
    return lines


def coverage(rows: list[Row]) -> list[str]:
    """How often autoq's upper bound (on held-back validation samples) covered the held-out test loss."""
    bounded = [r for r in rows if r.tuning and r.tuning.confirmed and r.tuning.confirmed[1] is not None]
    covered = [r for r in bounded if r.test_loss <= r.tuning.confirmed[1]]
    within = [r for r in rows if r.method == "autoq" and r.test_loss <= 0.01]
    return [f"- autoq's 90% upper bound covered the test-split loss in {len(covered)} of {len(bounded)} tuned runs; "
            f"autoq's pick stayed within the 1% budget on the test split on {len(within)} of "
            f"{sum(r.method == 'autoq' for r in rows)} models."]


def peers_ahead(rows: list[Row], budget: float = 0.01) -> list[str]:
    """One line per (model, method) that is faster than autoq's row while within `budget` held-out loss."""
    autoq_rows = {r.model: r for r in rows if r.method == "autoq"}
    return [f"- {r.model}: {r.method} {r.vs_best:.2f}x vs autoq {autoq_rows[r.model].vs_best:.2f}x best PyTorch FP32 "
            f"(held-out loss {r.test_loss:+.2%} vs {autoq_rows[r.model].test_loss:+.2%})"
            for r in rows if r.model in autoq_rows and r.method != "autoq" and r.test_loss <= budget
            and r.vs_best > autoq_rows[r.model].vs_best]


def runtime(method: str) -> str:
    """The runtime a benchmark method deploys on (autoq's own rows count as PyTorch, whatever the lowering)."""
    return "OpenVINO" if "OpenVINO" in method else "ONNX Runtime" if method.startswith("ORT") else "PyTorch"


def by_runtime(rows: list[Row], budget: float = 0.01) -> list[str]:
    """Per model, autoq's pick beside the fastest method of each runtime within `budget` held-out loss, and
    autoq's speed over the fastest of them (speeds are vs the best PyTorch FP32, from the same timing run)."""
    runtimes = ("PyTorch", "OpenVINO", "ONNX Runtime")
    header = " | ".join(f"fastest in budget: {name}" for name in runtimes)
    lines = [f"| model | autoq (held-out loss, vs best FP32) | {header} | autoq / fastest peer |",
             "|---|---|" + "---|" * len(runtimes) + "---|"]
    for model in dict.fromkeys(r.model for r in rows):
        ours = next((r for r in rows if r.model == model and r.method == "autoq"), None)
        if ours is None:
            continue
        best = {}
        for name in runtimes:
            ok = [r for r in rows if r.model == model and runtime(r.method) == name and r.test_loss <= budget
                  and not r.method.startswith("autoq")]
            best[name] = max(ok, key=lambda r: r.vs_best, default=None)
        cells = [f"{r.method}, {r.test_loss:+.2%}, {r.vs_best:.2f}x" if r else "-" for r in best.values()]
        peer = max((r for r in best.values() if r), key=lambda r: r.vs_best)
        plan = QuantPlan.from_dict(ours.tuning.plan) if ours.tuning and ours.tuning.plan else None
        pick = (ours.tuning.recipe.split(" ")[0] if ours.tuning else "") + (
            " lowered by OpenVINO" if plan and plan.lowering == "openvino" else "")
        lines.append(f"| {model} | {pick}, {ours.test_loss:+.2%}, {ours.vs_best:.2f}x | {' | '.join(cells)} | "
                     f"{ours.vs_best / peer.vs_best:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--models", default=",".join(TASKS))
    parser.add_argument("--out", help="also write the report (markdown) to this file, and beside it its figure "
                                      "(results.png) and autoq's picks (plans.json: {model: {method: plan}})")
    args = parser.parse_args()
    started = time.perf_counter()
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory() as storage_dir:
        for name in chosen_models(parser, args.models):
            task_rows, task_skipped = bench_task(name, args.trials, storage_dir)
            rows += task_rows
            skipped.update({(name, method): reason for method, reason in task_skipped.items()})
    report = [
        f"machine: {cpu_name()} (ISA flags: {isa_flags()}), {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; "
        f"python {platform.python_version()}; {time.perf_counter() - started:.0f} s in all",
        f"command: python {' '.join(sys.argv)}",
        "timing batch: each task's example inputs (images 1, UCR series 32, sentences 8); accuracy = top-1; "
        "test loss relative to FP32 eager; speedups are medians of per-round ratios from one interleaved run "
        "per model; 1% relative budget for autoq",
        "",
        *table(rows),
        "",
        *coverage(rows),
        "",
        "The fastest deployment within 1% held-out loss per runtime (PyTorch rows include FP32 and bf16):",
        "",
        *by_runtime(rows),
        "",
        "Faster than autoq at a held-out loss within 1% (the same speed within timing noise counts here too):",
        *(peers_ahead(rows) or ["- none"]),
        "",
        *[f"- not run: {model} / {method}: {reason}" for (model, method), reason in skipped.items()],
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        figure = Path(args.out).with_name("results.png")
        speed_vs_loss_png(rows, figure)
        picks: dict[str, dict] = {}
        for r in rows:
            if r.tuning is not None and r.tuning.plan is not None:
                picks.setdefault(r.model, {})[r.method] = r.tuning.plan
        Path(args.out).with_name("plans.json").write_text(json.dumps(picks, indent=1) + "\n", encoding="utf-8")
        Path(args.out).write_text(f"# Benchmark results\n\n![held-out loss vs speedup per model and method]"
                                  f"({figure.name})\n\n{text}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
