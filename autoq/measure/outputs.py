"""A model's floating-point outputs, and how far apart two sets of them are."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils import _pytree as pytree


def float_outputs(output: object) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (nested tuples, lists, dicts), in a fixed order."""
    return [leaf.detach().float() for leaf in pytree.tree_leaves(output)
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


def sqnr_db(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> float:
    """Signal-to-quantization-noise ratio in dB over all tensors (inf when identical)."""
    signal = sum(float(r.pow(2).sum()) for r in reference)
    noise = sum(float((r - c).pow(2).sum()) for r, c in zip(reference, candidate))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)
