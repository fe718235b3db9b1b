"""A new recipe is one module and its registration: the search proposes it, tunes it, and quantize builds it."""

import copy

import pytest
import torch
from torch import nn

import autoq
from autoq.config import SearchSpace
from autoq.plan import QuantPlan, RecipeKind
from autoq.recipes.arms import applicable_arms
from autoq.recipes.recipe import Recipe
from autoq.recipes.registry import RECIPES, register, registered
from autoq.recipes.sensitivity import single_layer_sensitivity

from conftest import fast_settings

TOY = "rounded-weights"


class RoundedWeights:
    """Linear weights rounded to the int8 grid per output channel; everything computes in FP32."""

    def __init__(self, model: nn.Module, example_inputs: tuple) -> None:
        self.example_inputs = example_inputs
        self._model = copy.deepcopy(model).eval()
        self.layers = [name for name, module in self._model.named_modules() if isinstance(module, nn.Linear)]

    def build(self, plan: QuantPlan, layers: list[str] | None = None) -> nn.Module:
        model = copy.deepcopy(self._model)
        for name in layers if layers is not None else [n for n in self.layers if n not in plan.fp32_layers]:
            weight = model.get_submodule(name).weight
            scale = weight.detach().abs().amax(1, keepdim=True) / 127
            weight.data = torch.round(weight.detach() / scale) * scale
        return model


class RoundedWeightsRecipe(Recipe):
    kind = RecipeKind(TOY)

    def builder(self, capture, twin=None):
        return RoundedWeights(capture.model, capture.example_inputs)

    def sensitivity(self, builder, fp32_model, batches, arms):
        return single_layer_sensitivity(lambda layer: builder.build(QuantPlan(recipe=TOY), [layer]), builder.layers,
                                        fp32_model, batches)

    def suggest(self, trial, dims):
        return QuantPlan(recipe=TOY, fp32_layers=dims.fallbacks(trial, TOY, f"{TOY}:"))

    def seeds(self, dims):
        return [{**dims.recipe_param(TOY), f"{TOY}:n_fallback": 0}]


@pytest.fixture(scope="module")
def mlp(digits):
    torch.manual_seed(0)
    return digits.train(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), epochs=40)


def test_a_registered_recipe_is_searched_tuned_and_built(digits, mlp, tmp_path):
    with registered(RoundedWeightsRecipe()):
        result = autoq.tune(mlp, digits.x[:1], digits.calib, digits.accuracy, space={"recipes": [TOY]}, n_trials=4,
                            **fast_settings(tmp_path))
        assert QuantPlan.from_dict(result.plan).recipe == TOY
        assert result.trials[0]["params"] == {f"{TOY}:n_fallback": 0}  # its seed comes first
        assert {QuantPlan.from_dict(row["plan"]).recipe for row in result.trials} == {TOY}
        assert result.feasible and result.model(digits.x[:4]).shape == (4, 10)
        built = autoq.quantize(mlp, QuantPlan(recipe=TOY, fp32_layers=["1"]), digits.x[:1], digits.calib)
        assert torch.equal(built.get_submodule("1").weight, mlp.get_submodule("1").weight)  # its fallback
        assert not torch.equal(built.get_submodule("3").weight, mlp.get_submodule("3").weight)
        auto = applicable_arms(mlp, (digits.x[:1],), [(b,) for b in digits.calib], ["auto"])
        assert TOY in auto.recipes  # 'auto' searches every registered recipe that applies
    assert TOY not in RECIPES  # the registration ends with the block
    with pytest.raises(ValueError, match="recipe"):
        QuantPlan(recipe=TOY)
    with pytest.raises(ValueError, match="recipes"):
        SearchSpace(recipes=[TOY])


def test_registration_refuses_clashes_and_orphan_fine_tunes():
    with pytest.raises(ValueError, match="registered already"):
        register(RECIPES["static"])

    class Orphan(RoundedWeightsRecipe):
        kind = RecipeKind("orphan-qat", fine_tunes="no-such-recipe")

    with pytest.raises(ValueError, match="twin 'no-such-recipe' first"):
        register(Orphan())
    assert "orphan-qat" not in RECIPES
