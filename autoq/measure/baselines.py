"""Reference methods that autoq is compared against, built exactly as their users would."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from autoq.recipes.engine import quantized_engine


@torch.no_grad()
def default_fx_ptq(model: torch.nn.Module, example_inputs: tuple, calib_batches: Iterable[tuple],
                   engine: str = "x86") -> torch.fx.GraphModule:
    """PyTorch's untuned FX post-training quantization: default qconfig mapping, calibrate, convert."""
    with warnings.catch_warnings(), quantized_engine(engine):
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(engine), example_inputs)
        for batch in calib_batches:
            prepared(*batch)
        return convert_fx(prepared)
