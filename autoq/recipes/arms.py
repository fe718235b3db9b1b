"""The recipes that apply to a model (the search's arms), each with its builder, built once per run.

'auto' picks by layer types: static (FX graph, calibrated activations) whenever the model can be
captured; dynamic (Linear/LSTM/GRU weights int8, activations quantized per call) when the model
has such layers and either no convolutions (transformers, MLPs), recurrent layers (which static
leaves in FP32), or no graph capture. Conv nets get static only: there dynamic would quantize a
head and nothing else. The PT2E + Inductor twins of both ('pt2e-static', 'pt2e-dynamic') are
searched under the same rule whenever torch.export can capture the model. QAT ('qat' on FX,
'pt2e-qat' on PT2E) is searched when the user gives training data and its post-training twin
('static', 'pt2e-static') applies: these are the recovery arms, tried only if post-training seeds
miss the budget (see `autoq.tuner`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from autoq.capture import TraceError
from autoq.dispatch.isa import KERNEL_KINDS, Int8Path, int8_path, module_kinds
from autoq.plan import AUTO, CALIBRATED_RECIPES, INDUCTOR_RECIPES, QAT_TWINS, RECIPES, QuantPlan
from autoq.recipes.dynamic import DynamicBuilder, dynamic_layers
from autoq.recipes.pt2e import Pt2eBuilder, bf16_supported
from autoq.recipes.qat import Pt2eQatBuilder, QatBuilder, Training
from autoq.recipes.static import StaticBuilder

Builder = StaticBuilder | DynamicBuilder | QatBuilder | Pt2eBuilder | Pt2eQatBuilder
_NO_TRAINING = "The '{}' recipe fine-tunes the model: pass train_data and loss_fn, or train_fn."
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RECURRENT = (nn.LSTM, nn.GRU)


class Arms:
    """Builders of the recipes a run searches, by recipe name, and their layers' sensitivity ranking."""

    def __init__(self, builders: dict[str, Builder], skipped: dict[str, str], module_kinds: dict[str, str]) -> None:
        """module_kinds: the kernel kind of the model's conv/linear modules by name
        (autoq.dispatch.isa.module_kinds)."""
        self.builders, self.skipped = builders, skipped
        self.int8: Int8Path = int8_path()  # this CPU's int8 path
        self._module_kinds = module_kinds
        self.kinds = frozenset(kind for builder in builders.values() for layer in builder.layers
                               for kind in self.layer_kinds(layer))
        self.rankings: dict[str, list[str]] = {}  # recipe -> layers, most sensitive first
        self.example_inputs = next(iter(builders.values())).example_inputs
        static = builders.get("static")
        # calibration sample counts where statistics were snapshotted (same for every calibrated arm)
        self.checkpoints: list[int] = next((list(b.checkpoints) for b in builders.values()
                                            if getattr(b, "checkpoints", None)), [])
        self.has_relu6 = bool(static and static.has_relu6)
        self.bf16 = any(recipe in INDUCTOR_RECIPES for recipe in builders) and bf16_supported()

    def layer_kinds(self, layer: str) -> tuple[str, ...]:
        """The kernel kind of a layer ('linear', 'conv' or 'depthwise'); every kind for a functional
        call, whose shape is not known here."""
        kind = self._module_kinds.get(layer)
        return (kind,) if kind else KERNEL_KINDS

    def full_range_safe(self, kernels: str) -> bool:
        """Whether this model's layers run exactly with 8-bit activations and weights under `kernels`
        (an engine, 'measured' or 'inductor') on this CPU: if not, a plan needs 7-bit activations
        (reduce_range) or 7-bit weights."""
        return self.int8.full_range_safe(kernels, self.kinds)

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


def builder(recipe: str, model: nn.Module, example_inputs: tuple, batches: Sequence[tuple],
            non_traceable_modules: Sequence[str] = (), progress: Callable[[int], None] | None = None,
            training: Training | None = None) -> Builder:
    """The builder of `recipe` for `model` (captures, and for calibrated recipes calibrates, once);
    the QAT recipes need `training`."""
    if recipe in QAT_TWINS:
        if training is None:
            raise ValueError(_NO_TRAINING.format(recipe))
        twin = builder(QAT_TWINS[recipe], model, example_inputs, batches, non_traceable_modules, progress)
        return fine_tuning(recipe, model, twin, training)
    if recipe == "static":
        return StaticBuilder(model, example_inputs, batches, non_traceable_modules=non_traceable_modules,
                             progress=progress)
    if recipe == "dynamic":
        return DynamicBuilder(model, example_inputs)
    return Pt2eBuilder(model, example_inputs, batches, recipe=recipe, progress=progress)


def fine_tuning(recipe: str, model: nn.Module, twin: StaticBuilder | Pt2eBuilder,
                training: Training) -> QatBuilder | Pt2eQatBuilder:
    """The builder of QAT `recipe`, sharing its post-training twin's capture and layers."""
    return QatBuilder(model, twin, training) if recipe == "qat" else Pt2eQatBuilder(model, twin, training)


def calibrated(recipes: Sequence[str]) -> int:
    """How many of `recipes` calibrate (two passes over the calibration batches each)."""
    return sum(recipe in CALIBRATED_RECIPES for recipe in (RECIPES if tuple(recipes) == (AUTO,) else recipes))


def applicable_arms(model: nn.Module, example_inputs: tuple, batches: Sequence[tuple], recipes: Sequence[str],
                    non_traceable_modules: Sequence[str] = (),
                    progress: Callable[[int], None] | None = None, training: Training | None = None) -> Arms:
    """The arms `recipes` asks for (('auto',): those that apply, see the module docstring).

    A recipe asked for by name that cannot apply is an error; under 'auto' it is skipped, with the
    reason in `Arms.skipped`.
    """
    auto = tuple(recipes) == (AUTO,)
    builders: dict[str, Builder] = {}
    skipped: dict[str, str] = {}
    twins_of_pinned_qat = {twin for recipe, twin in QAT_TWINS.items() if recipe in recipes and training is not None}
    for recipe in QAT_TWINS.values():  # static and pt2e-static: searched, or the twins of pinned QAT recipes
        if auto or recipe in recipes or recipe in twins_of_pinned_qat:
            try:
                builders[recipe] = builder(recipe, model, example_inputs, batches, non_traceable_modules, progress)
            except TraceError as error:
                if not auto:
                    raise
                skipped[recipe] = str(error)
    for recipe, twin in QAT_TWINS.items():
        if not (auto or recipe in recipes):
            continue
        if training is None:
            if not auto:
                raise ValueError(_NO_TRAINING.format(recipe))
            skipped[recipe] = "no training data (pass train_data and loss_fn, or train_fn)"
        elif twin in builders:
            try:
                builders[recipe] = fine_tuning(recipe, model, builders[twin], training)
            except TraceError as error:  # export in training mode can fail where export in eval mode did not
                if not auto:
                    raise
                skipped[recipe] = str(error)
        elif auto:
            skipped[recipe] = skipped[twin]
    for twin in QAT_TWINS.values():
        if twin in builders and not (auto or twin in recipes):
            del builders[twin]  # built only for its QAT recipe's layers
    modules = list(model.modules())
    for recipe, twin in (("dynamic", "static"), ("pt2e-dynamic", "pt2e-static")):
        if not auto:
            if recipe in recipes:
                builders[recipe] = builder(recipe, model, example_inputs, batches)
            continue
        if twin in skipped and recipe == "pt2e-dynamic":
            skipped[recipe] = skipped[twin]
        elif not dynamic_layers(model):
            skipped[recipe] = "no Linear, LSTM or GRU modules"
        elif not ("static" not in builders or any(isinstance(m, _RECURRENT) for m in modules)
                  or not any(isinstance(m, _CONVS) for m in modules)):
            skipped[recipe] = "a conv net: dynamic quantization would only cover its Linear layers"
        else:
            builders[recipe] = builder(recipe, model, example_inputs, batches)
    if not builders:
        raise ValueError(f"no quantization recipe applies to this model: {skipped}")
    return Arms(builders, skipped, module_kinds(model))
