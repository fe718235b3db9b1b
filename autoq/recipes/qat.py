"""Quantization-aware training (FX, x86): the recovery arm when post-training quantization misses the budget.

A candidate is a short fine-tune of the user's trained model with fake quantization in the graph
(`prepare_qat_fx` with PyTorch's default x86 QAT mapping at the plan's activation range and weight
granularity, the plan's FP32 fallbacks kept out),
then converted to int8 like a static plan (same kernels, same per-layer dispatch). The user gives
either `train_data` (batches of (inputs, target)) and `loss_fn(output, target)`, or a
`train_fn(model, epochs, lr)` that trains the prepared model in place. Epochs and learning rate
are plan parameters; every fine-tune stops at `Training.max_seconds`.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization import (
    FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver, QConfig, QConfigMapping, disable_observer,
    get_default_qat_qconfig_mapping,
)
from torch.ao.quantization.fake_quantize import default_fused_per_channel_wt_fake_quant, default_fused_wt_fake_quant
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from autoq.capture import Layer, as_input_tuple, use_base_layer_classes
from autoq.dispatch.layers import set_layer_engines
from autoq.plan import QuantPlan
from autoq.recipes.engine import quantized_engine
from autoq.recipes.static import StaticBuilder, with_global_qconfig

FREEZE_AT = 0.5  # fraction of the fine-tune after which observers and BatchNorm statistics are frozen


@dataclass
class Training:
    """What a QAT fine-tune needs from the user: train_data + loss_fn, or train_fn."""

    train_data: Iterable | None = None
    loss_fn: Callable[[object, torch.Tensor], torch.Tensor] | None = None
    train_fn: Callable[[nn.Module, int, float], None] | None = None
    max_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.train_fn is None and (self.train_data is None or self.loss_fn is None):
            raise ValueError("QAT needs either train_fn(model, epochs, lr), or both train_data (batches of "
                             "(inputs, target)) and loss_fn(output, target).")
        if self.train_fn is not None and not callable(self.train_fn):
            raise TypeError(f"train_fn must be callable as train_fn(model, epochs, lr); got {type(self.train_fn)}.")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(output, target); got {type(self.loss_fn)}.")


_WEIGHT_FAKE_QUANTS = {"per_channel": default_fused_per_channel_wt_fake_quant, "per_tensor": default_fused_wt_fake_quant}


def qat_mapping(plan: QuantPlan, fp32_layers: Sequence[Layer] = ()) -> QConfigMapping:
    """PyTorch's default x86 QAT mapping with the plan's activation range (7-bit if `reduce_range`,
    else full 8-bit) and weight granularity, and `fp32_layers` kept in FP32."""
    activation = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=plan.reduce_range)
    qconfig = QConfig(activation=activation, weight=_WEIGHT_FAKE_QUANTS[plan.weight_granularity])
    return with_global_qconfig(get_default_qat_qconfig_mapping("x86"), qconfig, fp32_layers)


class QatBuilder:
    """`build(plan)` fine-tunes a fake-quantized copy of the model and returns its int8 GraphModule.

    Layers and their names are those of the static recipe (`static`, the run's StaticBuilder);
    a plan's fine-tuned model is kept, so building it again (finalists, the result) is free.
    """

    recipe = "qat"

    def __init__(self, model: nn.Module, static: StaticBuilder, training: Training) -> None:
        self.example_inputs, self.training = static.example_inputs, training
        self.static = static  # its layers, their names and sensitivity are QAT's too
        self._model = copy.deepcopy(model).eval()
        use_base_layer_classes(self._model)
        self.layers = list(static.layers)
        self._built: dict[str, nn.Module] = {}

    def build(self, plan: QuantPlan) -> torch.fx.GraphModule:
        """The int8 model of `plan` after its fine-tune (the builder's model is never trained)."""
        unknown = set(plan.fp32_layers) - set(self.layers)
        if unknown:
            raise ValueError(f"fp32_layers names {sorted(unknown)}, which are not quantizable layers of this "
                             f"model. Known layers: {self.layers}")
        key = plan.key()
        if key not in self._built:
            self._built[key] = self._fine_tuned(plan)
        quantized = copy.deepcopy(self._built[key])
        set_layer_engines(quantized, plan.layer_engines)
        quantized.meta["autoq"] = {"config": plan.to_dict(), "summary": {}}
        return quantized

    def _fine_tuned(self, plan: QuantPlan) -> torch.fx.GraphModule:
        fp32_layers = [self.static.layer(name) for name in plan.fp32_layers]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_qat_fx(copy.deepcopy(self._model).train(), qat_mapping(plan, fp32_layers),
                                      self.example_inputs)
        if self.training.train_fn is not None:
            self.training.train_fn(prepared, plan.qat_epochs, plan.qat_lr)
        else:
            self._train(prepared, plan.qat_epochs, plan.qat_lr)
        prepared.eval()
        with warnings.catch_warnings(), quantized_engine(plan.engine):
            warnings.simplefilter("ignore")
            return convert_fx(prepared, qconfig_mapping=qat_mapping(plan, fp32_layers))

    def _train(self, prepared: torch.fx.GraphModule, epochs: int, lr: float) -> None:
        """Adam with cosine decay over train_data for `epochs` (or until max_seconds), freezing observers and
        BatchNorm statistics for the last part, as PyTorch's QAT tutorial does."""
        batches = list(self.training.train_data)
        if not batches:
            raise ValueError("train_data is empty: QAT needs batches of (inputs, target).")
        optimizer = torch.optim.Adam(prepared.parameters(), lr=lr)
        steps, freeze_at = epochs * len(batches), int(FREEZE_AT * epochs * len(batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        deadline = time.monotonic() + self.training.max_seconds
        for step in range(steps):
            if step == freeze_at:
                prepared.apply(disable_observer)
                prepared.apply(nniqat.freeze_bn_stats)
            inputs, target = _split(batches[step % len(batches)])
            optimizer.zero_grad()
            self.training.loss_fn(prepared(*inputs), target).backward()
            optimizer.step()
            schedule.step()
            if time.monotonic() > deadline:
                break


def _split(batch: object) -> tuple[tuple, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("train_data must yield (inputs, target) pairs (inputs: a tensor or a tuple of tensors).")
    return as_input_tuple(batch[0], "train_data"), batch[1]
