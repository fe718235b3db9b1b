"""Each recipe's layers ranked by sensitivity, computed once per study (stored in it, reused on resume)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import optuna
from torch import nn

from autoq.plan import RECIPE_KINDS
from autoq.recipes.arms import Arms
from autoq.recipes.registry import RECIPES
from autoq.search.study import SENSITIVITY_ATTR


def layer_scores(study: optuna.Study, arms: Arms, fp32_model: nn.Module, batches: Sequence[tuple], samples: int,
                 report: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """{recipe: {layer: output SQNR in dB when only that layer is int8}} on the first `samples`
    calibration samples; stored in the study, and read back from it when its layers are the same.
    A fine-tuning recipe ranks its layers as its post-training twin does."""
    stored = study.user_attrs.get(SENSITIVITY_ATTR) or {}
    scored, count = [], 0
    for batch in batches:
        scored.append(batch)
        count += int(batch[0].shape[0])
        if count >= samples:
            break
    scores: dict[str, dict[str, float]] = {}
    for recipe in arms.recipes:
        twin = RECIPE_KINDS[recipe].fine_tunes
        if isinstance(stored.get(recipe), dict) and set(stored[recipe]) == set(arms.layers(recipe)):
            scores[recipe] = {layer: float(value) for layer, value in stored[recipe].items()}
        elif twin in scores:
            scores[recipe] = scores[twin]
        else:
            report(f"ranking {len(arms.layers(recipe))} layers by output SQNR when quantized alone ({recipe})")
            scores[recipe] = RECIPES[recipe].sensitivity(arms.builders[recipe], fp32_model, scored, arms)
    study.set_user_attr(SENSITIVITY_ATTR, {recipe: {k: (v if math.isfinite(v) else 1e9) for k, v in s.items()}
                                           for recipe, s in scores.items()})
    return scores


def rank_layers(scores: dict[str, float]) -> list[str]:
    """Layers ordered most sensitive (lowest SQNR) first."""
    return sorted(scores, key=lambda layer: scores[layer])
