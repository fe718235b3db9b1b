"""QAT recovery case: a trained model on which post-training quantization misses the 1% budget and
autoq's QAT arm meets it, with the control that tells QAT apart from plain extra training.

    python benchmarks/qat_recovery.py [--trials N] [--out benchmarks/QAT_RECOVERY.md]

Model: `zoo.fashion_autoencoder` (conv autoencoder trained on the 60,000 Fashion-MNIST training
images, 20 epochs); metric: reconstruction MSE on 2000 Fashion-MNIST test images (lower is better,
1% relative budget), and on 2000 other test images the tuner never sees. Three autoq runs of N trials each, same calibration
images (512 training images):
  1. post-training only (no training data): every PTQ recipe that applies;
  2. with training data (32,000 training images, loss = MSE): QAT is tried when PTQ misses;
  3. control: the FP32 model fine-tuned on the same 32,000 images for the epochs and learning rate
     of run 2's QAT plan (same loop: Adam, cosine), then post-training only, as run 1. Losses are
     against the original FP32 model, as in runs 1 and 2.
Each run's model and the FP32 references are timed side by side in one interleaved run at the end.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import autoq
import autoq_zoo as zoo
from autoq.measure.fp32 import best_float
from autoq.measure.latency import measure_latency, speedup
from autoq.plan import QuantPlan
from autoq.search.objective import plan_changes
from core import cpu_name

BUDGET = 0.01


def data() -> dict[str, torch.Tensor]:
    train, test = zoo.fashion_mnist("train")[0], zoo.fashion_mnist("test")[0]
    return {"val": zoo.mnist_pixels(test[:2000]), "test": zoo.mnist_pixels(test[2000:4000]),
            "fine_tune": zoo.mnist_pixels(train[:32_000]),
            "calib": zoo.mnist_pixels(train[32_000:32_512])}


def fine_tune_fp32(model: torch.nn.Module, batches: list, epochs: int, lr: float) -> torch.nn.Module:
    """The loop of autoq's QAT fine-tune (Adam, cosine decay over the epochs), without fake quantization."""
    tuned = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(tuned.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(batches))
    for step in range(epochs * len(batches)):
        inputs, target = batches[step % len(batches)]
        optimizer.zero_grad()
        F.mse_loss(tuned(inputs), target).backward()
        optimizer.step()
        schedule.step()
    return tuned.eval()


def best_all_int8_mse(result: autoq.TuneResult) -> float:
    """The lowest validation MSE of any trial that kept every layer int8."""
    return min((row["metric"] for row in result.trials if row.get("metric") is not None
                and not QuantPlan.from_dict(row["plan"]).fp32_layers), default=math.nan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.time()
    model, parts = zoo.fashion_autoencoder(), data()
    calib = list(parts["calib"].split(32))
    batches = [(images, images) for images in parts["fine_tune"].split(64)]
    example = (parts["val"][:1],)

    def val_mse(candidate):
        return zoo.reconstruction_mse(candidate, parts["val"])

    storage = tempfile.mkdtemp(prefix="autoq-qat-recovery-")
    settings = dict(higher_is_better=False, max_loss=BUDGET, n_trials=args.trials, seed=0, verbose=False)
    runs: dict[str, autoq.TuneResult] = {}
    seconds = {}
    for name, extra in (("post-training only", {}),
                        ("with training data (QAT arm)", dict(train_data=batches, loss_fn=F.mse_loss))):
        begin = time.time()
        runs[name] = autoq.tune(model, example, calib, val_mse, storage=f"sqlite:///{storage}/{len(runs)}.db",
                                **settings, **extra)
        seconds[name] = time.time() - begin
    qat_plan = QuantPlan.from_dict(runs["with training data (QAT arm)"].plan)
    epochs, lr = qat_plan.qat_epochs, qat_plan.qat_lr  # the QuantPlan defaults if run 2 picked no QAT plan
    begin = time.time()
    tuned_fp32 = fine_tune_fp32(model, batches, epochs, lr)
    control = f"control: FP32 fine-tune ({epochs} ep, lr {lr:.2g}), then post-training only"
    runs[control] = autoq.tune(tuned_fp32, example, calib, val_mse, storage=f"sqlite:///{storage}/control.db",
                               **settings)
    seconds[control] = time.time() - begin

    base_val, base_test = val_mse(model), zoo.reconstruction_mse(model, parts["test"])
    fp32 = {"FP32 eager": model, "FP32 best (folded, compiled)": best_float(model, example).model,
            "FP32 fine-tuned (control)": tuned_fp32}
    timing = measure_latency({**fp32, **{name: result.model for name, result in runs.items()}}, example,
                             target_seconds=4.0, min_repeats=30)
    best = "FP32 best (folded, compiled)"

    def rel(value, base):
        return f"{(value - base) / base:+.2%}"

    lines = ["# QAT recovery case", "",
             f"machine: {cpu_name()}, {torch.get_num_threads()} threads; "
             f"torch {torch.__version__}; {time.time() - started:.0f} s in all",
             f"command: python benchmarks/qat_recovery.py --trials {args.trials}",
             f"model: zoo.fashion_autoencoder (FP32 val MSE {base_val:.4e}, test {base_test:.4e}); "
             f"budget {BUDGET:.0%} relative MSE on val; losses relative to the original FP32 model", "",
             "| run | plan | val loss | test loss | best all-int8 trial (val) | in budget | ms | vs eager "
             "| vs best FP32 | tune s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, subject in fp32.items():
        lines.append(f"| {name} |  | {rel(val_mse(subject), base_val)} | "
                     f"{rel(zoo.reconstruction_mse(subject, parts['test']), base_test)} |  |  | "
                     f"{timing[name].median_ms:.3f} | {speedup(timing['FP32 eager'], timing[name]):.2f}x | "
                     f"{speedup(timing[best], timing[name]):.2f}x |  |")
    for name, result in runs.items():
        plan = QuantPlan.from_dict(result.plan)
        changes = " ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in plan_changes(plan, QuantPlan(recipe=plan.recipe)).items())
        lines.append(f"| {name} | {plan.recipe} {changes} | {rel(result.accuracy, base_val)} | "
                     f"{rel(zoo.reconstruction_mse(result.model, parts['test']), base_test)} | "
                     f"{rel(best_all_int8_mse(result), base_val)} | "
                     f"{'yes' if (result.accuracy - base_val) / base_val <= BUDGET else 'no'} | "
                     f"{timing[name].median_ms:.3f} | {speedup(timing['FP32 eager'], timing[name]):.2f}x | "
                     f"{speedup(timing[best], timing[name]):.2f}x | {seconds[name]:.0f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
