"""autoq's version-1 model files: a torch.save zip with the int8 model pickled inside.

Unpickling runs whatever code the file names, so these load only when the caller trusts the file
(`autoq.load(path, trusted=True)`, CLI `--trusted`), with a warning; saving such a model again
writes the safe format. Kept for files written before the safe format; autoq no longer writes it.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings

import torch
from torch import nn

from autoq.dispatch.engine import quantized_engine
from autoq.dispatch.layers import set_layer_engines
from autoq.model_file.archive import FORMAT, LEGACY_VERSION
from autoq.plan import QuantPlan, recipe_kind
from autoq.recipes.pt2e import Lowered

def rebuild_module(cls: type, state: tuple) -> nn.Module:
    """Unpickle a quantized module the way its own __deepcopy__ copies it (version-1 files name this
    function as `autoq.result._rebuild_module`)."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.__setstate__(state)
    return module


def load_trusted(path: str | os.PathLike) -> nn.Module:
    """The model of a version-1 file, unpickled (runs code from the file: trusted files only)."""
    warnings.warn(f"autoq: loading {os.fspath(path)!r} in the old pickled format (trusted=True): this runs code "
                  f"stored in the file. Save it again with autoq.save to get the safe format.", stacklevel=3)
    try:
        payload = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{os.fspath(path)!r} is not an autoq model file: {type(error).__name__}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != LEGACY_VERSION:
        raise ValueError(f"{os.fspath(path)!r} is not an autoq model file.")
    plan = QuantPlan.from_dict(payload["config"])
    if recipe_kind(plan.recipe).inductor:
        program = torch.export.load(io.BytesIO(payload["model"]))
        model = Lowered(program.module(), tuple(program.example_inputs[0]), mixed_bf16=plan.mixed_bf16,
                        cpp_wrapper=plan.cpp_wrapper)
    else:
        with quantized_engine(plan.engine), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation of quantized tensors and TypedStorage
            model = torch.load(io.BytesIO(payload["model"]), weights_only=False)
        set_layer_engines(model, plan.layer_engines)
    model.meta["autoq"] = {"plan": payload["config"], "summary": payload["summary"],
                           "layer_shapes": payload.get("layer_shapes", {}), "inputs": payload.get("inputs", [])}
    return model
