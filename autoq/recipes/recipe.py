"""The Recipe protocol: all autoq knows about one way of turning an FP32 model into an int8 one.

A recipe is one module: a `RecipeKind` (the plan fields it reads and its traits, plain data in
`autoq.plan`), a builder (captures and calibrates once, then `build(plan)` per candidate), and a
`Recipe` subclass that says when it applies, how to rank its layers, which plans the search may
propose (its dimensions, seeds and sweeps) and how a saved model is rebuilt. Registering it
(`autoq.recipes.registry.register`) makes the search, `autoq.quantize` and `autoq.load` use it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from torch import nn

from autoq.dispatch.engine import quantized_engine
from autoq.dispatch.layers import set_layer_engines
from autoq.plan import QuantPlan, RecipeKind

if TYPE_CHECKING:
    import optuna

    from autoq.recipes.arms import Arms
    from autoq.recipes.dimensions import Dimensions
    from autoq.recipes.qat import Training


class Builder(Protocol):
    """Built once per run (capture, calibration); then one int8 model per plan."""

    layers: list[str]  # the quantizable layers, by the names plans use
    example_inputs: tuple

    def build(self, plan: QuantPlan) -> nn.Module: ...


@dataclass
class Capture:
    """What a builder starts from.

    progress: called with 1 after each calibration batch (two passes per calibrated recipe).
    training: what a fine-tuning recipe trains with (None: no fine-tuning recipe applies).
    """

    model: nn.Module
    example_inputs: tuple
    batches: Sequence[tuple]
    non_traceable_modules: Sequence[str] = ()
    progress: Callable[[int], None] | None = None
    training: Training | None = None


class Recipe(abc.ABC):
    """One recipe's behaviour; `kind` is its plain description (name, plan fields, traits)."""

    kind: RecipeKind

    def unavailable(self, capture: Capture, built: Mapping[str, Builder], skipped: Mapping[str, str],
                    auto: bool) -> str | None:
        """Why this recipe cannot (or, under recipes=['auto'], should not) be searched for `capture`,
        given the recipes registered before it (`built`, `skipped`: name -> why); None: it can.
        Asked for by name, a reason is an error; under 'auto' the recipe is skipped."""
        return None

    @abc.abstractmethod
    def builder(self, capture: Capture, twin: Builder | None = None) -> Builder:
        """Capture (and calibrate) once. twin: for a fine-tuning recipe, its post-training twin's builder.
        Raises autoq.capture.TraceError when the model cannot be captured this way."""

    @abc.abstractmethod
    def sensitivity(self, builder: Builder, fp32_model: nn.Module, batches: Sequence[tuple],
                    arms: Arms) -> dict[str, float]:
        """{layer: output SQNR in dB with only that layer int8}, to rank the layers for fallbacks."""

    @abc.abstractmethod
    def suggest(self, trial: optuna.Trial, dims: Dimensions) -> QuantPlan:
        """The plan of one trial; parameters other than the shared 'engine' are prefixed with the recipe
        name (but the FX static recipe's, for compatibility with stored studies)."""

    def seeds(self, dims: Dimensions) -> list[dict]:
        """Trial parameters of PyTorch's defaults for this recipe, tried first (fine-tuning recipes:
        queued only when post-training seeds miss the budget)."""
        return []

    def sweep(self, seed: dict, dims: Dimensions) -> list[dict]:
        """Variations of this recipe's best seed, queued right after the seeds."""
        return []

    def rebuilt(self, builder: Builder, plan: QuantPlan, fill: Callable[[nn.Module], None]) -> nn.Module:
        """The int8 model of `plan` with its numbers put in by `fill` (loading a saved model): eager
        recipes fill the built model, packing for the plan's engine, then set per-layer kernels."""
        model = builder.build(plan)
        with quantized_engine(plan.engine):  # layers the plan does not dispatch are packed as built
            fill(model)
        set_layer_engines(model, plan.layer_engines)
        return model
