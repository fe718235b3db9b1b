"""The recipes that apply to a model (the search's arms), each with its builder, built once per run.

'auto' picks by layer types: static (FX graph, calibrated activations) whenever the model can be
captured; dynamic (Linear/LSTM/GRU weights int8, activations quantized per call) when the model
has such layers and either no convolutions (transformers, MLPs), recurrent layers (which static
leaves in FP32), or no graph capture. Conv nets get static only: there dynamic would quantize a
head and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from autoq.capture import TraceError
from autoq.plan import QuantPlan
from autoq.recipes.dynamic import DynamicBuilder, dynamic_layers
from autoq.recipes.static import StaticBuilder

AUTO = "auto"
RECIPE_CHOICES = (AUTO, "static", "dynamic")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RECURRENT = (nn.LSTM, nn.GRU)


class Arms:
    """Builders of the recipes a run searches, by recipe name, and their layers' sensitivity ranking."""

    def __init__(self, builders: dict[str, StaticBuilder | DynamicBuilder], skipped: dict[str, str]) -> None:
        self.builders, self.skipped = builders, skipped
        self.rankings: dict[str, list[str]] = {}  # recipe -> layers, most sensitive first
        self.example_inputs = next(iter(builders.values())).example_inputs
        static = builders.get("static")
        self.checkpoints: list[int] = list(static.checkpoints) if static else []
        self.has_relu6 = bool(static and static.has_relu6)

    @property
    def recipes(self) -> list[str]:
        return list(self.builders)

    def layers(self, recipe: str) -> list[str]:
        return list(self.builders[recipe].layers)

    def build(self, plan: QuantPlan) -> nn.Module:
        """The int8 model of `plan`, by its recipe's builder."""
        if plan.recipe not in self.builders:
            raise ValueError(f"recipe {plan.recipe!r} is not searched in this run (searched: {self.recipes}).")
        return self.builders[plan.recipe].build(plan)


def applicable_arms(model: nn.Module, example_inputs: tuple, batches: Sequence[tuple], recipes: Sequence[str],
                    non_traceable_modules: Sequence[str] = (),
                    progress: Callable[[int], None] | None = None) -> Arms:
    """The arms `recipes` asks for (('auto',): those that apply, see the module docstring).

    A recipe asked for by name that cannot apply is an error; under 'auto' it is skipped, with the
    reason in `Arms.skipped`.
    """
    auto = tuple(recipes) == (AUTO,)
    builders: dict[str, StaticBuilder | DynamicBuilder] = {}
    skipped: dict[str, str] = {}
    if auto or "static" in recipes:
        try:
            builders["static"] = StaticBuilder(model, example_inputs, batches,
                                               non_traceable_modules=non_traceable_modules, progress=progress)
        except TraceError as error:
            if not auto:
                raise
            skipped["static"] = str(error)
    modules = list(model.modules())
    if auto:
        has_dynamic_layers = bool(dynamic_layers(model))
        wants_dynamic = ("static" not in builders or any(isinstance(m, _RECURRENT) for m in modules)
                         or not any(isinstance(m, _CONVS) for m in modules))
        if not has_dynamic_layers:
            skipped["dynamic"] = "no Linear, LSTM or GRU modules"
        elif not wants_dynamic:
            skipped["dynamic"] = "a conv net: dynamic quantization would only cover its Linear layers"
        else:
            builders["dynamic"] = DynamicBuilder(model, example_inputs)
    elif "dynamic" in recipes:
        builders["dynamic"] = DynamicBuilder(model, example_inputs)
    if not builders:
        raise ValueError(f"no quantization recipe applies to this model: {skipped}")
    return Arms(builders, skipped)
