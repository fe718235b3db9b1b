"""Why per-layer kernel timings taken alone mislead: cache state, and the ops after a kernel.

    python benchmarks/dispatch_effects.py [--threads 2]

1. Hot vs cold: int8 linears timed under FBGEMM and oneDNN with hot caches (called back to back)
   and with caches flushed before every call (a 64 MB buffer is written in between).
2. The op after: a GELU and an attention call timed right after an int8 linear that ran on FBGEMM
   or on oneDNN (everything else identical; the libraries alternate call by call).
3. Where int8 time goes: torch.profiler's share of self CPU time in the int8 conv/linear ops of
   whole int8 models (PyTorch's default x86 recipe, oneDNN engine); the rest is everything a
   kernel choice cannot speed up.
Numbers in 1-2 are medians in microseconds from one run, libraries interleaved.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from autoq.dispatch.layers import LIBRARIES, LayerShape, pack
from autoq.dispatch.microbench import synthetic_layer
from autoq.dispatch.table import current_cpu
from autoq.plan import QuantPlan
from autoq.recipes.static import StaticBuilder
from dispatch import MODELS  # benchmarks/dispatch.py: the same model builders

PROFILED = ("mobilenet_v2", "minilm_encoder", "seq2seq_transformer")
INT8_LAYER_OPS = ("quantized::conv2d", "quantized::conv2d_relu", "quantized::linear", "quantized::linear_relu")

LINEARS = [LayerShape("linear", 16, 512, 1024), LayerShape("linear", 16, 2048, 512),
           LayerShape("linear", 128, 512, 2048), LayerShape("linear", 128, 512, 512)]
CALLS = 60


def packed_variants(shape: LayerShape) -> tuple[dict[str, torch.nn.Module], torch.Tensor]:
    module, x = synthetic_layer(shape)
    variants = {}
    for library in LIBRARIES:
        variants[library] = copy.deepcopy(module)
        pack(variants[library], library)
    return variants, x


def hot_and_cold(shape: LayerShape, flush: torch.Tensor) -> dict[tuple[str, str], float]:
    variants, x = packed_variants(shape)
    samples: dict[tuple[str, str], list[float]] = {}
    for call in range(CALLS):
        for library in (LIBRARIES if call % 2 else LIBRARIES[::-1]):
            for state in ("hot", "cold"):
                if state == "cold":
                    flush.add_(1.0)
                else:
                    variants[library](x)
                start = time.perf_counter()
                variants[library](x)
                samples.setdefault((library, state), []).append((time.perf_counter() - start) * 1e6)
    return {key: statistics.median(values) for key, values in samples.items()}


def op_after(shape: LayerShape, calls: int = 400) -> dict[tuple[str, str], float]:
    variants, x = packed_variants(shape)
    q = k = v = torch.randn(1, 8, shape.batch, 64)
    hidden = torch.randn(shape.batch, shape.out_channels)
    samples: dict[tuple[str, str], list[float]] = {}
    for call in range(calls):
        for library in (LIBRARIES if call % 2 else LIBRARIES[::-1]):
            variants[library](x)
            start = time.perf_counter()
            torch.nn.functional.gelu(hidden)
            middle = time.perf_counter()
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            end = time.perf_counter()
            samples.setdefault((library, "gelu"), []).append((middle - start) * 1e6)
            samples.setdefault((library, "attention"), []).append((end - middle) * 1e6)
    return {key: statistics.median(values) for key, values in samples.items()}


def int8_layer_share(name: str, runs: int = 10) -> float:
    """Fraction of profiled self CPU time spent in int8 conv/linear ops of model `name`."""
    model, inputs, calib = MODELS[name]()
    int8 = StaticBuilder(model, inputs, calib).build(QuantPlan(engine="onednn"))
    for _ in range(3):
        int8(*inputs)
    with torch.profiler.profile() as profile:
        for _ in range(runs):
            int8(*inputs)
    events = profile.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    return sum(event.self_cpu_time_total for event in events if event.key in INT8_LAYER_OPS) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flush = torch.empty(16 * 1024 * 1024)  # 64 MB of float32
    print(f"machine: {current_cpu().describe()}; {args.threads} threads; torch {torch.__version__}")
    print(f"command: python {' '.join(sys.argv)}\n")
    with torch.no_grad():
        print("| linear (rows k n) | FBGEMM hot us | oneDNN hot us | FBGEMM cold us | oneDNN cold us |")
        print("|---|---|---|---|---|")
        for shape in LINEARS:
            t = hot_and_cold(shape, flush)
            print(f"| {shape.batch} {shape.in_channels} {shape.out_channels} | {t['fbgemm', 'hot']:.0f} | "
                  f"{t['onednn', 'hot']:.0f} | {t['fbgemm', 'cold']:.0f} | {t['onednn', 'cold']:.0f} |")
        shape = LayerShape("linear", 256, 512, 2048)
        t = op_after(shape)
        print(f"\n| op right after a {shape.batch}x{shape.in_channels}x{shape.out_channels} int8 linear | "
              "after FBGEMM us | after oneDNN us |")
        print("|---|---|---|")
        for op in ("gelu", "attention"):
            print(f"| {op} | {t['fbgemm', op]:.0f} | {t['onednn', op]:.0f} |")
        print("\n| int8 model | share of time in int8 conv/linear ops | elsewhere |")
        print("|---|---|---|")
        for name in PROFILED:
            share = int8_layer_share(name)
            print(f"| {name} | {share:.0%} | {1 - share:.0%} |")


if __name__ == "__main__":
    main()
