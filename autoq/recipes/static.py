"""Static post-training quantization on PyTorch's native x86 int8 engine (FX graph mode).

`StaticBuilder` captures and calibrates a model once, then builds any number of int8 candidates
from `QuantPlan`s without touching calibration data again: each candidate is a copy of the
prepared graph whose observers get the plan's precomputed ranges, converted with the plan's FP32
fallbacks under the plan's kernel library.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from autoq.calibrate.observers import FixedRangeObserver, weight_observer
from autoq.calibrate.ranges import activation_range
from autoq.calibrate.stats import StatsCollector, TensorStats, checkpoints_for, collect_stats, snapshot_at
from autoq.capture import (
    Layer, drop_dead_code, explain_trace_failure, find_layers, keep_fp32, set_layer_qconfig, use_base_layer_classes,
)
from autoq.dispatch.engine import quantized_engine
from autoq.dispatch.layers import set_layer_engines
from autoq.plan import MEASURED, RECIPE_KINDS, QuantPlan, default_plan
from autoq.recipes.dimensions import closest, kernel_choice
from autoq.recipes.fusion import fold_relu6, is_relu6
from autoq.recipes.recipe import Builder, Capture, Recipe
from autoq.recipes.sensitivity import layer_sensitivity
from autoq.recover.adaround import adarounded, set_int8_weights, weight_scales
from autoq.recover.bias import correct_bias, float_weights, input_means, mean_batches
from autoq.recover.equalize import Equalization, equalized

if TYPE_CHECKING:
    import optuna

    from autoq.recipes.arms import Arms
    from autoq.recipes.dimensions import Dimensions



def qconfig_mapping(weight_granularity: str, fp32_layers: Sequence[Layer] = (), weight_bits: int = 8,
                    layer_weight_bits: Sequence[tuple[Layer, int]] = ()) -> QConfigMapping:
    """PyTorch's default x86 mapping with autoq's statistics collector on activations, weights of
    `weight_bits` but for the (layer, bits) of `layer_weight_bits`, and `fp32_layers` in FP32."""
    def qconfig(bits: int) -> QConfig:
        return QConfig(activation=StatsCollector, weight=weight_observer(weight_granularity, bits))
    return with_global_qconfig(get_default_qconfig_mapping("x86"), qconfig(weight_bits), fp32_layers,
                               [(layer, qconfig(bits)) for layer, bits in layer_weight_bits])


def with_global_qconfig(mapping: QConfigMapping, qconfig: QConfig, fp32_layers: Sequence[Layer] = (),
                        layer_qconfigs: Sequence[tuple[Layer, QConfig]] = ()) -> QConfigMapping:
    """`mapping` with `qconfig` wherever it used its global activation qconfig (special weight
    qconfigs, such as per-tensor for transposed convs, and fixed-range ops are kept), the layers of
    `layer_qconfigs` with their own, and `fp32_layers` kept in FP32."""
    default_global = mapping.global_qconfig
    mapping.set_global(qconfig)
    for object_type, object_qconfig in list(mapping.object_type_qconfigs.items()):
        if object_qconfig is not None and object_qconfig.activation == default_global.activation:
            weight = object_qconfig.weight if object_qconfig.weight != default_global.weight else qconfig.weight
            mapping.set_object_type(object_type, QConfig(activation=qconfig.activation, weight=weight))
    for layer, layer_qconfig in layer_qconfigs:
        set_layer_qconfig(mapping, layer, layer_qconfig)
    for layer in fp32_layers:
        keep_fp32(mapping, layer)
    return mapping


class StaticBuilder:
    """Captures and calibrates `model` once; `build(plan)` returns an int8 GraphModule."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: tuple,
        calib_batches: Sequence[tuple],
        *,
        non_traceable_modules: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """progress: called with 1 after each calibration batch (two passes over calib_batches)."""
        self.example_inputs = example_inputs
        self.non_traceable_modules = list(non_traceable_modules)
        self._batches = calib_batches  # kept for a rewritten model's calibration and for bias correction
        self._rewritten: dict[str, StaticBuilder] = {}  # equalization -> builder of the rewritten FP32 model
        self.equalizations: dict[str, Equalization] = {}  # equalization -> what the rewrite did
        self._means: dict[str, torch.Tensor] | None = None  # each layer's mean input per channel (bias correction)
        self._rounded: dict[tuple, dict[str, torch.Tensor]] = {}  # weight setting -> AdaRound's int8 weights
        self._weights: dict[tuple, dict] = {}  # weight setting -> FP32 (weight, bias) per layer
        self._model = copy.deepcopy(model).eval()
        use_base_layer_classes(self._model)
        self._prepared: dict[tuple, torch.fx.GraphModule] = {}
        self._layers: dict[str, Layer] = {}
        base = self._prepare(QuantPlan())
        self._layers = {layer.name: layer for layer in find_layers(base)}
        self.layers = list(self._layers)
        self.checkpoints = checkpoints_for(calib_batches)
        self.stats: dict[str, list[TensorStats]] = collect_stats(base, calib_batches, self.checkpoints, progress)
        self.observer_names, self.observer_owner = _observer_names_and_owners(base, self._layers.values())
        self.has_relu6 = any(is_relu6(base, node) for node in base.graph.nodes)

    def _mapping(self, plan: QuantPlan, fp32: bool = False) -> QConfigMapping:
        """The plan's qconfig mapping (with `fp32`: its FP32 fallbacks too, which convert_fx applies)."""
        fp32_layers = [self._layers[name] for name in plan.fp32_layers] if fp32 else []
        return qconfig_mapping(plan.weight_granularity, fp32_layers, plan.weight_bits,
                               [(self._layers[name], bits) for name, bits in plan.layer_weight_bits.items()])

    def _prepare(self, plan: QuantPlan) -> torch.fx.GraphModule:
        """The captured graph prepared with the plan's weight observers (convert_fx needs the prepare's qconfigs)."""
        key = _weight_setting(plan)
        if key not in self._prepared:
            custom = PrepareCustomConfig().set_non_traceable_module_names(self.non_traceable_modules)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    prepared = prepare_fx(
                        copy.deepcopy(self._model), self._mapping(plan),
                        self.example_inputs, prepare_custom_config=custom,
                    )
                except Exception as error:  # tracing errors come in many types
                    raise explain_trace_failure(self._model, error, self.non_traceable_modules) from error
            _drop_dead_observed_code(prepared)
            self._prepared[key] = prepared
        return self._prepared[key]

    def prepared(self) -> torch.fx.GraphModule:
        """The captured FP32 graph with a StatsCollector on every activation (do not modify)."""
        return self._prepare(QuantPlan())

    def layer(self, name: str) -> Layer:
        return self._layers[name]

    def activation_observer(self, name: str, plan: QuantPlan) -> FixedRangeObserver:
        """The observer `plan` puts at collector `name`, with its range from the calibration statistics."""
        stats = snapshot_at(self.stats[name], plan.calib_samples)
        if stats is None:
            low, high = 0.0, 1.0  # never reached during calibration: any range will do
        else:
            low, high = activation_range(
                stats, plan.observer_for(self.observer_owner.get(name)),
                levels=128 if plan.reduce_range else 256, symmetric=plan.activation_symmetric,
                percentile=plan.percentile,
            )
        return FixedRangeObserver(low, high, symmetric=plan.activation_symmetric, reduce_range=plan.reduce_range)

    def build(self, plan: QuantPlan) -> torch.fx.GraphModule:
        """The int8 model for `plan` (calibration statistics are reused, never recomputed)."""
        if plan.equalization != "none":
            return self._rewritten_builder(plan.equalization).build(dataclasses.replace(plan, equalization="none"))
        unknown = (set(plan.fp32_layers) | set(plan.layer_weight_bits)) - set(self.layers)
        if unknown:
            raise ValueError(
                f"fp32_layers or layer_weight_bits name {sorted(unknown)}, which are not quantizable layers of "
                f"this model. Known layers: {self.layers}"
            )
        model = _copy_sharing_tensors(self._prepare(plan))
        for name, aliases in self.observer_names.items():
            observer = self.activation_observer(name, plan)
            for alias in aliases:
                setattr(model, alias, observer)
        with warnings.catch_warnings(), quantized_engine(plan.engine):
            warnings.simplefilter("ignore")
            quantized = convert_fx(model, qconfig_mapping=self._mapping(plan, fp32=True))
            if plan.adaround:
                set_int8_weights(quantized, self._adarounded(plan), engine=plan.engine)
            if plan.bias_correction:
                correct_bias(quantized, self._float_weights(plan), self._input_means(),
                             engine=plan.engine)
        if plan.fold_relu6:
            fold_relu6(quantized, plan.engine, observed_quant_max=127 if plan.reduce_range else 255)
        if plan.channels_last:
            to_channels_last(quantized, self.example_inputs)
        set_layer_engines(quantized, plan.layer_engines)
        return quantized


    def _rewritten_builder(self, equalization: str) -> StaticBuilder:
        """The builder of this model rewritten by `equalization` ('fold_bn', 'cross_layer'): captured and
        calibrated on first use."""
        if equalization not in self._rewritten:
            rewrite = equalized(self._model, scale_pairs=equalization == "cross_layer")
            builder = StaticBuilder(rewrite.model, self.example_inputs, self._batches,
                                    non_traceable_modules=self.non_traceable_modules)
            if builder.layers != self.layers:
                raise ValueError(f"equalization {equalization!r} changed the model's quantizable layers "
                                 f"({builder.layers} instead of {self.layers}): search with equalizations=['none'].")
            self.equalizations[equalization], self._rewritten[equalization] = rewrite, builder
        return self._rewritten[equalization]

    def _adarounded(self, plan: QuantPlan) -> dict[str, torch.Tensor]:
        """AdaRound's int8 weights of every layer for the plan's weight setting (learned once per setting)."""
        key = _weight_setting(plan)
        if key not in self._rounded:
            weights = self._float_weights(plan)
            scales = weight_scales(weights, plan.weight_granularity, plan.weight_bits_for)
            self._rounded[key] = adarounded(self._model, self.layers, self._batches, scales, weights=weights)
        return self._rounded[key]

    def _float_weights(self, plan: QuantPlan) -> dict:
        """The BN-folded FP32 weights and biases of the plan's prepared graph (copied once per weight setting,
        not per build)."""
        key = _weight_setting(plan)
        if key not in self._weights:
            self._weights[key] = float_weights(self._prepare(plan), self.layers)
        return self._weights[key]

    def _input_means(self) -> dict[str, torch.Tensor]:
        """Each layer's mean FP32 input per channel over the first MEAN_SAMPLES calibration samples, from
        the FP32 model itself (its layers have the names of the prepared graph's; computed once)."""
        if self._means is None:
            self._means = input_means(self._model, self.layers, mean_batches(self._batches))
        return self._means


def _weight_setting(plan: QuantPlan) -> tuple:
    """What a plan's prepared graph and weight quantization depend on."""
    return plan.weight_granularity, plan.weight_bits, tuple(sorted(plan.layer_weight_bits.items()))


def _copy_sharing_tensors(module: nn.Module) -> nn.Module:
    """Copy modules and graph but share parameter/buffer tensors (convert_fx only reads them)."""
    shared = {id(tensor): tensor for tensor in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)


def _drop_dead_observed_code(prepared: torch.fx.GraphModule) -> None:
    """`drop_dead_code` for a prepared graph, whose per-node qconfigs (which convert_fx reads) follow."""
    if drop_dead_code(prepared):
        attrs = prepared.meta["_observed_graph_module_attrs"]
        alive = {node.name for node in prepared.graph.nodes}
        attrs.node_name_to_qconfig = {k: v for k, v in attrs.node_name_to_qconfig.items() if k in alive}


def _observer_names_and_owners(
    prepared: torch.fx.GraphModule, layers: Iterable[Layer]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Collector names, and which layer's output each observes.

    FX shares one observer instance between ops whose output keeps its input's qparams (maxpool,
    relu6, ...): returns {primary name: every attribute name of that instance} and
    {primary name: layer whose output it observes}.
    """
    layer_of_node = {layer.node: layer.name for layer in layers}
    primary = {id(module): name for name, module in prepared.named_modules() if isinstance(module, StatsCollector)}
    names: dict[str, list[str]] = {name: [] for name in primary.values()}
    owners = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = prepared.get_submodule(node.target)
        if not isinstance(module, StatsCollector):
            continue
        name = primary[id(module)]
        if node.target not in names[name]:
            names[name].append(node.target)
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.name in layer_of_node:
            owners.setdefault(name, layer_of_node[source.name])
    return names, owners


def to_channels_last(graph_module: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """Make 4-D inputs channels_last as the model's first step (in place); int8 convs keep it."""
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        if isinstance(example, torch.Tensor) and example.dim() == 4:
            with graph_module.graph.inserting_after(node):
                converted = graph_module.graph.call_method(
                    "contiguous", (node,), {"memory_format": torch.channels_last})
            node.replace_all_uses_with(converted, delete_user_cb=lambda user: user is not converted)
    graph_module.recompile()


class StaticRecipe(Recipe):
    """'static': FX post-training quantization with calibrated activations. Its trial parameters are
    unprefixed ('activation_observer', 'n_fallback', ...), as studies since autoq 0.1 stored them."""

    kind = RECIPE_KINDS["static"]

    def builder(self, capture: Capture, twin: Builder | None = None) -> StaticBuilder:
        return StaticBuilder(capture.model, capture.example_inputs, capture.batches,
                             non_traceable_modules=capture.non_traceable_modules, progress=capture.progress)

    def sensitivity(self, builder: StaticBuilder, fp32_model: nn.Module, batches: Sequence[tuple],
                    arms: Arms) -> dict[str, float]:
        return layer_sensitivity(builder, fp32_model, batches, default_plan("x86"))

    def rebuilt(self, builder: StaticBuilder, plan: QuantPlan, fill: Callable[[nn.Module], None]) -> nn.Module:
        """As every eager recipe, but the numbers a plan learns (AdaRound's rounding, corrected biases) come
        from the file: they are not learned again."""
        return super().rebuilt(builder, dataclasses.replace(plan, adaround=False, bias_correction=False), fill)

    def suggest(self, trial: optuna.Trial, dims: Dimensions) -> QuantPlan:
        space, arms = dims.space, dims.arms
        ranges, uses_percentile = dims.ranges(trial, "static", "")
        kernels = trial.suggest_categorical("engine", space.kernels)
        int8 = dims.int8_ranges(trial, kernels, "", "static")
        # a folded conv's output uses the full 8-bit range whatever reduce_range says
        may_fold = arms.has_relu6 and (int8["weight_bits"] == 7 or arms.full_range_safe(kernels))
        return QuantPlan(
            **kernel_choice(kernels), **ranges,
            weight_granularity=trial.suggest_categorical("weight_granularity", space.weight_granularities),
            activation_symmetric=trial.suggest_categorical("activation_symmetric", space.activation_symmetric),
            **int8,
            calib_samples=dims.calib_samples(trial, ""),
            percentile=dims.percentile(trial, "", uses_percentile),
            channels_last=trial.suggest_categorical("channels_last", space.channels_last),
            fold_relu6=may_fold and trial.suggest_categorical("fold_relu6", space.fold_relu6),
            **dims.recovery(trial, "", self.kind.fields),
        )

    def seeds(self, dims: Dimensions) -> list[dict]:
        """PyTorch's default FX PTQ (get_default_qconfig_mapping) on each allowed kernel choice ('measured'
        with x86's recipe); a default the space excludes becomes the space's first allowed value. Then the
        first of them with the most sensitive layer in FP32 (`Dimensions.fallback_seed`)."""
        space, seeds = dims.space, []
        for engine in dims.seed_kernels():
            plan = default_plan("x86" if engine == MEASURED else engine)
            seeds.append({
                **dims.recipe_param("static"), **dims.ranges_seed("static", ""), "n_fallback": 0, "engine": engine,
                "weight_granularity": closest(plan.weight_granularity, space.weight_granularities),
                "activation_symmetric": closest(plan.activation_symmetric, space.activation_symmetric),
                "reduce_range": closest(plan.reduce_range, space.reduce_range),  # on AVX2 onednn's full
                # range comes with 7-bit weights (Dimensions.int8_ranges)
                "calib_samples": dims.arms.checkpoints[-1],
                "channels_last": closest(plan.channels_last, space.channels_last),
                **({"fold_relu6": closest(False, space.fold_relu6)} if dims.arms.has_relu6 else {}),
                **dims.recovery_seed("", self.kind.fields),
            })
        return seeds + dims.fallback_seed(seeds[0], "static", "")

    def sweep(self, seed: dict, dims: Dimensions) -> list[dict]:
        """Every other observer method at full 8-bit range if allowed, with ReLU6 folded (a finer grid for
        its conv outputs) if the model has any; where the kernels saturate, full 8-bit activations come
        with 7-bit weights, and folding only with them. Then that plan with each recovery technique."""
        space = dims.space
        preferred = {"reduce_range": False if False in space.reduce_range else seed["reduce_range"]}
        if dims.arms.has_relu6 and True in space.fold_relu6:
            preferred["fold_relu6"] = True
        variants = (dims.observer_variants({**seed, **preferred}, "")
                    + dims.recovery_variants({**seed, **preferred}, "", self.kind.fields))
        return [params for params in variants if params != seed]
