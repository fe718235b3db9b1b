"""Checking what the user hands in, and capturing the model's graph with actionable errors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.ao.quantization.fx.tracer import QuantizationTracer

QUANTIZABLE_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class TraceError(RuntimeError):
    """The model (or one of its submodules) cannot be captured by torch.fx."""


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


def quantizable_layers(graph_module: torch.fx.GraphModule) -> list[str]:
    """Names of conv/linear modules (possibly fused with BN/ReLU) called in the captured graph, in order."""
    layers = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        module = graph_module.get_submodule(node.target)
        core = module[0] if isinstance(module, nn.Sequential) and len(module) else module
        if isinstance(core, QUANTIZABLE_LAYER_TYPES) and node.target not in layers:
            layers.append(node.target)
    return layers
