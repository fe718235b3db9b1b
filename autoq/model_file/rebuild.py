"""An int8 model rebuilt from code (the user's FP32 model + the plan) and the numbers a file holds.

The structure comes from the recipe that built the model, run again on synthetic inputs of the
recorded shapes (calibration and fine-tuning are skipped: their results are the file's numbers);
`autoq.model_file.state.restore` then puts the stored numbers in, and the rebuilt model must
reproduce the outputs recorded at save time on the same synthetic inputs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autoq.measure.outputs import float_outputs
from autoq.plan import QuantPlan, recipe_kind
from autoq.recipes.arms import builder
from autoq.recipes.qat import Training
from autoq.recipes.registry import RECIPES
from autoq.model_file.state import MismatchError, restore

CHECK_SEED = 0
# relative RMS difference of the rebuilt model's outputs from the recorded ones: up to a few int8 rounding
# ties flipped by FP32 parts summing in another order (thread count), or by another CPU's int8 kernels
TOLERANCE = 1e-3
OTHER_CPU_TOLERANCE = 5e-2


def synthetic_inputs(specs: Sequence[Mapping], seed: int = CHECK_SEED) -> tuple[torch.Tensor, ...]:
    """Inputs of the recorded shapes and dtypes: standard normal floats, integers uniform in the recorded
    [low, high] (token ids, masks), the same for the same seed on every machine."""
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for spec in specs:
        dtype, shape = getattr(torch, spec["dtype"]), tuple(spec["shape"])
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            low, high = int(spec.get("low", 0)), int(spec.get("high", 1))
            inputs.append(torch.randint(low, high + 1, shape, generator=generator).to(dtype))
    return tuple(inputs)


def rebuild(fp32_model: nn.Module, plan: QuantPlan, inputs: tuple, tensors: Mapping[str, torch.Tensor],
            layout: Mapping, non_traceable_modules: Sequence[str] = ()) -> nn.Module:
    """The int8 model of `plan` for `fp32_model`, holding the stored numbers (see the module docstring).

    Raises MismatchError if `fp32_model` is not the architecture the numbers belong to."""
    training = Training(train_fn=lambda model, epochs, lr: None)  # the file holds the fine-tuned numbers
    kind = recipe_kind(plan.recipe)
    batches = [inputs] if kind.calibrated or kind.fine_tunes else []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arm = builder(plan.recipe, fp32_model, inputs, batches, list(non_traceable_modules), training=training)
            return RECIPES[plan.recipe].rebuilt(arm, plan, lambda model: restore(model, tensors, layout))
    except MismatchError:
        raise
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError) as error:
        raise MismatchError(f"the plan could not be rebuilt on this model ({type(error).__name__}: "
                            f"{str(error)[:300]})") from error


def output_difference(expected: Sequence[torch.Tensor], output: object) -> float:
    """Relative RMS difference of `output`'s float tensors from `expected` (inf if their shapes differ)."""
    actual = float_outputs(output)
    if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        return math.inf
    if not expected:
        return 0.0
    error = sum(float(((a - e) ** 2).sum()) for a, e in zip(actual, expected))
    scale = sum(float((e**2).sum()) for e in expected)
    return math.sqrt(error / max(scale, 1e-30))
