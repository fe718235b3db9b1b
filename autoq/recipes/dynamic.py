"""Dynamic quantization: int8 weights, activations quantized per call at run time (no calibration).

Eager mode (`torch.ao.quantization.quantize_dynamic`), so it needs no graph capture: any model
with Linear, LSTM or GRU modules works, traceable or not. The plan's FP32 fallbacks are module
names; its weight granularity applies to Linear (LSTM/GRU weights are always per tensor, the
only kind PyTorch's dynamic RNN kernels take).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

from autoq.capture import use_base_layer_classes
from autoq.dispatch.engine import quantized_engine
from autoq.dispatch.layers import set_layer_engines
from autoq.plan import INDUCTOR, RECIPE_KINDS, QuantPlan
from autoq.recipes.dimensions import closest
from autoq.recipes.recipe import Builder, Capture, Recipe
from autoq.recipes.sensitivity import single_layer_sensitivity

if TYPE_CHECKING:
    import optuna

    from autoq.recipes.arms import Arms
    from autoq.recipes.dimensions import Dimensions

DYNAMIC_LAYER_TYPES = (nn.Linear, nn.LSTM, nn.GRU)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RECURRENT = (nn.LSTM, nn.GRU)
_QCONFIGS = {"per_channel": per_channel_dynamic_qconfig, "per_tensor": default_dynamic_qconfig}


def dynamic_layers(model: nn.Module) -> list[str]:
    """Names of the modules dynamic quantization converts (Linear, LSTM, GRU and their subclasses)."""
    return [name for name, module in model.named_modules() if name and isinstance(module, DYNAMIC_LAYER_TYPES)]


class DynamicBuilder:
    """`build(plan)` returns `model` with its Linear/LSTM/GRU modules dynamically quantized per the plan."""

    recipe = "dynamic"

    def __init__(self, model: nn.Module, example_inputs: tuple) -> None:
        self.example_inputs = example_inputs
        self._model = copy.deepcopy(model).eval()
        use_base_layer_classes(self._model, DYNAMIC_LAYER_TYPES)  # quantize_dynamic maps exact classes only
        self.layers = dynamic_layers(self._model)
        if not self.layers:
            raise ValueError("dynamic quantization needs Linear, LSTM or GRU modules; this model has none.")

    def qconfig_spec(self, plan: QuantPlan, layers: Sequence[str] | None = None) -> dict[str, object]:
        """{module name: qconfig} of the layers `plan` quantizes (or of `layers`, if given)."""
        chosen = [name for name in self.layers if name not in plan.fp32_layers] if layers is None else layers
        modules = dict(self._model.named_modules())
        return {name: (_QCONFIGS[plan.weight_granularity] if isinstance(modules[name], nn.Linear)
                       else default_dynamic_qconfig) for name in chosen}

    def build(self, plan: QuantPlan, layers: Sequence[str] | None = None) -> nn.Module:
        """The int8 model of `plan` (a copy; the builder's model is untouched)."""
        unknown = set(plan.fp32_layers) - set(self.layers)
        if unknown:
            raise ValueError(f"fp32_layers names {sorted(unknown)}, which are not Linear/LSTM/GRU modules of this "
                             f"model. Known layers: {self.layers}")
        with warnings.catch_warnings(), quantized_engine(plan.engine):
            warnings.simplefilter("ignore")
            model = quantize_dynamic(self._model, qconfig_spec=self.qconfig_spec(plan, layers), inplace=False)
        set_layer_engines(model, plan.layer_engines)
        return model


def auto_skip_reason(model: nn.Module, built: Mapping[str, Builder]) -> str | None:
    """Why recipes=['auto'] leaves a dynamic recipe out for `model`: dynamic quantization is searched
    when the model has Linear/LSTM/GRU layers and either no convolutions (transformers, MLPs),
    recurrent layers (which static leaves in FP32), or no FX static capture ('static' not built).
    In a conv net it would quantize a head and nothing else."""
    modules = list(model.modules())
    if not dynamic_layers(model):
        return "no Linear, LSTM or GRU modules"
    if ("static" in built and not any(isinstance(m, _RECURRENT) for m in modules)
            and any(isinstance(m, _CONVS) for m in modules)):
        return "a conv net: dynamic quantization would only cover its Linear layers"
    return None


class DynamicRecipe(Recipe):
    """'dynamic': `quantize_dynamic`; searches fallbacks, kernels and weight granularity."""

    kind = RECIPE_KINDS["dynamic"]

    def unavailable(self, capture: Capture, built: Mapping[str, Builder], skipped: Mapping[str, str],
                    auto: bool) -> str | None:
        return auto_skip_reason(capture.model, built) if auto else None

    def builder(self, capture: Capture, twin: Builder | None = None) -> DynamicBuilder:
        return DynamicBuilder(capture.model, capture.example_inputs)

    def sensitivity(self, builder: DynamicBuilder, fp32_model: nn.Module, batches: Sequence[tuple],
                    arms: Arms) -> dict[str, float]:
        """Each layer alone on real int8 kernels (7-bit activations where the Inductor recipes need them)."""
        plan = QuantPlan(recipe="dynamic", reduce_range=not arms.full_range_safe(INDUCTOR))
        return single_layer_sensitivity(lambda layer: builder.build(plan, layers=[layer]), builder.layers,
                                        fp32_model, batches)

    def suggest(self, trial: optuna.Trial, dims: Dimensions) -> QuantPlan:
        return QuantPlan(**dims.fallbacks_kernels_weights(trial, "dynamic"))

    def seeds(self, dims: Dimensions) -> list[dict]:
        """`quantize_dynamic`'s default (per-tensor weights) on each allowed kernel choice."""
        granularity = closest("per_tensor", dims.space.weight_granularities)
        return [{**dims.recipe_param("dynamic"), "dynamic:n_fallback": 0, "engine": engine,
                 "dynamic:weight_granularity": granularity} for engine in dims.seed_kernels()]

    def sweep(self, seed: dict, dims: Dimensions) -> list[dict]:
        """The seed's other weight granularities."""
        return [{**seed, "dynamic:weight_granularity": granularity} for granularity in dims.space.weight_granularities
                if granularity != seed["dynamic:weight_granularity"]]
