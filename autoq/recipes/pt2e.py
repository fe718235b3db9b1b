"""PT2E quantization, compiled: torch.export -> torchao's X86InductorQuantizer -> torch.compile (or OpenVINO).

This is where PyTorch's x86 int8 work is heading: the quantized graph is compiled (weights frozen
into the code, int8 ops fused by Inductor's oneDNN lowering) instead of run op by op. Two recipes
here: 'pt2e-static' (activations calibrated) and 'pt2e-dynamic' (activation ranges per call); the
third, 'pt2e-qat', fine-tunes (autoq.recipes.qat) and lowers the same way. A static plan's graph may
instead be lowered by OpenVINO (plan.lowering, `autoq.recipes.openvino_lowering`): the same graph, other kernels.

`Pt2eBuilder` exports the model once (batch dimension dynamic, dead code dropped: an unused
output such as a BERT pooler otherwise breaks prepare_pt2e), calibrates once with autoq's
statistics collectors, then builds any number of candidates: each is prepared with the plan's FP32
fallbacks (`set_module_name_qconfig(name, None)`), gets the plan's ranges, is converted (biases
corrected with the plan's `bias_correction`: `autoq.recover.graph_bias`) and then compiled with
freezing (and optionally cpp_wrapper and int8-mixed-bf16 autocast). Compile time is part of each
build; Inductor's on-disk cache makes rebuilding a plan cheap.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch.utils import _pytree as pytree
from torchao.quantization.pt2e import fake_quantize as pt2e_fake_quantize
from torchao.quantization.pt2e import observer as pt2e_observer
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86q

from autoq.calibrate.observers import WEIGHT_RANGES, Pt2eFixedRangeObserver
from autoq.calibrate.ranges import activation_range
from autoq.calibrate.stats import StatsCollector, TensorStats, checkpoints_for, collect_stats, snapshot_at
from autoq.capture import TraceError, drop_dead_code
from autoq.plan import INDUCTOR, OPENVINO, RECIPE_KINDS, QuantPlan
from autoq.recover.bias import mean_batches
from autoq.recover.graph_bias import correct_graph_bias, graph_float_weights, graph_input_means, is_layer
from autoq.recipes.dimensions import unique
from autoq.recipes.dynamic import auto_skip_reason
from autoq.recipes.openvino_lowering import OpenVinoLowered, unfold_weights
from autoq.recipes.recipe import Builder, Capture, Recipe
from autoq.recipes.sensitivity import single_layer_sensitivity

if TYPE_CHECKING:
    import optuna

    from autoq.recipes.arms import Arms
    from autoq.recipes.dimensions import Dimensions

QAT_EPS = 2**-12  # X86InductorQuantizer's eps for QAT fake-quants


def bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), which int8-mixed-bf16 needs to pay off."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def export_graph(model: nn.Module, example_inputs: tuple) -> torch.fx.GraphModule:
    """`model` captured by torch.export (batch dimension dynamic), dead code removed.

    Strict export (TorchDynamo) first, as Intel Neural Compressor does: non-strict export keeps
    in-place ops such as torchvision ResNet's `out += identity`, on which X86InductorQuantizer's
    conv-add-relu pattern fails ("Input partition has more than one output node"). Non-strict
    export when strict fails. Raises TraceError naming both failures.
    """
    errors = []
    for strict in (True, False):
        try:
            graph = _export(model, example_inputs, strict=strict).module()
            break
        except Exception as error:  # export failures come in many types
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            errors.append(f"{'strict' if strict else 'non-strict'}: {type(error).__name__}: {first}")
    else:
        raise TraceError(f"torch.export could not capture the model for PT2E ({'; '.join(errors)}). "
                         f"Make forward() exportable (see the torch.export docs) or search the FX recipes "
                         f"only (recipes=['static', 'dynamic']).")
    drop_dead_code(graph)
    return graph


def _export(model: nn.Module, example_inputs: tuple, strict: bool = False) -> torch.export.ExportedProgram:
    """torch.export with the batch dimension of every input dynamic."""
    batched = [isinstance(x, torch.Tensor) and x.dim() > 0 for x in example_inputs]
    dynamic = tuple({0: torch.export.Dim.AUTO} if b else None for b in batched)
    # a batch of 1 would be specialized (export treats size-1 dims as constants): export a batch of 2
    inputs = tuple(torch.cat([x, x]) if b and x.shape[0] == 1 else x for x, b in zip(example_inputs, batched))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, inputs, strict=strict, dynamic_shapes=dynamic)


def _layer_name(node: torch.fx.Node) -> str | None:
    """Module name of a linear/conv node in an exported graph (the innermost module it ran in)."""
    stack = node.meta.get("nn_module_stack")
    if not is_layer(node) or not stack:
        return None
    return list(stack.values())[-1][0]


def layer_names(graph: torch.fx.GraphModule) -> list[str]:
    """Module names of the linear/conv layers of an exported graph, in graph order."""
    return list(dict.fromkeys(name for node in graph.graph.nodes if (name := _layer_name(node)) is not None))


class _Quantizer(x86q.X86InductorQuantizer):
    """X86InductorQuantizer whose skipped layers carry no annotation at all once annotated.

    It marks a skipped layer's nodes with an empty annotation; torchao 0.18's conv-BatchNorm QAT
    fusion (prepare_qat_pt2e) then fails with an IndexError on a skipped conv, reading its inputs'
    specs. An empty annotation quantizes nothing, so dropping it after annotating changes nothing else.
    """

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = super().annotate(model)
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if annotation is not None and not annotation.input_qspec_map and annotation.output_qspec is None:
                del node.meta["quantization_annotation"]
        return model


def inductor_quantizer(plan: QuantPlan, *, is_dynamic: bool = False, is_qat: bool = False,
                       observer: type | None = None, layers: Sequence[str] | None = None) -> x86q.X86InductorQuantizer:
    """X86InductorQuantizer's default config (static, dynamic or QAT) at the plan's activation range
    (7-bit with `reduce_range`, the quantizer's own option for CPUs without VNNI) and weight bits (per
    layer), for every layer but the plan's `fp32_layers` (with `layers`: for those only); `observer`
    replaces its activation observers. QAT uses plain fake quantization instead of the config's fused
    kernel, whose weight grid `convert_pt2e` does not reproduce."""
    configs = {bits: _quantization_config(plan.reduce_range, bits, is_dynamic, is_qat, observer)
               for bits in WEIGHT_RANGES}
    quantizer = _Quantizer()
    if layers is None:
        quantizer.set_global(configs[plan.weight_bits])
        for layer, bits in plan.layer_weight_bits.items():
            quantizer.set_module_name_qconfig(layer, configs[bits])
        for layer in plan.fp32_layers:
            quantizer.set_module_name_qconfig(layer, None)
    else:
        for layer in layers:
            quantizer.set_module_name_qconfig(layer, configs[plan.weight_bits_for(layer)])
    return quantizer


def _quantization_config(reduce_range: bool, weight_bits: int, is_dynamic: bool, is_qat: bool,
                         observer: type | None) -> x86q.QuantizationConfig:
    config = x86q.get_default_x86_inductor_quantization_config(is_dynamic=is_dynamic, is_qat=is_qat,
                                                               reduce_range=reduce_range)
    quant_min, quant_max = WEIGHT_RANGES[weight_bits]
    config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=quant_min,
                                                                    quant_max=quant_max))
    if is_qat and not is_dynamic:  # plain fake quantization, as the 'qat' recipe (see autoq.recipes.qat)
        fake_quantize = pt2e_fake_quantize.FakeQuantize.with_args
        weight = dataclasses.replace(config.weight, observer_or_fake_quant_ctr=fake_quantize(
            observer=pt2e_observer.MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0, eps=QAT_EPS))
        config = dataclasses.replace(config, weight=weight)
        observer = fake_quantize(observer=pt2e_observer.MovingAverageMinMaxObserver, eps=QAT_EPS)
    if observer is not None:
        activation = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=observer)
        config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    return config


def float32_outputs(output: object) -> object:
    """`output` (tensors, nested in tuples/lists/dicts) with floating tensors as float32 (autocast gives bf16)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.float() if t.is_floating_point() else t, output)


class Lowered(nn.Module):
    """A compiled int8 graph, called without autograd (as it was frozen) and, for int8-mixed-bf16,
    under bf16 autocast; floating outputs come back as float32.

    Inductor's settings are applied around every call, not passed as torch.compile options: its
    int8 weight-prepack passes read the global `freezing` flag, and a new input shape recompiles.
    Each batch size gets its own static compile (the exported graph takes any): Inductor's int8
    conv lowering fails on dynamic-shape graphs in torch 2.14.
    """

    def __init__(self, graph: torch.fx.GraphModule, example_inputs: tuple, *, mixed_bf16: bool,
                 cpp_wrapper: bool) -> None:
        super().__init__()
        self.graph, self.example_inputs = graph, example_inputs
        self.compiled = torch.compile(graph, dynamic=False)
        self.mixed_bf16, self.settings = mixed_bf16, {"freezing": True, "cpp_wrapper": cpp_wrapper}
        self.meta: dict = {}  # model.meta['autoq'] holds the plan (autoq.dispatch.apply.carrying_plan)

    def to_bytes(self) -> bytes:
        """The int8 graph as a saved torch.export program (compiled code does not pickle)."""
        buffer = io.BytesIO()
        torch.export.save(_export(self.graph, self.example_inputs), buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, plan: QuantPlan) -> Lowered:
        """Inverse of `to_bytes`; compiles again on the first call."""
        program = torch.export.load(io.BytesIO(data))
        example_inputs = tuple(program.example_inputs[0])
        return cls(program.module(), example_inputs, mixed_bf16=plan.mixed_bf16, cpp_wrapper=plan.cpp_wrapper)

    def forward(self, *args: object) -> object:
        with (torch.no_grad(), inductor_config.patch(self.settings),
              torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.mixed_bf16)):
            output = self.compiled(*args)
        return float32_outputs(output)


class Pt2eBuilder:
    """Exports (and, for static, calibrates) `model` once; `build(plan)` returns a compiled int8 model."""

    def __init__(self, model: nn.Module, example_inputs: tuple, calib_batches: Sequence[tuple], *,
                 recipe: str = "pt2e-static", progress: Callable[[int], None] | None = None) -> None:
        """progress: called with 1 after each calibration batch (two passes; static only)."""
        if recipe not in ("pt2e-static", "pt2e-dynamic"):
            raise ValueError(f"Pt2eBuilder builds 'pt2e-static' and 'pt2e-dynamic', not {recipe!r}.")
        self.recipe, self.example_inputs = recipe, example_inputs
        self.dynamic = recipe == "pt2e-dynamic"
        self._graph = export_graph(copy.deepcopy(model).eval(), example_inputs)
        self.layers = layer_names(self._graph)
        if not self.layers:
            raise ValueError("PT2E found no linear or conv layer to quantize in the exported graph.")
        self.checkpoints = checkpoints_for(calib_batches) if not self.dynamic else []
        self.stats: dict[str, list[TensorStats]] = {}  # observed node name -> snapshots
        self.owner: dict[str, str] = {}  # observed node name -> layer whose output it is
        self.calib_batches = list(calib_batches)
        self._means: dict[str, torch.Tensor] | None = None  # each layer's mean FP32 input, for bias correction
        if not self.dynamic:
            self._calibrate(QuantPlan(recipe=recipe), None, progress)

    def _calibrate(self, plan: QuantPlan, layers: Sequence[str] | None,
                   progress: Callable[[int], None] | None = None) -> None:
        """Statistics of every tensor `plan` observes that no calibration has observed yet."""
        base = self._prepare(plan, StatsCollector, layers)
        by_module = collect_stats(base, self.calib_batches, self.checkpoints, progress)
        # A shared quantization spec (pooling, flatten) puts one collector on several tensors; named_modules,
        # which collect_stats reads, lists it under one name only.
        by_collector = {id(base.get_submodule(name)): stats for name, stats in by_module.items()}
        for source, collector in _observed(base, StatsCollector):
            self.stats.setdefault(source.name, by_collector[id(collector)])
            if (layer := _layer_name(source)) is not None:
                self.owner[source.name] = layer

    def _prepare(self, plan: QuantPlan, observer: type | None,
                 layers: Sequence[str] | None = None) -> torch.fx.GraphModule:
        """The exported graph prepared for `plan`; raises TraceError if the quantizer cannot annotate it."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return prepare_pt2e(copy.deepcopy(self._graph), inductor_quantizer(
                    plan, is_dynamic=self.dynamic, observer=observer, layers=layers))
            except Exception as error:  # the quantizer's pattern matching fails in many ways
                raise TraceError(f"torchao's X86InductorQuantizer could not prepare the exported graph: "
                                 f"{type(error).__name__}: {str(error)[:300]}. Search the FX recipes only "
                                 f"(recipes=['static', 'dynamic']).") from error

    def reference(self, plan: QuantPlan, layers: Sequence[str] | None = None) -> torch.fx.GraphModule:
        """The converted (quantize/dequantize reference) graph of `plan`, not compiled; with `layers`,
        only those layers are quantized."""
        unknown = (set(plan.fp32_layers) | set(plan.layer_weight_bits)) - set(self.layers)
        if unknown:
            raise ValueError(f"fp32_layers or layer_weight_bits name {sorted(unknown)}, which are not linear/conv "
                             f"layers of the exported graph. Known layers: {self.layers}")
        prepared = self._prepare(plan, None if self.dynamic else Pt2eFixedRangeObserver, layers)
        if not self.dynamic:
            observed = {source.name for source, _ in _observed(prepared, Pt2eFixedRangeObserver)}
            if not observed <= set(self.stats):  # fallbacks moved observers: calibrate the new ones, once
                self._calibrate(plan, layers)
            self._set_ranges(prepared, plan)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            prepared(*self.example_inputs)  # weight observers see their weights (activation ranges are fixed)
            weights = graph_float_weights(prepared) if plan.bias_correction else {}
            converted = convert_pt2e(prepared)
        if plan.bias_correction:
            correct_graph_bias(converted, weights, self._input_means())
        return converted

    def _input_means(self) -> dict[str, torch.Tensor]:
        """Each layer's mean FP32 input per channel over the first calibration samples (`mean_batches`), by
        node name in the exported graph (computed once)."""
        if self._means is None:
            self._means = graph_input_means(self._graph, mean_batches(self.calib_batches))
        return self._means

    def _set_ranges(self, prepared: torch.fx.GraphModule, plan: QuantPlan) -> None:
        """Each observer gets its tensor's range; an observer shared by several tensors gets their union,
        as a calibrating observer called on each of them would."""
        ranges: dict[int, tuple[Pt2eFixedRangeObserver, float, float]] = {}
        for source, observer in _observed(prepared, Pt2eFixedRangeObserver):
            stats = snapshot_at(self.stats[source.name], plan.calib_samples)
            if stats is None:
                continue  # never reached during calibration (a dead branch): any range will do
            low, high = activation_range(stats, plan.observer_for(self.owner.get(source.name)),
                                         levels=observer.quant_max - observer.quant_min + 1, symmetric=False,
                                         percentile=plan.percentile)
            _, known_low, known_high = ranges.get(id(observer), (observer, low, high))
            ranges[id(observer)] = (observer, min(low, known_low), max(high, known_high))
        for observer, low, high in ranges.values():
            observer.set_range(low, high)

    def build(self, plan: QuantPlan) -> Lowered | OpenVinoLowered:
        """The int8 model of `plan`, compiled by its lowering (here: the first call happens inside)."""
        return lower(self.reference(plan), self.example_inputs, plan)


def lower(graph: torch.fx.GraphModule, example_inputs: tuple, plan: QuantPlan) -> Lowered | OpenVinoLowered:
    """A converted PT2E graph compiled by the plan's lowering: Inductor with the plan's options (the first
    call compiles it, here), or OpenVINO (`autoq.recipes.openvino_lowering`)."""
    if plan.lowering == OPENVINO:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = _export(unfold_weights(graph), example_inputs)
        return OpenVinoLowered(graph, program, example_inputs, mixed_bf16=plan.mixed_bf16)
    model = Lowered(graph, example_inputs, mixed_bf16=plan.mixed_bf16, cpp_wrapper=plan.cpp_wrapper)
    model(*example_inputs)
    return model


def _observed(prepared: torch.fx.GraphModule, kind: type) -> Iterator[tuple[torch.fx.Node, nn.Module]]:
    """(observed node, observer) for every call of an observer of type `kind` in `prepared`."""
    for node in prepared.graph.nodes:
        if node.op == "call_module" and isinstance(module := prepared.get_submodule(node.target), kind):
            yield node.args[0], module


def lowered_rebuild(graph: torch.fx.GraphModule, example_inputs: tuple, plan: QuantPlan,
                    fill: Callable[[nn.Module], None]) -> Lowered | OpenVinoLowered:
    """A converted graph with its numbers put in by `fill`, then lowered (autoq.recipes.recipe.Recipe.rebuilt)."""
    fill(graph)
    return lower(graph, example_inputs, plan)


class _PostTraining(Recipe):
    """The post-training PT2E recipes: prepared, converted and lowered (Inductor or OpenVINO) per plan."""

    def builder(self, capture: Capture, twin: Builder | None = None) -> Pt2eBuilder:
        return Pt2eBuilder(capture.model, capture.example_inputs, capture.batches, recipe=self.kind.name,
                           progress=capture.progress)

    def sensitivity(self, builder: Pt2eBuilder, fp32_model: nn.Module, batches: Sequence[tuple],
                    arms: Arms) -> dict[str, float]:
        """Each layer alone in the quantize/dequantize reference graph (not compiled)."""
        plan = QuantPlan(recipe=self.kind.name, reduce_range=not arms.full_range_safe(INDUCTOR))
        return single_layer_sensitivity(lambda layer: builder.reference(plan, layers=[layer]), builder.layers,
                                        fp32_model, batches)

    def rebuilt(self, builder: Pt2eBuilder, plan: QuantPlan,
                fill: Callable[[nn.Module], None]) -> Lowered | OpenVinoLowered:
        return lowered_rebuild(builder.reference(plan), builder.example_inputs, plan, fill)


class Pt2eStaticRecipe(_PostTraining):
    """'pt2e-static': X86InductorQuantizer with calibrated activation ranges, lowered by Inductor or OpenVINO."""

    kind = RECIPE_KINDS["pt2e-static"]

    def suggest(self, trial: optuna.Trial, dims: Dimensions) -> QuantPlan:
        name = self.kind.name
        prefix, lowering = f"{name}:", dims.inductor_lowering(trial, name)
        ranges, uses_percentile = dims.ranges(trial, name, prefix)
        return QuantPlan(recipe=name, **ranges, calib_samples=dims.calib_samples(trial, prefix),
                         percentile=dims.percentile(trial, prefix, uses_percentile), **lowering,
                         **dims.recovery(trial, prefix, self.kind.fields))

    def seeds(self, dims: Dimensions) -> list[dict]:
        """X86InductorQuantizer's defaults: histogram observer, Python wrapper, no bf16; then the same with
        the most sensitive layer in FP32 (`Dimensions.fallback_seed`)."""
        name = self.kind.name
        seed = {**dims.recipe_param(name), **dims.inductor_lowering_seed(name), **dims.ranges_seed(name, f"{name}:"),
                **dims.recovery_seed(f"{name}:", self.kind.fields), f"{name}:calib_samples": dims.arms.checkpoints[-1],
                f"{name}:n_fallback": 0}
        return [seed, *dims.fallback_seed(seed, name, f"{name}:")]

    def sweep(self, seed: dict, dims: Dimensions) -> list[dict]:
        """The other lowering options and int8 ranges, then the other observers, then bias correction."""
        name = self.kind.name
        variants = (dims.inductor_lowering_variants(seed, name) + dims.observer_variants(seed, f"{name}:")
                    + dims.recovery_variants(seed, f"{name}:", self.kind.fields))
        return [params for params in unique(variants) if params != seed]


class Pt2eDynamicRecipe(_PostTraining):
    """'pt2e-dynamic': X86InductorQuantizer's dynamic config (activation ranges per call), lowered by Inductor."""

    kind = RECIPE_KINDS["pt2e-dynamic"]

    def unavailable(self, capture: Capture, built: Mapping[str, Builder], skipped: Mapping[str, str],
                    auto: bool) -> str | None:
        if not auto:
            return None
        return skipped.get("pt2e-static") or auto_skip_reason(capture.model, built)

    def suggest(self, trial: optuna.Trial, dims: Dimensions) -> QuantPlan:
        name = self.kind.name
        lowering = dims.inductor_lowering(trial, name)
        return QuantPlan(recipe=name, fp32_layers=dims.fallbacks(trial, name, f"{name}:"), **lowering)

    def seeds(self, dims: Dimensions) -> list[dict]:
        name = self.kind.name
        return [{**dims.recipe_param(name), **dims.inductor_lowering_seed(name), f"{name}:n_fallback": 0}]

    def sweep(self, seed: dict, dims: Dimensions) -> list[dict]:
        return [params for params in unique(dims.inductor_lowering_variants(seed, self.kind.name)) if params != seed]
