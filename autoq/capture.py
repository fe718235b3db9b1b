"""Checking what the user hands in, and capturing the model's graph with actionable errors."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.fx.tracer import QuantizationTracer

QUANTIZABLE_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
FUNCTIONAL_LAYERS = (F.conv1d, F.conv2d, F.conv3d, F.linear)


class TraceError(RuntimeError):
    """The model (or one of its submodules) cannot be captured by torch.fx."""


def drop_dead_code(graph: torch.fx.GraphModule) -> bool:
    """Remove computations whose results the model never returns (in place); True if any were.

    Captured graphs keep them: unused heads, debug outputs, the pooler of a BERT encoder whose pooled
    output the model ignores (prepare_pt2e then fails with an IndexError on the dangling pattern).
    """
    if not graph.graph.eliminate_dead_code():
        return False
    graph.delete_all_unused_submodules()
    graph.recompile()
    return True


def check_model(model: Any) -> nn.Module:
    """Validate the FP32 model: an nn.Module whose parameters and buffers all live on the CPU."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"autoq.tune needs a torch.nn.Module as `model`. Got {type(model).__name__} instead.")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "cpu":
            raise ValueError(
                f"autoq quantizes for x86 CPUs, but tensor '{name}' of the model is on '{tensor.device}'. "
                "Move the model to the CPU first: model.cpu()."
            )
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ValueError(
                f"autoq expects an FP32 model, but tensor '{name}' has dtype {tensor.dtype}. Use model.float()."
            )
    return model


def as_input_tuple(inputs: Any, what: str = "example_inputs") -> tuple:
    """A single tensor becomes a 1-tuple; tuples/lists become tuples. Everything must be on the CPU."""
    values = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not values:
        raise ValueError(f"`{what}` is empty: pass the model's inputs, e.g. example_inputs=(x,).")
    for value in values:
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            raise ValueError(f"`{what}` holds a tensor on '{value.device}'; autoq runs on the CPU: use x.cpu().")
    return values


def calibration_batches(calib_data: Iterable, n_inputs: int, max_samples: int | None) -> list[tuple]:
    """Materialize calibration batches as input tuples.

    Each item of `calib_data` is a batch: a tensor, a tuple of `n_inputs` inputs, or an
    (inputs, target) pair whose target is ignored. Stops after `max_samples` samples.
    """
    if calib_data is None or isinstance(calib_data, torch.Tensor):
        raise TypeError(
            "`calib_data` must be an iterable of batches (a list of tensors, a DataLoader, ...). "
            f"Got {type(calib_data).__name__}; wrap a single tensor batch as [x]."
        )
    batches, samples = [], 0
    for item in calib_data:
        batch = _inputs_of(item, n_inputs)
        batches.append(batch)
        first = batch[0]
        samples += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
        if max_samples is not None and samples >= max_samples:
            break
    if not batches:
        raise ValueError("`calib_data` is empty: autoq needs at least one calibration batch (typically 128-512 samples).")
    return batches


def _inputs_of(item: Any, n_inputs: int) -> tuple:
    if isinstance(item, dict):
        raise TypeError("Calibration batches that are dicts are not supported: yield tensors or (inputs, target) pairs.")
    if not isinstance(item, (tuple, list)):
        return as_input_tuple(item, "calib_data")
    if len(item) == 2 and (n_inputs == 1 or isinstance(item[0], (tuple, list))):
        return as_input_tuple(item[0], "calib_data")
    if len(item) == n_inputs:
        return as_input_tuple(item, "calib_data")
    raise ValueError(
        f"A calibration batch has {len(item)} elements but the model takes {n_inputs} inputs. "
        "Yield either the inputs or (inputs, target) pairs."
    )


class _LocatingTracer(QuantizationTracer):
    """QuantizationTracer that remembers which module it was inside when tracing failed."""

    def __init__(self, non_traceable: list[str]) -> None:
        super().__init__(skipped_module_names=list(non_traceable), skipped_module_classes=[])
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


def explain_trace_failure(model: nn.Module, error: Exception, non_traceable: list[str]) -> TraceError:
    """Turn a tracing failure into an error naming the failing module and the fix."""
    tracer = _LocatingTracer(non_traceable)
    try:
        tracer.trace(model)
    except Exception:  # the failure we are explaining
        pass
    path = tracer.failed_in[-1] if tracer.failed_in else ""
    if not path:
        return TraceError(
            f"torch.fx could not trace the model's own forward ({type(model).__name__}): "
            f"{type(error).__name__}: {error}. Move data-dependent Python control flow into a submodule "
            "and pass its name in non_traceable_modules (it then stays FP32), or make forward traceable."
        )
    cls = type(model.get_submodule(path)).__name__
    return TraceError(
        f"torch.fx could not trace module '{path}' ({cls}): {type(error).__name__}: {error}. "
        f"Pass non_traceable_modules=['{path}'] to keep it as an FP32 black box (the rest is still "
        "quantized), or make its forward traceable (no data-dependent Python control flow)."
    )


@dataclass(frozen=True)
class Layer:
    """A quantizable conv/linear in the captured graph.

    name: how plans refer to it (the module name; for functional calls the enclosing module's
    name, or 'module:function#k' when that is ambiguous). function/index: set for functional
    calls (F.conv2d, F.linear, ...), the k-th call of that function inside `module_path`.
    """

    name: str
    module_path: str
    node: str
    function: Callable | None = None
    index: int = 0


def use_base_layer_classes(model: nn.Module, bases: tuple[type, ...] = QUANTIZABLE_LAYER_TYPES) -> list[str]:
    """Give subclasses of `bases` (default: Conv/Linear) that keep the base forward their base class
    (in place).

    FX quantization and quantize_dynamic match exact module types, so `class MyConv(nn.Conv2d): pass`
    would otherwise be traced into as a functional call (and lose BN folding) or skipped. Returns the
    names changed.
    """
    changed = []
    for name, module in model.named_modules():
        for base in bases:
            if type(module) is not base and isinstance(module, base) and type(module).forward is base.forward:
                module.__class__ = base
                changed.append(name)
                break
    return changed


def find_layers(prepared: torch.fx.GraphModule) -> list[Layer]:
    """Quantizable layers of a prepared graph, in execution order."""
    scope = prepared.meta["_observed_graph_module_attrs"].node_name_to_scope
    calls_seen: dict[tuple[str, Callable], int] = {}
    modules, functional = [], []
    for node in prepared.graph.nodes:
        if node.op == "call_module":
            module = prepared.get_submodule(node.target)
            core = module[0] if isinstance(module, nn.Sequential) and len(module) else module
            if isinstance(core, QUANTIZABLE_LAYER_TYPES) and all(m.name != node.target for m in modules):
                modules.append(Layer(node.target, node.target, node.name))
        elif node.op == "call_function" and node.target in FUNCTIONAL_LAYERS:
            path = scope[node.name][0] if node.name in scope else ""
            index = calls_seen.get((path, node.target), 0)
            calls_seen[(path, node.target)] = index + 1
            functional.append(Layer("", path, node.name, node.target, index))
    per_module = Counter(layer.module_path for layer in functional)
    named = [
        dataclasses.replace(layer, name=layer.module_path)
        if layer.module_path and per_module[layer.module_path] == 1
        else dataclasses.replace(
            layer, name=f"{layer.module_path or '<root>'}:{layer.function.__name__}#{layer.index}")
        for layer in functional
    ]
    order = {node.name: i for i, node in enumerate(prepared.graph.nodes)}
    return sorted(modules + named, key=lambda layer: order[layer.node])


def set_layer_qconfig(mapping: QConfigMapping, layer: Layer, qconfig: QConfig | None) -> None:
    """Give `layer` its own qconfig in `mapping` (None: FP32)."""
    if layer.function is None or layer.name == layer.module_path:
        mapping.set_module_name(layer.module_path, qconfig)
    else:
        mapping.set_module_name_object_type_order(layer.module_path, layer.function, layer.index, qconfig)


def keep_fp32(mapping: QConfigMapping, layer: Layer) -> None:
    """Set `layer` to FP32 in `mapping`."""
    set_layer_qconfig(mapping, layer, None)
