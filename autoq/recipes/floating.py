"""The float recipes: the model kept in FP32 or bf16, rewritten and lowered, as candidates of the search.

An int8 plan is worth returning only if it is faster than what the user gets without quantizing: the
FP32 model with BatchNorm folded, in channels_last and compiled (`autoq.measure.fp32.best_float`), or
the same under bf16 autocast on CPUs that compute bf16 natively (AVX512-BF16 or AMX). These recipes
put those models in the study beside the int8 plans, judged and timed the same way, so the result is
the fastest in-budget deployment whatever its precision. They have no layers to rank and nothing to
search but the rewrite (`QuantPlan.rewrite`: none, folded, compiled): their seeds are all their plans.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn

from autoq.measure.fp32 import FloatBuilds
from autoq.plan import RECIPE_KINDS, QuantPlan
from autoq.recipes.pt2e import bf16_supported
from autoq.recipes.recipe import Builder, Capture, Recipe

if TYPE_CHECKING:
    import optuna

    from autoq.recipes.arms import Arms
    from autoq.recipes.dimensions import Dimensions


class FloatBuilder:
    """`build(plan)`: the model in the recipe's precision, rewritten per the plan (built once each)."""

    def __init__(self, builds: FloatBuilds, precision: str) -> None:
        self.builds, self.precision = builds, precision
        self.example_inputs = builds.example_inputs
        self.layers: list[str] = []  # nothing is quantized

    def build(self, plan: QuantPlan) -> nn.Module:
        return self.builds.get(self.precision, plan.rewrite).model


class FloatRecipe(Recipe):
    """The 'fp32' or 'bf16' recipe."""

    def __init__(self, precision: str) -> None:
        self.kind = RECIPE_KINDS[precision]

    def unavailable(self, capture: Capture, built: Mapping[str, Builder], skipped: Mapping[str, str],
                    auto: bool) -> str | None:
        if self.kind.precision == "bf16" and auto and not bf16_supported():
            return ("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 would be emulated, slower than FP32 "
                    "(ask for recipe 'bf16' by name to measure it anyway)")
        return None

    def builder(self, capture: Capture, twin: Builder | None = None) -> FloatBuilder:
        return FloatBuilder(FloatBuilds(capture.model, capture.example_inputs), self.kind.precision)

    def sensitivity(self, builder: Builder, fp32_model: nn.Module, batches: Sequence[tuple],
                    arms: Arms) -> dict[str, float]:
        return {}

    def suggest(self, trial: optuna.Trial, dims: Dimensions) -> QuantPlan:
        name = self.kind.name
        return QuantPlan(recipe=name, rewrite=trial.suggest_categorical(f"{name}:rewrite", dims.float_rewrites))

    def seeds(self, dims: Dimensions) -> list[dict]:
        """Every plan of the recipe, the likely fastest first (compiled, if allowed; folded; as given)."""
        name = self.kind.name
        return [{**dims.recipe_param(name), f"{name}:rewrite": rewrite} for rewrite in reversed(dims.float_rewrites)]

    def rebuilt(self, builder: Builder, plan: QuantPlan, fill: Callable[[nn.Module], None]) -> nn.Module:
        """The plan's model of the FP32 model it is rebuilt on: a model file holds no numbers for it (the
        outputs recorded at save time still check that the FP32 model is the one it was tuned from)."""
        return builder.build(plan)
