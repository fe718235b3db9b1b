"""Applying kernel choices to a built int8 model and recording them in its plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autoq.dispatch.layers import LayerShape, layer_shapes, set_layer_engines
from autoq.dispatch.table import DispatchTable
from autoq.plan import QuantPlan


def carrying_plan(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """`model` (built from `plan`) with the plan in `model.meta['autoq']`, where saving, exporting and
    re-dispatching read it; every int8 model autoq hands out carries one."""
    if not isinstance(getattr(model, "meta", None), dict):
        model.meta = {}
    model.meta["autoq"] = {"plan": plan.to_dict(), "summary": {}}
    return model


def record_layer_shapes(model: nn.Module, example_inputs: tuple, non_traceable_modules: Sequence[str] = ()) -> None:
    """Store each int8 layer's shape signature, the model's inputs (shape, dtype, and for integer inputs
    such as token ids their [low, high]) and the modules its capture kept whole in `model.meta['autoq']`
    (saved with the model: loading rebuilds it on such inputs, `autoq bench` times it on them)."""
    model.meta["autoq"]["layer_shapes"] = {
        name: shape.to_dict() for name, shape in layer_shapes(model, example_inputs).items()}
    model.meta["autoq"]["inputs"] = [_input_spec(value) for value in example_inputs]
    model.meta["autoq"]["non_traceable_modules"] = list(non_traceable_modules)


def _input_spec(value: torch.Tensor) -> dict:
    spec = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if not value.is_floating_point() and value.numel():
        spec.update(low=int(value.min()), high=int(value.max()))
    return spec


def set_model_dispatch(model: nn.Module, engines: Mapping[str, str], dispatch: str) -> None:
    """Re-pack `model`'s int8 layers per `engines` and record them (and how they were chosen) in its plan."""
    plan = QuantPlan.from_dict(model.meta["autoq"]["plan"])
    plan.layer_engines, plan.dispatch = dict(engines), dispatch
    set_layer_engines(model, plan.layer_engines)
    model.meta["autoq"]["plan"] = plan.to_dict()


def apply_dispatch(model: nn.Module, table: DispatchTable | str) -> dict[str, str]:
    """Re-pack the int8 layers of an autoq model per a dispatch table, in place; returns {layer: library}.

    `model` comes from `autoq.quantize`, a tuning result or `autoq.load`: their layer shapes are
    recorded in `model.meta['autoq']`, so no inputs are needed. `table` is a DispatchTable, a path
    to one, or 'shipped' (autoq's table for this CPU). The choice is kept by `autoq.save`.
    """
    meta = getattr(model, "meta", {}).get("autoq") or {}
    if not meta.get("layer_shapes"):
        raise ValueError("apply_dispatch needs an autoq int8 model whose layer shapes are recorded (built by "
                         "autoq.quantize or autoq.tune, or loaded from a file they saved); rebuild it with "
                         "autoq.quantize(model, plan, x, calib, dispatch=table).")
    shapes = {name: LayerShape.from_dict(shape) for name, shape in meta["layer_shapes"].items()}
    engines = DispatchTable.resolve(table).choose_all(shapes)
    set_model_dispatch(model, engines, "table")
    return engines
