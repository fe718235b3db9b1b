"""The recipes autoq knows, by name, in the order arms are built (a fine-tune's twin before it).

A new recipe is one module (its `RecipeKind`, builder and `autoq.recipes.recipe.Recipe`) and one
`register` call; `registered` does the same for the length of a `with` block (tests, plugins).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from autoq.plan import RECIPE_KINDS
from autoq.recipes.dynamic import DynamicRecipe
from autoq.recipes.floating import FloatRecipe
from autoq.recipes.pt2e import Pt2eDynamicRecipe, Pt2eStaticRecipe
from autoq.recipes.qat import Pt2eQatRecipe, QatRecipe
from autoq.recipes.recipe import Recipe
from autoq.recipes.static import StaticRecipe

RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Make `recipe` searchable, buildable and loadable under `recipe.kind.name`."""
    kind = recipe.kind
    if kind.name in RECIPES:
        raise ValueError(f"a recipe named {kind.name!r} is registered already.")
    if RECIPE_KINDS.get(kind.name, kind) != kind:
        raise ValueError(f"recipe {kind.name!r} is built in with another description: {RECIPE_KINDS[kind.name]}.")
    if kind.fine_tunes is not None and kind.fine_tunes not in RECIPES:
        raise ValueError(f"register {kind.name!r}'s post-training twin {kind.fine_tunes!r} first.")
    RECIPES[kind.name] = recipe
    RECIPE_KINDS[kind.name] = kind
    return recipe


@contextlib.contextmanager
def registered(recipe: Recipe) -> Iterator[Recipe]:
    """`register(recipe)` for the length of the block."""
    name = recipe.kind.name
    builtin = name in RECIPE_KINDS
    register(recipe)
    try:
        yield recipe
    finally:
        del RECIPES[name]
        if not builtin:
            del RECIPE_KINDS[name]


for _recipe in (StaticRecipe(), Pt2eStaticRecipe(), QatRecipe(), Pt2eQatRecipe(), DynamicRecipe(), Pt2eDynamicRecipe(),
                FloatRecipe("fp32"), FloatRecipe("bf16")):
    register(_recipe)
