"""Quantization-aware training: the recovery arms when post-training quantization misses the budget.

A candidate is a short fine-tune of the user's trained model with fake quantization in the graph,
the plan's FP32 fallbacks kept out, then converted to int8. Two recipes:
- 'qat' (FX, eager int8 kernels): `prepare_qat_fx` with PyTorch's default x86 QAT mapping at the
  plan's activation range and weight granularity; converted like a static plan (same kernels, same
  per-layer dispatch). Activation ranges start where the post-training twin puts them for the same
  plan (its calibration statistics, the plan's observer): before its first step the fine-tune is
  exactly the static model. They are then learned with the weights (LSQ, Esser et al. 2020, torch's
  `_LearnableFakeQuantize` with gradient scaling): on the converged Fashion-MNIST autoencoder of
  benchmarks/qat_recovery.py, 3 epochs on 32,000 images reach -0.07% MSE (histogram start, lr
  1e-4), against +1.39% with the calibrated ranges held fixed; post-training misses by 5%.
- 'pt2e-qat' (PT2E, compiled by Inductor): the model exported in training mode, `prepare_qat_pt2e`
  with X86InductorQuantizer's QAT config (conv-BatchNorm folding simulated while training),
  converted and lowered like a 'pt2e-static' plan. Its activation ranges also start at the plan's
  observer over the calibration batches and are learned (torchao's `LearnableFakeQuantize`). On the
  same case that buys little: +0.91%, against +0.94% with X86InductorQuantizer's moving averages
  (weights at their current range in both; +1.49% with PyTorch's averaged weight ranges).
Fake quantization is PyTorch's plain `FakeQuantize`, not the fused kernel of its default QAT
configs: the fused op rounds per-channel weight scales its own way (max|w|/127 or /128, where
`convert` uses /127.5), so the fine-tuned weights met a grid 0.4% off the deployed one and part of
what training recovered was lost at conversion (a less trained Fashion-MNIST autoencoder: +0.25% MSE
simulated, +0.97% as int8; plain fake quantization: +0.22% both).
The user gives either `train_data` (batches of (inputs, target)) and `loss_fn(output, target)`, or
a `train_fn(model, epochs, lr)` that trains the prepared model in place. Epochs and learning rate
are plan parameters; every fine-tune stops at `Training.max_seconds`. A plan's fine-tuned model is
kept, so building it again (finalists, the result) does not retrain.
"""

from __future__ import annotations

import abc
import copy
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization import (
    FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver, QConfig, QConfigMapping,
    disable_observer, get_default_qat_qconfig_mapping,
)
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
from torchao.quantization import pt2e as torchao_pt2e
from torchao.quantization.pt2e import fake_quantize as pt2e_fake_quantize
from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

from autoq.calibrate.observers import WEIGHT_RANGES, Pt2eFixedRangeObserver
from autoq.calibrate.ranges import activation_range
from autoq.calibrate.stats import StatsCollector, collect_stats, snapshot_at
from autoq.capture import Layer, as_input_tuple, use_base_layer_classes
from autoq.dispatch.engine import quantized_engine
from autoq.dispatch.layers import set_layer_engines
from autoq.plan import RECIPE_KINDS, QuantPlan
from autoq.recipes.dimensions import closest, kernels_of
from autoq.recipes.pt2e import (
    QAT_EPS, Pt2eBuilder, Pt2eStaticRecipe, export_graph, inductor_quantizer, lower, lowered_rebuild,
)
from autoq.recipes.recipe import Builder, Capture, Recipe
from autoq.recipes.static import StaticBuilder, StaticRecipe, with_global_qconfig

if TYPE_CHECKING:
    import optuna

    from autoq.recipes.arms import Arms
    from autoq.recipes.dimensions import Dimensions

FREEZE_AT = 0.5  # fraction of the fine-tune after which observers and BatchNorm statistics are frozen


@dataclass
class Training:
    """What a QAT fine-tune needs from the user: train_data + loss_fn, or train_fn."""

    train_data: Iterable | None = None
    loss_fn: Callable[[object, torch.Tensor], torch.Tensor] | None = None
    train_fn: Callable[[nn.Module, int, float], None] | None = None
    max_seconds: float = 300.0
    time_left: Callable[[], float] | None = None  # seconds the caller can still give a fine-tune (tune's timeout)

    def seconds(self) -> float:
        """The longest the next fine-tune may run: max_seconds, or less when time_left says so."""
        return self.max_seconds if self.time_left is None else max(0.0, min(self.max_seconds, self.time_left()))

    def __post_init__(self) -> None:
        if self.train_fn is None and (self.train_data is None or self.loss_fn is None):
            raise ValueError("QAT needs either train_fn(model, epochs, lr), or both train_data (batches of "
                             "(inputs, target)) and loss_fn(output, target).")
        if self.train_fn is not None and not callable(self.train_fn):
            raise TypeError(f"train_fn must be callable as train_fn(model, epochs, lr); got {type(self.train_fn)}.")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(output, target); got {type(self.loss_fn)}.")


# PyTorch's default QAT weight fake-quants, unfused (see the module docstring), at the weights'
# current range each step (averaging_constant=1; PyTorch averages 0.01 per step), as conversion uses
_WEIGHT_FAKE_QUANTS = {"per_channel": (MovingAveragePerChannelMinMaxObserver, torch.per_channel_symmetric),
                       "per_tensor": (MovingAverageMinMaxObserver, torch.per_tensor_symmetric)}


def weight_fake_quant(weight_granularity: str, weight_bits: int) -> type:
    observer, qscheme = _WEIGHT_FAKE_QUANTS[weight_granularity]
    quant_min, quant_max = WEIGHT_RANGES[weight_bits]
    return FakeQuantize.with_args(observer=observer, averaging_constant=1.0, quant_min=quant_min,
                                  quant_max=quant_max, dtype=torch.qint8, qscheme=qscheme)


def qat_mapping(plan: QuantPlan, layers: Mapping[str, Layer]) -> QConfigMapping:
    """PyTorch's default x86 QAT mapping, unfused, with the plan's activation range (7-bit if
    `reduce_range`, else full 8-bit), weight granularity and bits (per layer), and its fallbacks in FP32.
    layers: the captured layers by name."""
    activation = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=plan.reduce_range)
    def qconfig(bits: int) -> QConfig:
        return QConfig(activation=activation, weight=weight_fake_quant(plan.weight_granularity, bits))
    return with_global_qconfig(get_default_qat_qconfig_mapping("x86"), qconfig(plan.weight_bits),
                               [layers[name] for name in plan.fp32_layers],
                               [(layers[name], qconfig(bits)) for name, bits in plan.layer_weight_bits.items()])


class _FineTunes(abc.ABC):
    """`build(plan)`: the int8 model of `plan` from its kept fine-tune (`_fine_tuned`, run once per plan).

    `twin` is the post-training builder of the same graph capture: its layers, their names and
    their sensitivity ranking are the QAT recipe's too.
    """

    recipe: str

    def __init__(self, twin: StaticBuilder | Pt2eBuilder, training: Training) -> None:
        self.twin, self.training = twin, training
        self.example_inputs = twin.example_inputs
        self.layers = list(twin.layers)
        self._built: dict[str, nn.Module] = {}

    def build(self, plan: QuantPlan) -> nn.Module:
        """The int8 model of `plan` after its fine-tune (the user's model is never trained)."""
        unknown = (set(plan.fp32_layers) | set(plan.layer_weight_bits)) - set(self.layers)
        if unknown:
            raise ValueError(f"fp32_layers or layer_weight_bits name {sorted(unknown)}, which are not quantizable "
                             f"layers of this model. Known layers: {self.layers}")
        return self._int8(self.converted(plan), plan)

    def converted(self, plan: QuantPlan) -> nn.Module:
        """A copy of the plan's fine-tuned model converted to int8, before kernels are chosen or it is
        compiled (fine-tuned on the first call for a plan)."""
        key = plan.key()
        if key not in self._built:
            self._built[key] = self._fine_tuned(plan)
        return copy.deepcopy(self._built[key])

    @abc.abstractmethod
    def _fine_tuned(self, plan: QuantPlan) -> nn.Module:
        """The prepared model of `plan`, fine-tuned (`_train`) and converted to int8 (not yet lowered)."""

    @abc.abstractmethod
    def _int8(self, converted: nn.Module, plan: QuantPlan) -> nn.Module:
        """A copy of the converted model made ready to run (kernels chosen, or compiled)."""

    def _train(self, prepared: torch.fx.GraphModule, plan: QuantPlan, freeze: Callable[[], None]) -> None:
        """The user's train_fn, or Adam with cosine decay over train_data for the plan's epochs (or until
        `Training.seconds()`), calling `freeze` (observers and BatchNorm statistics) for the last part, as
        PyTorch's QAT tutorials do."""
        if self.training.train_fn is not None:
            self.training.train_fn(prepared, plan.qat_epochs, plan.qat_lr)
            return
        batches = list(self.training.train_data)
        if not batches:
            raise ValueError("train_data is empty: QAT needs batches of (inputs, target).")
        optimizer = torch.optim.Adam(prepared.parameters(), lr=plan.qat_lr)
        steps = plan.qat_epochs * len(batches)
        freeze_at = int(FREEZE_AT * steps)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        deadline = time.monotonic() + self.training.seconds()
        for step in range(steps):
            if step == freeze_at:
                freeze()
            inputs, target = _split(batches[step % len(batches)])
            optimizer.zero_grad()
            self.training.loss_fn(prepared(*inputs), target).backward()
            optimizer.step()
            schedule.step()
            if time.monotonic() > deadline:
                break


class QatBuilder(_FineTunes):
    """FX QAT ('qat'): int8 GraphModules with eager kernels, per-layer dispatch like static plans."""

    recipe = "qat"

    def __init__(self, model: nn.Module, static: StaticBuilder, training: Training) -> None:
        super().__init__(static, training)
        self._model = copy.deepcopy(model).eval()
        use_base_layer_classes(self._model)

    def _fine_tuned(self, plan: QuantPlan) -> torch.fx.GraphModule:
        layers = {name: self.twin.layer(name) for name in self.layers}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_qat_fx(copy.deepcopy(self._model).train(), qat_mapping(plan, layers),
                                      self.example_inputs)
        self._learn_activation_ranges(prepared, plan)
        self._train(prepared, plan, lambda: (prepared.apply(disable_observer),
                                             prepared.apply(nniqat.freeze_bn_stats)))
        prepared.eval()
        with warnings.catch_warnings(), quantized_engine(plan.engine):
            warnings.simplefilter("ignore")
            return convert_fx(prepared, qconfig_mapping=qat_mapping(plan, layers))

    def _learn_activation_ranges(self, prepared: torch.fx.GraphModule, plan: QuantPlan) -> None:
        """Replace each activation fake-quant by a learnable one (LSQ: scale and zero point trained with
        the weights) that starts at the qparams the static twin gives the same tensor for `plan`.
        Tensors are matched by the name of the node they observe, which FX derives from the model's
        module and function names in both captures; a fake-quant shared by several tensors stays
        shared. Tensors the twin never saw keep PyTorch's moving-average fake-quant."""
        twin_graph = self.twin.prepared()
        primary = {alias: name for name, aliases in self.twin.observer_names.items() for alias in aliases}
        collector_of = {node.args[0].name: primary[node.target] for node in twin_graph.graph.nodes
                        if node.op == "call_module" and node.target in primary}
        learnable: dict[int, _LearnableFakeQuantize] = {}
        for node in prepared.graph.nodes:
            if node.op != "call_module" or not isinstance(fake_quant := prepared.get_submodule(node.target),
                                                           FakeQuantize):
                continue
            if (collector := collector_of.get(node.args[0].name)) is None:
                continue
            if id(fake_quant) not in learnable:
                scale, zero_point = self.twin.activation_observer(collector, plan).calculate_qparams()
                learnable[id(fake_quant)] = _LearnableFakeQuantize(
                    MovingAverageMinMaxObserver, quant_min=0, quant_max=255, scale=float(scale),
                    zero_point=float(zero_point), use_grad_scaling=True, dtype=torch.quint8).enable_param_learning()
            setattr(prepared, node.target, learnable[id(fake_quant)])

    def _int8(self, converted: nn.Module, plan: QuantPlan) -> nn.Module:
        set_layer_engines(converted, plan.layer_engines)
        return converted


class Pt2eQatBuilder(_FineTunes):
    """PT2E QAT ('pt2e-qat'): the model exported in training mode once; each plan fine-tuned, converted
    and compiled by Inductor (freezing on; the plan's cpp_wrapper and mixed_bf16)."""

    recipe = "pt2e-qat"

    def __init__(self, model: nn.Module, twin: Pt2eBuilder, training: Training) -> None:
        super().__init__(twin, training)
        self._graph = export_graph(copy.deepcopy(model).train(), self.example_inputs)

    def _fine_tuned(self, plan: QuantPlan) -> torch.fx.GraphModule:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_qat_pt2e(copy.deepcopy(self._graph), inductor_quantizer(plan, is_qat=True))
        torchao_pt2e.allow_exported_model_train_eval(prepared)  # a train_fn may call .train() / .eval()
        self._learn_activation_ranges(prepared, plan)
        self._train(prepared, plan, lambda: (prepared.apply(torchao_pt2e.disable_observer),
                                             torchao_pt2e.move_exported_model_to_eval(prepared)))
        torchao_pt2e.move_exported_model_to_eval(prepared)
        with torch.no_grad():  # weight observers still on (a train_fn's) see the last step's weights, as
            prepared(*self.example_inputs)  # convert_fx's do; convert_pt2e uses what they last saw
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert_pt2e(prepared)

    def _learn_activation_ranges(self, prepared: torch.fx.GraphModule, plan: QuantPlan) -> None:
        """Replace each activation fake-quant by a learnable one (LSQ, as 'qat') that starts at the range
        the plan's observer gives its tensor over the twin's calibration batches.

        The training-mode export names tensors unlike the twin's inference-mode one, so the prepared
        graph is calibrated itself, as the twin calibrates: in inference mode (BatchNorm at its running
        statistics), weights not fake-quantized. A fake-quant shared by several tensors stays shared.
        """
        sites: dict[int, list[str]] = {}  # activation fake-quant -> the attribute names it is called by
        for node in prepared.graph.nodes:
            if (node.op == "call_module" and isinstance(fake_quant := prepared.get_submodule(node.target),
                                                          pt2e_fake_quantize.FakeQuantize)
                    and fake_quant.dtype == torch.uint8):
                sites.setdefault(id(fake_quant), []).append(node.target)
        collectors = {key: StatsCollector() for key in sites}
        quant_max = 127 if plan.reduce_range else 255  # the quantizer's activation range
        for key, targets in sites.items():
            for target in targets:
                setattr(prepared, target, collectors[key])
        torchao_pt2e.move_exported_model_to_eval(prepared)
        prepared.apply(torchao_pt2e.disable_fake_quant)
        by_name = collect_stats(prepared, self.twin.calib_batches, self.twin.checkpoints)
        stats = {id(prepared.get_submodule(name)): snapshots for name, snapshots in by_name.items()}
        for key, targets in sites.items():
            learnable = LearnableFakeQuantize(Pt2eFixedRangeObserver, quant_min=0, quant_max=quant_max,
                                              use_grad_scaling=True, dtype=torch.uint8, eps=QAT_EPS)
            if (snapshot := snapshot_at(stats[id(collectors[key])], plan.calib_samples)) is not None:
                learnable.activation_post_process.set_range(*activation_range(
                    snapshot, plan.activation_observer, levels=quant_max + 1, symmetric=False,
                    percentile=plan.percentile))
            learnable.enable_range_learning()
            for target in targets:
                setattr(prepared, target, learnable)
        prepared.apply(torchao_pt2e.enable_fake_quant)
        with torch.no_grad():
            prepared(*self.example_inputs)  # learnable fake-quants take their starting qparams on the first call
        torchao_pt2e.move_exported_model_to_train(prepared)

    def _int8(self, converted: nn.Module, plan: QuantPlan) -> nn.Module:
        return lower(converted, self.example_inputs, plan)  # compiled here, as every PT2E build


def _split(batch: object) -> tuple[tuple, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("train_data must yield (inputs, target) pairs (inputs: a tensor or a tuple of tensors).")
    return as_input_tuple(batch[0], "train_data"), batch[1]


class _FineTuning(Recipe):
    """A quantization-aware fine-tune from its post-training twin's capture: its layers, their names and
    their sensitivity ranking are the twin's. Needs training data."""

    twin: Recipe

    def unavailable(self, capture: Capture, built: Mapping[str, Builder], skipped: Mapping[str, str],
                    auto: bool) -> str | None:
        if capture.training is None:
            return f"no training data: the '{self.kind.name}' recipe fine-tunes the model, pass train_data and " \
                   f"loss_fn, or train_fn"
        return skipped.get(self.kind.fine_tunes)

    def sensitivity(self, builder: _FineTunes, fp32_model: nn.Module, batches: Sequence[tuple],
                    arms: Arms) -> dict[str, float]:
        return self.twin.sensitivity(builder.twin, fp32_model, batches, arms)


class QatRecipe(_FineTuning):
    """'qat': FX QAT on eager int8 kernels, per-layer dispatch like static plans."""

    kind, twin = RECIPE_KINDS["qat"], StaticRecipe()

    def builder(self, capture: Capture, twin: Builder | None = None) -> QatBuilder:
        return QatBuilder(capture.model, twin, capture.training)

    def suggest(self, trial: optuna.Trial, dims: Dimensions) -> QuantPlan:
        fields = dims.fallbacks_kernels_weights(trial, "qat")
        return QuantPlan(**fields, **dims.int8_ranges(trial, kernels_of(fields), "qat:", "qat"),
                         **dims.fine_tune(trial, "qat:"))

    def seeds(self, dims: Dimensions) -> list[dict]:
        """PyTorch's default x86 QAT but at full 8-bit activation range (the default's 7-bit range guards
        CPUs without VNNI; the measured accuracy catches any overflow), no fallbacks."""
        space = dims.space
        return [{**dims.recipe_param("qat"), "qat:n_fallback": 0, "engine": closest("x86", space.kernels),
                 "qat:weight_granularity": closest("per_channel", space.weight_granularities),
                 "qat:reduce_range": closest(False, space.reduce_range),
                 **{f"qat:{name}": value for name, value in dims.fine_tune_seed().items()}}]


class Pt2eQatRecipe(_FineTuning):
    """'pt2e-qat': X86InductorQuantizer's QAT config on the model exported in training mode, lowered by Inductor."""

    kind, twin = RECIPE_KINDS["pt2e-qat"], Pt2eStaticRecipe()

    def builder(self, capture: Capture, twin: Builder | None = None) -> Pt2eQatBuilder:
        return Pt2eQatBuilder(capture.model, twin, capture.training)

    def suggest(self, trial: optuna.Trial, dims: Dimensions) -> QuantPlan:
        name = self.kind.name
        lowering = dims.inductor_lowering(trial, name)
        fp32_layers = dims.fallbacks(trial, name, f"{name}:")
        return QuantPlan(recipe=name, fp32_layers=fp32_layers, **lowering, **dims.fine_tune(trial, f"{name}:"))

    def seeds(self, dims: Dimensions) -> list[dict]:
        """X86InductorQuantizer's QAT config with the Python wrapper and no bf16, no fallbacks."""
        name = self.kind.name
        return [{**dims.recipe_param(name), **dims.inductor_lowering_seed(name), f"{name}:n_fallback": 0,
                 **{f"{name}:{key}": value for key, value in dims.fine_tune_seed().items()}}]

    def rebuilt(self, builder: Pt2eQatBuilder, plan: QuantPlan, fill: Callable[[nn.Module], None]) -> nn.Module:
        return lowered_rebuild(builder.converted(plan), builder.example_inputs, plan, fill)
