"""Tune INT8 quantization of an ImageNet net (real weights) with a Fashion-MNIST linear probe.

    python examples/tune_fashion.py [--model mobilenet_v2|efficientnet_lite0] [--trials N] [--timeout S]
                                    [--storage URL]

MobileNetV2 (torchvision) is `make demo`; EfficientNet-Lite0 (a TensorFlow port: BatchNorm behind a
same-padding Conv2d subclass, ReLU6) is the hard case, on which PyTorch's default int8 loses 28%.
The tuner searches on 1000 validation images and confirms its pick on 2000 others; the held-out test
split (2000 more images) is only used here, at the end, to check that the accuracy budget generalizes.
The study lives in autoq-runs/autoq.db: run the command again and it resumes instead of starting over.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import autoq
import autoq_zoo as zoo
from autoq_zoo.baselines import default_fx_ptq
from autoq.measure.latency import measure_latency, speedup

# name -> (task, the source autoq.load's caller rebuilds the FP32 model from, output folder in autoq-runs/)
TASKS = {
    "mobilenet_v2": (zoo.mobilenet_fashion_task, "autoq_zoo.mobilenet_fashion_task().model", "mobilenet-fashion"),
    "efficientnet_lite0": (zoo.efficientnet_lite_fashion_task, "autoq_zoo.efficientnet_lite_fashion_task().model",
                           "efficientnet-lite0-fashion"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(TASKS), default="mobilenet_v2")
    parser.add_argument("--trials", type=int, default=20, help="total trials in the study")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole tune() call")
    parser.add_argument("--skip-default", action="store_true",
                        help="leave PyTorch's default int8 out of the table (on EfficientNet-Lite0 it runs at 0.13x "
                             "FP32: scoring it takes ~20 min)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in autoq-runs/)")
    parser.add_argument("--max-loss", type=float, default=0.01, help="relative accuracy budget")
    args = parser.parse_args()

    started = time.perf_counter()
    # 3000 validation images: the search judges plans on 1000 of them, autoq confirms its pick on the other
    # 2000 (confirm_fraction), enough to certify a 1% budget at 90% confidence for a plan that flips few of them
    make_task, model_source, folder = TASKS[args.model]
    task = make_task(n_val=3000, n_test=2000)
    print(f"task ready in {time.perf_counter() - started:.0f} s: {task.name}, "
          f"{sum(len(b) for b in task.calib)} calibration images, threads={torch.get_num_threads()}")

    result = autoq.tune(
        task.model, task.example_inputs, task.calib, eval_data=task.eval_data(), metric=task.score,
        max_loss=args.max_loss, n_trials=args.trials, timeout=args.timeout, storage=args.storage,
        sensitivity_samples=16, confirm_fraction=2 / 3,
    )

    models = {"fp32": task.model, "autoq": result.model}
    if not args.skip_default:
        models["default"] = default_fx_ptq(task.model, task.example_inputs, [(batch,) for batch in task.calib])
    timing = measure_latency(models, task.example_inputs, target_seconds=5.0)
    fp32_test = task.accuracy(task.model, "test")
    names = {"fp32": "FP32 eager", "default": "PyTorch default FX PTQ (x86)", "autoq": "autoq"}
    rows = [(names[key], task.accuracy(model, "val"), task.accuracy(model, "test"), key)
            for key, model in models.items()]
    print(f"\n{'model':30s} {'val acc':>8s} {'test acc':>9s} {'test loss':>10s} {'ms':>8s} {'speedup':>8s}")
    for name, val, test, key in rows:
        ms = timing[key].median_ms
        print(f"{name:30s} {val:8.4f} {test:9.4f} {(fp32_test - test) / fp32_test:+10.2%} {ms:8.2f} "
              f"{speedup(timing['fp32'], timing[key]):7.2f}x")
    print("(batch 1; latencies measured side by side in one interleaved run, speedup = median of per-round "
          "ratios; loss relative to FP32)")
    print(f"\nautoq's promise: {result.verdict['guarantee']}")
    speed = {row["number"]: row["speedup"] for row in result.trials}
    for tried in result.verdict["tried"]:  # fastest first: what a point estimate alone would have returned first
        bound = "" if tried["upper"] is None else f", upper bound {tried['upper']:+.2%}"
        print(f"  finalist trial {tried['trial']} ({speed[tried['trial']]:.2f}x in its trial): held-back loss "
              f"{tried['loss']:+.2%}{bound} -> {'picked' if tried['within'] else 'not certified'}")
    if result.precision == "int8":
        fallback = [layer["name"] for layer in result.layers if not layer["quantized"]]
        libraries = [layer["engine"] for layer in result.layers if layer["quantized"]]
        print(f"\nFP32 fallback layers: {fallback or 'none'}; int8 layers on oneDNN: {libraries.count('onednn')}, "
              f"FBGEMM: {libraries.count('fbgemm')}, PyTorch's x86 rule: {libraries.count('x86')}")
    else:  # no int8 plan was faster within the budget: the notes name the best int8 trial
        print(f"\nautoq returns the {result.precision} model: {result.notes[-1]}")
    print(f"study '{result.study_name}' in {result.storage}; total {time.perf_counter() - started:.0f} s")
    output = Path("autoq-runs") / folder  # the tuned model and its deployable export
    output.mkdir(parents=True, exist_ok=True)
    result.save(output / "model.autoq", model_source=model_source)
    exported = result.export(output / "deploy")
    print(f"wrote {output / 'model.autoq'} (autoq.load(path, task.model) rebuilds it) and {exported.directory}/ "
          f"({exported.format}: `python {exported.directory / 'run.py'}` runs it without autoq)")


if __name__ == "__main__":
    main()
