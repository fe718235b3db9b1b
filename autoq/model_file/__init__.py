"""autoq's model file: safe to open (data only) and rebuilt from code.

A file holds the plan, the int8 model's numbers (`state`), the recorded input shapes and the
outputs the model gave on synthetic inputs of those shapes, in one safetensors file (`archive`).
Loading rebuilds the structure from the user's FP32 model and the plan (`rebuild`), puts the
numbers in and checks the outputs. Files of autoq's old pickled format load only when trusted
(`legacy`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torchao
from torch import nn

from autoq import __version__
from autoq.dispatch.apply import carrying_plan
from autoq.dispatch.isa import int8_path
from autoq.measure.outputs import float_outputs
from autoq.model_file.archive import LegacyFile, read, write
from autoq.model_file.legacy import load_trusted
from autoq.model_file.rebuild import (
    OTHER_CPU_TOLERANCE, TOLERANCE, output_difference, rebuild, synthetic_inputs,
)
from autoq.model_file.state import MismatchError, Numbers, encode, numbers
from autoq.plan import QuantPlan, recipe_kind

__all__ = ["MismatchError", "load_model", "save_model", "synthetic_inputs"]
_CHECK = "check.output."


def save_model(model: nn.Module, path: str | os.PathLike, summary: Mapping | None = None,
               model_source: str | None = None) -> None:
    """Write an autoq int8 model (its plan and recorded inputs in `model.meta['autoq']`) to `path`.

    model_source: how to get the FP32 model it was tuned from (e.g. a run file), shown by errors on load."""
    meta = getattr(model, "meta", {}).get("autoq")
    if not meta or not meta.get("inputs"):
        raise ValueError("autoq.save needs an int8 model built by autoq.quantize, autoq.tune or autoq.load "
                         "(model.meta['autoq'] holds its plan and input shapes).")
    float_plan = recipe_kind(QuantPlan.from_dict(meta["plan"]).recipe).precision != "int8"
    tensors, layout = encode(Numbers({}) if float_plan else numbers(model))  # a float model's are the FP32 model's
    with torch.no_grad():
        outputs = float_outputs(model(*synthetic_inputs(meta["inputs"])))
    tensors.update({f"{_CHECK}{i}": output for i, output in enumerate(outputs)})
    write(path, {
        "plan": meta["plan"], "summary": dict(summary if summary is not None else meta.get("summary", {})),
        "inputs": meta["inputs"], "layer_shapes": meta.get("layer_shapes", {}),
        "non_traceable_modules": list(meta.get("non_traceable_modules", [])), "layout": layout,
        "check": {"outputs": len(outputs), "int8_path": int8_path().describe()},
        "model_source": model_source or meta.get("model_source"),
        "versions": {"autoq": __version__, "torch": str(torch.__version__), "torchao": torchao.__version__},
    }, tensors)


def load_model(path: str | os.PathLike, model: nn.Module | None = None, *, trusted: bool = False,
               check: bool = True) -> nn.Module:
    """The int8 model a file holds, rebuilt on `model` (the FP32 model it was tuned from, not modified).

    trusted: also open autoq's old pickled files (which run code from the file when opened).
    check: compare the rebuilt model's outputs with those recorded at save time (ValueError if they differ)."""
    where = os.fspath(path)
    try:
        manifest, tensors = read(path)
    except LegacyFile:
        if trusted:
            return load_trusted(path)
        raise ValueError(
            f"{where!r} is in autoq's old pickled model format, which runs code stored in the file when opened. "
            f"If you trust who wrote it: autoq.load(path, trusted=True) (CLI: --trusted), then autoq.save(model, "
            f"new_path) writes the safe format.") from None
    if model is None:
        source = manifest.get("model_source")
        raise ValueError(f"{where!r} holds an int8 model's numbers, not its code: pass the FP32 model it was tuned "
                         f"from, autoq.load(path, model) (CLI: --run RUN.toml)"
                         + (f"; it was tuned from {source}." if source else "."))
    if not isinstance(model, nn.Module):
        raise TypeError(f"autoq.load's model must be the FP32 torch.nn.Module the file was tuned from; got "
                        f"{type(model).__name__}.")
    plan = QuantPlan.from_dict(manifest["plan"])
    inputs = synthetic_inputs(manifest["inputs"])
    try:
        rebuilt = rebuild(model, plan, inputs, tensors, manifest["layout"], manifest["non_traceable_modules"])
    except MismatchError as error:
        raise ValueError(f"{where!r} does not fit the model passed: {error}. Pass the FP32 model it was tuned "
                         f"from ({manifest.get('model_source') or 'same class and configuration'}).") from error
    if check:
        _check(rebuilt, inputs, tensors, manifest, where)
    carrying_plan(rebuilt, plan).meta["autoq"].update({
        "summary": manifest["summary"], "layer_shapes": manifest["layer_shapes"],
        "inputs": manifest["inputs"], "non_traceable_modules": manifest["non_traceable_modules"],
        "model_source": manifest.get("model_source"),
    })
    return rebuilt


def _check(model: nn.Module, inputs: tuple, tensors: Mapping[str, torch.Tensor], manifest: Mapping,
           where: str) -> None:
    expected = [tensors[f"{_CHECK}{i}"] for i in range(manifest["check"]["outputs"])]
    with torch.no_grad():
        difference = output_difference(expected, model(*inputs))
    same_path = manifest["check"]["int8_path"] == int8_path().describe()
    tolerance = TOLERANCE if same_path else OTHER_CPU_TOLERANCE
    if not difference <= tolerance:
        raise ValueError(
            f"the model rebuilt from {where!r} does not reproduce the outputs recorded when it was saved: relative "
            f"RMS difference {difference:.2e} > {tolerance:.0e}"
            + ("" if same_path else f" (saved where {manifest['check']['int8_path']}; here {int8_path().describe()})")
            + ". The FP32 model passed differs from the one it was tuned from (its code or buffers), or "
              "autoq/torch changed; autoq.load(..., check=False) skips this check.")
