"""The search space: turns an Optuna trial into a QuantPlan, and proposes the trials tried first.

With several recipes a trial first picks one ('recipe'); the recipe then suggests its plan
(`autoq.recipes.recipe.Recipe.suggest`, from the dimensions in `autoq.recipes.dimensions`).
"""

from __future__ import annotations

from collections.abc import Mapping

import optuna

from autoq.config import SearchSpace
from autoq.plan import RECIPE_KINDS, QuantPlan
from autoq.recipes.arms import Arms
from autoq.recipes.dimensions import Dimensions
from autoq.recipes.registry import RECIPES


class PlanProposer:
    """The search's side of a SearchSpace for one run: plans for Optuna trials, and the seeds and sweeps
    it enqueues. rankings: per recipe, its layers most sensitive first (the order fallbacks take)."""

    def __init__(self, space: SearchSpace, arms: Arms, rankings: Mapping[str, list[str]],
                 compile_float: bool = True) -> None:
        self.dims = Dimensions(space, arms, rankings, compile_float)

    def suggest(self, trial: optuna.Trial) -> QuantPlan:
        """The plan for this trial. A 'measured' kernel choice returns a plan with dispatch='measured' and
        no layer_engines yet: the objective times the layers of the built candidate to fill them."""
        recipes = self.dims.arms.recipes
        recipe = trial.suggest_categorical("recipe", recipes) if len(recipes) > 1 else recipes[0]
        return RECIPES[recipe].suggest(trial, self.dims)

    def seed_params(self) -> list[dict]:
        """Trial parameters of the float candidates first (cheap, and the bar: int8 plans measurably slower
        than an in-budget one are not evaluated, see TuneConfig.prune_slower); then of PyTorch's default
        recipes on each allowed engine, x86 first: of each post-training recipe searched, in the arms'
        order, grouped by kernel choice ('measured' last); then the Inductor recipes' (which have no
        kernel choice); then each recipe's default with its most sensitive layer in FP32."""
        seeds = [(recipe, seed) for recipe in self.recipes(fine_tuning=False) for seed in RECIPES[recipe].seeds(self.dims)]
        engines = self.dims.seed_kernels()

        def order(item: tuple[str, dict]) -> tuple[bool, bool, int]:
            recipe, seed = item
            with_fallback = any(name.endswith("n_fallback") and value for name, value in seed.items())
            return (RECIPE_KINDS[recipe].precision == "int8", with_fallback,
                    engines.index(seed["engine"]) if "engine" in seed else len(engines))

        return [seed for _, seed in sorted(seeds, key=order)]

    def qat_seeds(self) -> list[dict]:
        """Trial parameters of each fine-tuning recipe searched: queued only when post-training seeds miss
        the budget (autoq.search.policy)."""
        return [seed for recipe in self.recipes(fine_tuning=True) for seed in RECIPES[recipe].seeds(self.dims)]

    def sweep_params(self, recipe: str, seed: dict) -> list[dict]:
        """Variations of `recipe`'s best seed (its observers, lowering options, granularities: see each
        recipe's `sweep`). Run right after the seeds, they give the sampler an informed start on the
        dimensions that matter most for accuracy before it spends trials on fallbacks and per-layer choices."""
        return RECIPES[recipe].sweep(seed, self.dims)

    def recipes(self, fine_tuning: bool) -> list[str]:
        """The searched recipes that fine-tune (the recovery arms), or those that do not, in the arms' order."""
        return [recipe for recipe in self.dims.arms.recipes
                if (RECIPE_KINDS[recipe].fine_tunes is not None) == fine_tuning]
