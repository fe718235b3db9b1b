"""The recipes that apply to a model (the search's arms), each with its builder, built once per run.

'auto' searches every registered recipe that applies (see each recipe's `unavailable`): FX static
whenever the model can be captured; dynamic (Linear/LSTM/GRU weights int8, activations quantized
per call) when the model has such layers and either no convolutions (transformers, MLPs),
recurrent layers (which static leaves in FP32), or no graph capture; the PT2E + Inductor twins of
both whenever torch.export can capture the model; the fine-tuning recipes ('qat',
'pt2e-qat') when the user gives training data and their post-training twin applies: these are
the recovery arms, tried only if post-training seeds miss the budget (see `autoq.search.policy`);
and the float recipes ('fp32' always, 'bf16' on CPUs with native bf16) that int8 has to beat
(`autoq.recipes.floating`). `precisions` keeps only the recipes of the precisions it names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from autoq.capture import TraceError
from autoq.dispatch.apply import carrying_plan
from autoq.dispatch.isa import KERNEL_KINDS, Int8Path, int8_path, module_kinds
from autoq.plan import AUTO, PRECISIONS, RECIPE_KINDS, QuantPlan, recipe_kind
from autoq.recipes.openvino_lowering import openvino_available
from autoq.recipes.pt2e import bf16_supported
from autoq.recipes.qat import Training
from autoq.recipes.recipe import Builder, Capture
from autoq.recipes.registry import RECIPES


class Arms:
    """Builders of the recipes a run searches, by recipe name, and what the search needs to know of the model."""

    def __init__(self, builders: dict[str, Builder], skipped: dict[str, str], module_kinds: dict[str, str]) -> None:
        """module_kinds: the kernel kind of the model's conv/linear modules by name
        (autoq.dispatch.isa.module_kinds)."""
        self.builders, self.skipped = builders, skipped
        self.int8: Int8Path = int8_path()  # this CPU's int8 path
        self._module_kinds = module_kinds
        self.kinds = frozenset(kind for builder in builders.values() for layer in builder.layers
                               for kind in self.layer_kinds(layer))
        self.example_inputs = next(iter(builders.values())).example_inputs
        static = builders.get("static")
        # calibration sample counts where statistics were snapshotted (same for every calibrated arm)
        self.checkpoints: list[int] = next((list(b.checkpoints) for b in builders.values()
                                            if getattr(b, "checkpoints", None)), [])
        self.has_relu6 = bool(static and static.has_relu6)
        self.bf16 = any(RECIPE_KINDS[recipe].inductor for recipe in builders) and bf16_supported()
        self.openvino = openvino_available()  # PT2E static graphs may also be lowered by OpenVINO

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
        return carrying_plan(self.builders[plan.recipe].build(plan), plan)


def builder(recipe: str, model: nn.Module, example_inputs: tuple, batches: Sequence[tuple],
            non_traceable_modules: Sequence[str] = (), progress: Callable[[int], None] | None = None,
            training: Training | None = None) -> Builder:
    """The builder of `recipe` for `model` (captures, and for calibrated recipes calibrates, once);
    the fine-tuning recipes need `training`."""
    kind = recipe_kind(recipe)
    capture = Capture(model, example_inputs, batches, non_traceable_modules, progress, training)
    reason = RECIPES[recipe].unavailable(capture, {}, {}, auto=False)
    if reason:
        raise ValueError(reason)
    twin = builder(kind.fine_tunes, model, example_inputs, batches, non_traceable_modules, progress) \
        if kind.fine_tunes else None
    return RECIPES[recipe].builder(capture, twin)


def calibrated(recipes: Sequence[str]) -> int:
    """How many of `recipes` calibrate (two passes over the calibration batches each)."""
    return sum(RECIPE_KINDS[recipe].calibrated for recipe in (RECIPES if tuple(recipes) == (AUTO,) else recipes))


def applicable_arms(model: nn.Module, example_inputs: tuple, batches: Sequence[tuple], recipes: Sequence[str],
                    non_traceable_modules: Sequence[str] = (),
                    progress: Callable[[int], None] | None = None, training: Training | None = None,
                    precisions: Sequence[str] = PRECISIONS) -> Arms:
    """The arms `recipes` asks for (('auto',): those that apply, see the module docstring) of `precisions`.

    A recipe asked for by name that cannot apply is an error; under 'auto' it is skipped, with the
    reason in `Arms.skipped`. The twin of a fine-tuning recipe asked for by name is built for its
    capture and layers but not searched.
    """
    auto = tuple(recipes) == (AUTO,)
    capture = Capture(model, example_inputs, batches, non_traceable_modules, progress, training)
    wanted = [name for name in RECIPES if (auto or name in recipes) and RECIPE_KINDS[name].precision in precisions]
    twins = {RECIPE_KINDS[name].fine_tunes for name in wanted if training is not None} - {None}
    builders: dict[str, Builder] = {}
    skipped: dict[str, str] = {}
    for name, recipe in RECIPES.items():  # a fine-tune's twin comes before it
        if name not in wanted and name not in twins:
            continue
        reason = recipe.unavailable(capture, builders, skipped, auto)
        if reason:
            if not auto:
                raise ValueError(reason)
            skipped[name] = reason
            continue
        try:
            builders[name] = recipe.builder(capture, builders.get(RECIPE_KINDS[name].fine_tunes))
        except TraceError as error:  # (a fine-tune exports in training mode, which can fail where eval mode did not)
            if not auto:
                raise
            skipped[name] = str(error)
    for twin in twins - set(wanted):
        del builders[twin]  # built only for its fine-tuning recipe's capture and layers
    if not builders or (auto and "int8" in precisions and all(RECIPE_KINDS[name].precision != "int8"
                                                               for name in builders)):
        raise ValueError(f"no quantization recipe applies to this model: {skipped}")
    return Arms(builders, skipped, module_kinds(model))
