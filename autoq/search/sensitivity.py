"""Rank layers by how much quantizing each one alone hurts the model's output."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from autoq.plan import QuantPlan
from autoq.recipes.static import StaticBuilder


def output_tensors(output: object) -> list[torch.Tensor]:
    """Floating-point tensors of a (nested) model output, in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output.detach().float()] if output.is_floating_point() else []
    if isinstance(output, dict):
        return [t for key in sorted(output, key=str) for t in output_tensors(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    return []


def sqnr_db(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> float:
    """Signal-to-quantization-noise ratio in dB over all tensors (inf when identical)."""
    signal = sum(float(r.pow(2).sum()) for r in reference)
    noise = sum(float((r - c).pow(2).sum()) for r, c in zip(reference, candidate))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


@torch.no_grad()
def layer_sensitivity(
    builder: StaticBuilder,
    fp32_model: torch.nn.Module,
    batches: Sequence[tuple],
    plan: QuantPlan,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """{layer: output SQNR in dB when only that layer is quantized with `plan`}; lower is more sensitive."""
    reference = [output_tensors(fp32_model(*batch)) for batch in batches]
    scores = {}
    for index, layer in enumerate(builder.layers):
        others = [name for name in builder.layers if name != layer]
        model = builder.build(dataclasses.replace(plan, fp32_layers=others, layer_observers={}))
        candidate = [output_tensors(model(*batch)) for batch in batches]
        scores[layer] = sqnr_db([t for ts in reference for t in ts], [t for ts in candidate for t in ts])
        if progress:
            progress(index + 1, len(builder.layers))
    return scores


def rank_layers(scores: dict[str, float]) -> list[str]:
    """Layers ordered most sensitive (lowest SQNR) first."""
    return sorted(scores, key=lambda layer: scores[layer])
