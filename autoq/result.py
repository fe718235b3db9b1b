"""What a tuning run returns, and saving/loading the tuned int8 model."""

from __future__ import annotations

import io
import os
import pickle
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from autoq.dispatch.engine import quantized_engine
from autoq.dispatch.layers import set_layer_engines
from autoq.dispatch.table import DispatchTable
from autoq.plan import INDUCTOR_RECIPES, RECIPE_FIELDS, QuantPlan
from autoq.recipes.pt2e import Lowered

SAVE_FORMAT = "autoq.model"
SAVE_VERSION = 1


@dataclass
class TuneResult:
    """The tuned model and the evidence for it.

    accuracy / baseline_accuracy: the user's metric for the int8 / FP32 model.
    loss: accuracy loss as a fraction of the baseline (relative) or in metric units (absolute).
    speedup: FP32-eager latency / int8 latency, measured side by side at the end of the run.
    latency_ms: median milliseconds per call of example_inputs: fp32_eager, fp32_best, int8.
    config: the JSON-serializable QuantPlan of `model` (autoq.quantize rebuilds it).
    trials: one dict per trial (number, state, params, metric, loss, speedup, feasible, error, seconds,
      finished: Unix time the trial ended).
    pareto_front: trials not dominated in (loss, speedup), lowest loss first.
    feasible: whether `model` meets the accuracy budget.
    layers: per layer: name, sqnr_db (sensitivity), quantized, observer, engine (kernel library).
    dispatch_table: the per-layer kernel timings this run measured (plus autoq's shipped table for
      this CPU, if any) and the rule learned from them; `.save(path)` exports it.
    """

    model: torch.nn.Module
    accuracy: float
    baseline_accuracy: float
    loss: float
    speedup: float
    latency_ms: dict[str, float]
    config: dict[str, Any]
    trials: list[dict[str, Any]]
    pareto_front: list[dict[str, Any]]
    feasible: bool
    layers: list[dict[str, Any]] = field(default_factory=list)
    study_name: str = ""
    storage: str = ""
    notes: list[str] = field(default_factory=list)
    dispatch_table: DispatchTable | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the int8 model and its plan to one file; `autoq.load(path)` restores it."""
        _write(self.model, self.config, path, summary={
            "accuracy": self.accuracy, "baseline_accuracy": self.baseline_accuracy, "loss": self.loss,
            "speedup": self.speedup, "latency_ms": self.latency_ms,
        })

    def summary(self) -> str:
        """A short human-readable table of the outcome."""
        lat = self.latency_ms
        status = "meets the budget" if self.feasible else "DOES NOT meet the budget (best effort)"
        lines = [
            f"autoq result: {status}",
            f"  metric    FP32 {self.baseline_accuracy:.4f}   int8 {self.accuracy:.4f}   loss {self.loss:+.4f}",
            f"  latency   FP32 eager {lat['fp32_eager']:.3f} ms   FP32 best {lat['fp32_best']:.3f} ms   "
            f"int8 {lat['int8']:.3f} ms",
            f"  speedup   {self.speedup:.2f}x vs FP32 eager   {lat['fp32_best'] / lat['int8']:.2f}x vs best FP32",
            f"  trials    {len(self.trials)} in study '{self.study_name}'",
        ]
        plan = QuantPlan.from_dict(self.config)
        lines.append(
            f"  plan      recipe={plan.recipe} kernels={plan.kernels()}{' (oneDNN/FBGEMM layers)' if plan.layer_engines else ''} "
            + "".join(f"{name}={getattr(plan, name)} " for name in RECIPE_FIELDS[plan.recipe])
            + f"fp32_layers={len(plan.fp32_layers)}"
        )
        lines += [f"  note      {note}" for note in self.notes]
        return "\n".join(lines)


def _rebuild_module(cls: type, state: tuple) -> torch.nn.Module:
    """Unpickle a quantized module the way its own __deepcopy__ copies it."""
    module = cls.__new__(cls)
    torch.nn.Module.__init__(module)
    module.__setstate__(state)
    return module


class _Pickler(pickle.Pickler):
    """Pickles torch's quantized modules through `_rebuild_module`.

    Their __setstate__ (tuple state, weights re-packed) never runs nn.Module.__init__, so a plainly
    pickled quantized conv comes back without `_modules` and a GraphModule holding it cannot load.
    """

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith(_QUANTIZED_MODULES):
            state = obj.__getstate__()
            if isinstance(state, tuple):
                return _rebuild_module, (type(obj), state)
        return NotImplemented


_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
_PICKLE_MODULE = types.ModuleType("autoq_pickle")
_PICKLE_MODULE.Pickler = _Pickler


def save(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Save an int8 model built by `autoq.quantize` (its plan, with per-layer kernels, comes along)."""
    meta = getattr(model, "meta", {}).get("autoq")
    if not meta:
        raise ValueError("autoq.save needs a model built by autoq.quantize or autoq.load (model.meta['autoq'] "
                         "holds its plan); for a tuning result use result.save(path).")
    _write(model, meta["config"], path, meta.get("summary"))


def _write(model: torch.nn.Module, config: dict, path: str | os.PathLike, summary: dict | None = None) -> None:
    """Save an autoq int8 model with its plan (the plan's kernel choices are re-applied on load)."""
    if isinstance(model, Lowered):
        data = model.to_bytes()
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer, pickle_module=_PICKLE_MODULE)
        data = buffer.getvalue()
    torch.save({
        "format": SAVE_FORMAT, "version": SAVE_VERSION, "config": config, "summary": summary or {},
        "layer_shapes": getattr(model, "meta", {}).get("autoq", {}).get("layer_shapes", {}),
        "inputs": getattr(model, "meta", {}).get("autoq", {}).get("inputs", []),
        "torch_version": str(torch.__version__), "model": data,
    }, path)


def load(path: str | os.PathLike) -> torch.nn.Module:
    """Load a model written by `TuneResult.save` or `autoq.save`, with its weights packed as tuned.

    Unpickling re-packs every layer under one engine (PyTorch's heuristic); the plan's per-layer
    kernel libraries are then re-applied.

    The file contains pickled code (an FX GraphModule): load only files you trust. Classes of
    modules kept as FP32 black boxes must be importable. The plan is in `model.meta['autoq']`.
    """
    try:
        payload = torch.load(path, weights_only=True)
    except FileNotFoundError as error:
        raise ValueError(f"model file {os.fspath(path)!r} not found.") from error
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{os.fspath(path)!r} is not an autoq model file (written by TuneResult.save): "
                         f"{type(error).__name__}") from error
    if not isinstance(payload, dict) or payload.get("format") != SAVE_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an autoq model file (written by TuneResult.save).")
    if payload.get("version") != SAVE_VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} has autoq model format version {payload.get('version')}; "
            f"this autoq reads version {SAVE_VERSION}."
        )
    plan = QuantPlan.from_dict(payload["config"])
    if plan.recipe in INDUCTOR_RECIPES:
        model = Lowered.from_bytes(payload["model"], plan)
    else:
        with quantized_engine(plan.engine), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation of quantized tensors and TypedStorage
            model = torch.load(io.BytesIO(payload["model"]), weights_only=False)
        set_layer_engines(model, plan.layer_engines)
    model.meta["autoq"] = {"config": payload["config"], "summary": payload["summary"],
                           "layer_shapes": payload.get("layer_shapes", {}), "inputs": payload.get("inputs", [])}
    return model
