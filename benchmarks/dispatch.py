"""Kernel dispatch benchmark: int8 latency on the x86, fbgemm and onednn engines vs autoq's per-layer dispatch.

    python benchmarks/dispatch.py [--models mobilenet_v2,resnet18,...] [--seconds 8] [--repeats 3]

Every variant of a model is built from one calibration (PyTorch's default x86 FX recipe, 128
calibration inputs), so they differ only in which library runs each int8 layer (and, in the last
column, in autoq's ReLU6 folding and NHWC input). All latencies of a model come from one
interleaved run (batch 1). Columns:
  x86 / fbgemm / onednn   the whole model packed under one engine (x86 = PyTorch's per-layer rule)
  rule                    autoq's shipped dispatch table for this CPU applied without any timing
                          (its learned rule, for shapes not in the table)
  alone                   each layer timed alone on its real input (hot cache), the faster library kept
  measured                autoq: each layer timed inside whole-model runs under both libraries, the
                          faster one kept (what `autoq.tune` does for its 'measured' kernel choice)
  measured+               measured, plus fold_relu6 (where the model has ReLU6) and channels_last input
  autoq                   the fastest of x86 / fbgemm / onednn / measured / measured+ in a separate
                          selection run (as autoq.tune weighs them), re-timed here with the others
Only MobileNetV2 has trained weights here (ImageNet; top-1 of its Fashion-MNIST probe is shown);
the other nets are torchvision definitions with random weights (flush-denormal on), timed only.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
import warnings

import torch
import torchvision
from torch import nn

import autoq_zoo as zoo
from autoq.dispatch.layers import LIBRARIES, layer_inputs, layer_shapes, set_layer_engines, weighted_layers
from autoq.dispatch.measured import LayerTimer
from autoq.dispatch.microbench import time_libraries
from autoq.dispatch.rule import TOLERANCE, Measurement, within_tolerance, x86_rule
from autoq.dispatch.table import current_cpu, shipped_table
from autoq.measure.latency import fastest, measure_latency, speedup
from autoq.plan import default_plan
from autoq.recipes.static import StaticBuilder

ENGINES = ("x86", "fbgemm", "onednn")
ARMS = (*ENGINES, "measured", "measured+")  # the kernel choices autoq.tune weighs against each other
CALIB_BATCHES = 8  # of 16 images


class Attention(nn.Module):
    """Multi-head attention from plain Linear layers (FX-traceable); `context` is x for self-attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.query, self.key_value, self.out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, tokens, context_tokens, head = x.shape[0], x.shape[1], context.shape[1], self.width // self.heads
        q = self.query(x).reshape(batch, tokens, self.heads, head).transpose(1, 2)
        k, v = self.key_value(context).reshape(batch, context_tokens, 2, self.heads, head).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, self.width))


class Block(nn.Module):
    """Post-norm transformer block: self-attention, optional cross-attention, GELU feed-forward."""

    def __init__(self, width: int, heads: int, hidden: int, cross: bool = False) -> None:
        super().__init__()
        self.attention, self.norm1 = Attention(width, heads), nn.LayerNorm(width)
        self.cross = Attention(width, heads) if cross else None
        self.norm_cross = nn.LayerNorm(width) if cross else None
        self.ff1, self.ff2, self.norm2 = nn.Linear(width, hidden), nn.Linear(hidden, width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, x, causal=self.cross is not None))
        if self.cross is not None:
            x = self.norm_cross(x + self.cross(x, memory))
        return self.norm2(x + self.ff2(nn.functional.gelu(self.ff1(x))))


class Encoder(nn.Module):
    def __init__(self, width: int = 384, heads: int = 6, hidden: int = 1536, layers: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class EncoderDecoder(nn.Module):
    """Transformer-base sized seq2seq (width 512, 8 heads, FFN 2048, 6 + 6 layers) on embedded tokens."""

    def __init__(self, width: int = 512, heads: int = 8, hidden: int = 2048, layers: int = 6) -> None:
        super().__init__()
        self.encoder = Encoder(width, heads, hidden, layers)
        self.decoder = nn.ModuleList(Block(width, heads, hidden, cross=True) for _ in range(layers))

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(source)
        for block in self.decoder:
            target = block(target, memory)
        return target


def minilm_encoder() -> tuple[nn.Module, tuple, list[tuple]]:
    """6 MiniLM-sized encoder layers (width 384, 6 heads, FFN 1536) on 128 tokens; random weights."""
    torch.manual_seed(0)
    calib = [(torch.randn(4, 128, 384),) for _ in range(CALIB_BATCHES)]
    return Encoder().eval(), (torch.randn(1, 128, 384),), calib


def seq2seq() -> tuple[nn.Module, tuple, list[tuple]]:
    """EncoderDecoder on 256 source tokens and 16 target tokens (one decoder pass); random weights.

    Its linears run at 256 rows in the encoder and 16 rows in the decoder: the two regimes where
    oneDNN and FBGEMM respectively are faster on this CPU.
    """
    torch.manual_seed(0)
    calib = [(torch.randn(2, 256, 512), torch.randn(2, 16, 512)) for _ in range(CALIB_BATCHES)]
    return EncoderDecoder().eval(), (torch.randn(1, 256, 512), torch.randn(1, 16, 512)), calib


def image_model(name: str) -> tuple[nn.Module, tuple, list[tuple]]:
    task = zoo.mobilenet_fashion_task()
    calib = [(batch,) for batch in task.calib[:CALIB_BATCHES]]
    model = task.model if name == "mobilenet_v2" else getattr(torchvision.models, name)().eval()
    return model, task.example_inputs, calib


MODELS = {name: (lambda name=name: image_model(name))
          for name in ("mobilenet_v2", "mobilenet_v3_large", "resnet18", "resnet50", "efficientnet_b0")}
MODELS["minilm_encoder"] = minilm_encoder
MODELS["seq2seq_transformer"] = seq2seq


def bench_model(name: str, seconds: float, repeats: int) -> dict:
    model, inputs, calib = MODELS[name]()
    builder = StaticBuilder(model, inputs, calib)
    base = default_plan("x86")
    variants = {engine: builder.build(dataclasses.replace(base, engine=engine)) for engine in ENGINES}

    table = shipped_table()
    if table is None:
        raise SystemExit("autoq ships no dispatch table for this CPU: run `autoq dispatch bench` first.")
    variants["rule"] = builder.build(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_layer_engines(variants["rule"], table.choose_all(layer_shapes(variants["rule"], inputs)))

    # each layer timed alone on its real input (hot cache), vs inside whole-model runs (autoq)
    variants["alone"] = builder.build(base)
    modules, layer_input = weighted_layers(variants["alone"]), layer_inputs(variants["alone"], inputs)
    alone = {layer: time_libraries(modules[layer], x) for layer, x in layer_input.items()}
    set_layer_engines(variants["alone"], {layer: min(t, key=t.get) for layer, t in alone.items()})
    timer = LayerTimer(seconds=2.0)
    variants["measured"] = builder.build(base)
    in_model = timer.choose(variants["measured"], inputs)
    set_layer_engines(variants["measured"], in_model)
    tuned = dataclasses.replace(base, fold_relu6=builder.has_relu6, channels_last=inputs[0].dim() == 4)
    variants["measured+"] = builder.build(tuned)
    set_layer_engines(variants["measured+"], LayerTimer(seconds=2.0).choose(variants["measured+"], inputs))

    # autoq's pick: like autoq.tune, time the arms and keep the fastest; then report it from a
    # separate run together with every column (the pick's own timing would flatter it). Repeated:
    # on this VM single runs differ by 5-25%.
    picks, runs = [], []
    for _ in range(repeats):
        selection = measure_latency({arm: variants[arm] for arm in ARMS}, inputs, target_seconds=seconds / 2,
                                    min_repeats=10)
        picks.append(fastest(selection))
        runs.append(measure_latency({"fp32": model, **variants, "autoq": variants[picks[-1]]}, inputs,
                                    target_seconds=seconds, min_repeats=20))
    row = {"model": name, "picks": picks, "runs": runs,
           "ms": {key: statistics.median(run[key].median_ms for run in runs) for key in runs[0]},
           "layers": len(in_model), "onednn_layers": sum(library == "onednn" for library in in_model.values())}
    in_model_micros = {record["layer"]: record["micros"] for record in timer.records()}
    row["alone_ms"] = {lib: sum(t[lib] for t in alone.values()) / 1000 for lib in LIBRARIES}
    row["in_model_ms"] = {lib: sum(in_model_micros[layer][lib] for layer in alone) / 1000 for lib in LIBRARIES}
    shapes = layer_shapes(variants["measured"], inputs)
    in_model_entries = [Measurement(shapes[layer], in_model_micros[layer]) for layer in shapes]
    row["rule_ok"] = within_tolerance([table.rule.choose(m.shape) for m in in_model_entries], in_model_entries)
    row["x86_rule_ok"] = within_tolerance([x86_rule(m.shape) for m in in_model_entries], in_model_entries)
    if name == "mobilenet_v2":
        task = zoo.mobilenet_fashion_task()
        row["top1"] = {key: task.accuracy(variants[key], "val") for key in ("x86", "onednn", "measured", "measured+")}
        row["top1"]["fp32"] = task.accuracy(model, "val")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seconds", type=float, default=8.0, help="timing effort per model and repeat (s)")
    parser.add_argument("--repeats", type=int, default=3, help="selection + timing runs per model")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = [bench_model(name, args.seconds, args.repeats) for name in args.models.split(",")]
    cpu = current_cpu()
    print(f"machine: {cpu.describe()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"python {platform.python_version()}")
    print(f"command: python {' '.join(sys.argv)}   ({time.perf_counter() - started:.0f} s)")
    print("batch 1; int8 = PyTorch's default x86 FX recipe, 128 calibration inputs\n")
    columns = ("x86", "fbgemm", "onednn", "rule", "alone", "measured", "measured+", "autoq")
    header = (f"| {'model':20s} | {'FP32 ms':>7s} | " + " | ".join(f"{c:>9s}" for c in columns)
              + f" | {'autoq pick':>10s} | {'best engine':>11s} | {'autoq vs best engine':>20s} | {'oneDNN layers':>13s} |")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for r in rows:
        ms = r["ms"]
        gains = sorted(speedup(run[min(ENGINES, key=lambda e, run=run: run[e].median_ms)], run["autoq"])
                       for run in r["runs"])
        gain = f"{statistics.median(gains):.2f}x" + (f" ({gains[0]:.2f}-{gains[-1]:.2f})" if len(gains) > 1 else "")
        picks = "/".join(sorted(set(r["picks"]), key=r["picks"].index))
        print(f"| {r['model']:20s} | {ms['fp32']:7.2f} | " + " | ".join(f"{ms[c]:9.2f}" for c in columns)
              + f" | {picks:>10s} | {min(ENGINES, key=ms.__getitem__):>11s} | {gain:>20s} | "
              + f"{r['onednn_layers']:6d} / {r['layers']:4d} |")
    print("\nms = median over repeats of each run's median. autoq = the arm (engine, measured or measured+) "
          "fastest in a separate selection run before each repeat; 'autoq vs best engine' = per repeat, the "
          "median of per-round ratios against that run's fastest engine (median, min-max over repeats)")
    print("\nSpeedup vs FP32 eager (median of per-round ratios, median over repeats):")
    for r in rows:
        print(f"  {r['model']:20s} " + "  ".join(
            f"{c} {statistics.median(speedup(run['fp32'], run[c]) for run in r['runs']):.2f}x" for c in columns))
    print("\nSum over int8 conv/linear layers (ms): each timed alone on its real input (hot cache) | its segment "
          "(the layer and the ops up to the next int8 layer) timed inside whole-model runs | whole model")
    for r in rows:
        alone, inside, ms = r["alone_ms"], r["in_model_ms"], r["ms"]
        print(f"  {r['model']:20s} alone: fbgemm {alone['fbgemm']:6.2f} onednn {alone['onednn']:6.2f} | inside: "
              f"fbgemm {inside['fbgemm']:6.2f} onednn {inside['onednn']:6.2f} | model: fbgemm {ms['fbgemm']:6.2f} "
              f"onednn {ms['onednn']:6.2f}")
    print(f"\nLearned rule (shipped table, fitted on microbenchmarks) on these models' layers as timed inside the "
          f"model: share of layers within {TOLERANCE:.0%} of the faster library")
    for r in rows:
        print(f"  {r['model']:20s} learned rule {r['rule_ok']:6.1%}   PyTorch x86 rule {r['x86_rule_ok']:6.1%}")
    for r in rows:
        if "top1" in r:
            print(f"\n{r['model']} Fashion-MNIST probe, val top-1: " + "  ".join(f"{k} {v:.4f}" for k, v in r["top1"].items()))


if __name__ == "__main__":
    main()
