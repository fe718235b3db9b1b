"""The strongest FP32 baseline a user could build by hand: folded BN, channels_last, frozen torch.compile."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from autoq.measure.confidence import DEFAULT_CONFIDENCE
from autoq.measure.latency import measure_latency, speed_verdict, speedup_interval
from autoq.measure.lock import measurement_lock

_RTOL = 1e-3
_ATOL_FRACTION = 1e-3  # absolute tolerance as a fraction of the largest reference output magnitude
_ATOL_FLOOR = 1e-6  # keeps the absolute tolerance above zero for all-zero reference outputs


@dataclass
class BestFP32:
    """An FP32 model to compare against, with the optimizations applied and those skipped (and why)."""

    model: Callable[..., object]  # call as model(*example_inputs); outputs match the FP32 model
    steps: list[str]  # applied, in order: "fold_bn", "channels_last", "torch.compile(freezing)"
    warnings: list[str]  # why a step was skipped or dropped


class _ChannelsLastInputs(nn.Module):
    """Calls `inner` with every 4-D tensor argument converted to channels_last memory format."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: object) -> object:
        return self.inner(*(arg.contiguous(memory_format=torch.channels_last) if _is_4d_tensor(arg)
                            else arg for arg in args))


class _NoGrad(nn.Module):
    """Calls `inner` with autograd disabled, so a compiled `inner` never recompiles for grad mode."""

    def __init__(self, inner: Callable[..., object]) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: object) -> object:
        with torch.no_grad():
            return self.inner(*args)


def _is_4d_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4


def _one_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def _tensors(output: object) -> list[torch.Tensor] | None:
    """Tensors of a (nested tuple/list/dict) output in a fixed order; None for other output types."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        items = list(output)
    elif isinstance(output, dict):
        items = list(output.values())
    else:
        return None
    tensors: list[torch.Tensor] = []
    for item in items:
        item_tensors = _tensors(item)
        if item_tensors is None:
            return None
        tensors.extend(item_tensors)
    return tensors


def _mismatch(reference: object, candidate: object) -> str | None:
    """Why `candidate` differs from `reference` beyond float tolerance, or None if it matches."""
    reference_tensors, candidate_tensors = _tensors(reference), _tensors(candidate)
    if reference_tensors is None or candidate_tensors is None:
        return (f"outputs must be tensors or tuples/lists/dicts of tensors to be compared, got "
                f"{type(reference).__name__} and {type(candidate).__name__}")
    if len(reference_tensors) != len(candidate_tensors):
        return f"{len(candidate_tensors)} output tensors instead of {len(reference_tensors)}"
    for index, (expected, actual) in enumerate(zip(reference_tensors, candidate_tensors)):
        if expected.shape != actual.shape:
            return f"output {index} has shape {tuple(actual.shape)} instead of {tuple(expected.shape)}"
        expected, actual = expected.detach().float(), actual.detach().float()
        atol = _ATOL_FRACTION * max(expected.abs().max().item() if expected.numel() else 0.0, _ATOL_FLOOR)
        if not torch.allclose(actual, expected, rtol=_RTOL, atol=atol):
            max_error = (actual - expected).abs().max().item()
            return f"output {index} differs by up to {max_error:.3g} (rtol={_RTOL}, atol={atol:.3g})"
    return None


def _count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(submodule, nn.modules.batchnorm._BatchNorm) for submodule in module.modules())


@dataclass
class _StepLog:
    """Keeps a step only if its outputs match the FP32 reference, recording steps and warnings."""

    reference: object
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def keep(self, step: str, output: object) -> bool:
        mismatch = _mismatch(self.reference, output)
        if mismatch is None:
            self.steps.append(step)
            return True
        self.warnings.append(f"{step} dropped, it would change the results: {mismatch}.")
        return False


def _fold_batchnorm(model: nn.Module, example_inputs: tuple, log: _StepLog) -> nn.Module:
    """Conv/Linear + BatchNorm folded via torch.fx, or `model` unchanged (with a warning if it failed)."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as error:  # tracing user code can raise anything
        log.warnings.append(f"fold_bn skipped: torch.fx could not trace the model ({_one_line(error)}); "
                            "remove data-dependent control flow from forward() to enable folding.")
        return model
    folded = fuse(traced, no_trace=True)
    if _count_batchnorms(folded) == _count_batchnorms(traced):
        return model
    with torch.no_grad():
        return folded if log.keep("fold_bn", folded(*example_inputs)) else model


def _to_channels_last(model: nn.Module, example_inputs: tuple, log: _StepLog) -> nn.Module:
    """`model` converted to channels_last, taking 4-D inputs in that format; unchanged if no input is 4-D."""
    if not any(_is_4d_tensor(arg) for arg in example_inputs):
        return model
    converted = _ChannelsLastInputs(copy.deepcopy(model).to(memory_format=torch.channels_last))
    with torch.no_grad():
        return converted if log.keep("channels_last", converted(*example_inputs)) else model


def _compile_frozen(model: nn.Module, example_inputs: tuple, log: _StepLog) -> Callable[..., object]:
    """`model` compiled by inductor with weight freezing, or `model` itself if compiling fails."""
    try:
        # freezing via `options` (not a config.patch context) also applies to later recompiles
        compiled = torch.compile(model, options={"freezing": True})
        with torch.no_grad():  # inductor freezes only graphs compiled with autograd disabled
            output = compiled(*example_inputs)  # the first call compiles
    except Exception as error:  # dynamo/inductor failures surface as many exception types
        log.warnings.append(f"torch.compile failed: {_one_line(error)}; using the uncompiled model.")
        return model
    return compiled if log.keep("torch.compile(freezing)", output) else model


def best_fp32(model: nn.Module, example_inputs: tuple, *, compile: bool = True) -> BestFP32:
    """Build the fastest plain-FP32 version of `model` for inference on `example_inputs`.

    Applies, in order and each only if outputs stay within rtol=1e-3, atol=1e-3 x max|output|:
    BatchNorm folding (torch.fx), channels_last for 4-D inputs, and torch.compile with inductor
    freezing (compiled here on the first call, which can take tens of seconds). `model` itself is
    never modified; the returned model runs in eval mode without autograd.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of positional arguments, got "
                        f"{type(example_inputs).__name__}; wrap a single tensor as (x,).")
    eager = copy.deepcopy(model).eval()
    with torch.no_grad():
        log = _StepLog(reference=eager(*example_inputs))
    optimized = _fold_batchnorm(eager, example_inputs, log)
    optimized = _to_channels_last(optimized, example_inputs, log)
    final = _compile_frozen(optimized, example_inputs, log) if compile else optimized
    return BestFP32(model=_NoGrad(final), steps=log.steps, warnings=log.warnings)


@dataclass
class AgainstFP32:
    """The int8 model timed side by side with FP32 eager and the best FP32 (`best_fp32`)."""

    latency_ms: dict[str, float]  # median ms: fp32_eager, fp32_best, int8
    speedup: float  # FP32 eager / int8, median of per-round ratios
    speedup_interval: tuple[float, float]  # its interval (`autoq.measure.latency.speedup_interval`)
    vs_best: tuple[float, float, float]  # best FP32 / int8: median per-round ratio and its interval
    notes: list[str]  # which FP32 is best, steps skipped, whether int8 pays


@dataclass
class FP32References:
    """The FP32 models an int8 model is timed against: eager, folded/channels_last and (when compiled)
    frozen torch.compile, built once (compiling can take tens of seconds) before the search."""

    models: dict[str, Callable[..., object]]  # fp32_eager, fp32_folded[, fp32_compiled]
    steps: list[str]  # the rewrite steps of fp32_folded
    notes: list[str]  # steps skipped and why


def fp32_references(fp32_model: nn.Module, example_inputs: tuple, *, compile_fp32: bool) -> FP32References:
    """FP32 eager, `best_fp32` without compiling and (compile_fp32) with frozen torch.compile."""
    reference = best_fp32(fp32_model, example_inputs, compile=False)
    models = {"fp32_eager": fp32_model, "fp32_folded": reference.model}
    notes = []
    if compile_fp32:
        compiled = best_fp32(fp32_model, example_inputs, compile=True)
        models["fp32_compiled"] = compiled.model
        notes += compiled.warnings
    return FP32References(models, reference.steps, notes)


def against_fp32(int8_model: Callable[..., object], references: FP32References, example_inputs: tuple, *,
                 threads: int | None, seconds: float, lock: bool,
                 confidence: float = DEFAULT_CONFIDENCE) -> AgainstFP32:
    """Time `int8_model` against the FP32 references, interleaved for `seconds` (at least 20 rounds)
    under the measurement lock."""
    candidates = {**references.models, "int8": int8_model}
    notes = list(references.notes)
    with measurement_lock(lock):
        timing = measure_latency(candidates, example_inputs, threads=threads, target_seconds=seconds, min_repeats=20)
    best = min((name for name in timing if name.startswith("fp32_")), key=lambda name: timing[name].median_ms)
    latency = {"fp32_eager": timing["fp32_eager"].median_ms, "fp32_best": timing[best].median_ms,
               "int8": timing["int8"].median_ms}
    notes.append(f"best FP32 is {best} ({', '.join(references.steps) or 'no rewrite'}"
                 f"{' + torch.compile' if best == 'fp32_compiled' else ''})")
    eager = speedup_interval(timing["fp32_eager"], timing["int8"], confidence)
    vs_best = speedup_interval(timing[best], timing["int8"], confidence)
    if speed_verdict(*vs_best[1:]) != "faster":
        notes.append(f"int8 is not measurably faster than the best FP32 on this CPU for these inputs "
                     f"({vs_best[0]:.2f}x, {confidence:.0%} interval {vs_best[1]:.2f}-{vs_best[2]:.2f}x): "
                     f"consider keeping FP32")
    return AgainstFP32(latency, eager[0], eager[1:], vs_best, notes)
