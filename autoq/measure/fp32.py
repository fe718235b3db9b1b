"""The strongest float models a user could build by hand: folded BN, channels_last, frozen torch.compile,
in FP32 or under bf16 autocast; the references an int8 model is timed against and the float candidates
it competes with."""
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
from autoq.plan import REWRITES

_TOLERANCE = 1e-3  # rtol, and atol as a fraction of the largest reference output magnitude
_ATOL_FLOOR = 1e-6  # keeps the absolute tolerance above zero for all-zero reference outputs
_BF16_TOLERANCE = 2e-2  # compiling a bf16 model may round differently than its eager ops: rtol and atol fraction


@dataclass
class FloatModel:
    """A float model to compare against or deploy, with the optimizations applied and those skipped (and why)."""

    model: nn.Module  # call as model(*example_inputs); FP32: outputs match the FP32 model's; compiled: no autograd
    steps: list[str]  # applied, in order: "fold_bn", "channels_last", "bf16 autocast", "torch.compile(freezing)"
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


class _Bf16Autocast(nn.Module):
    """Calls `inner` under CPU bf16 autocast (weights stay FP32, matmuls and convs run in bf16) and
    returns its floating-point outputs as float32, so metrics see the dtype the FP32 model gives."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: object) -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = self.inner(*args)
        return torch.utils._pytree.tree_map(
            lambda value: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value,
            output)


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


def _mismatch(reference: object, candidate: object, tolerance: float = _TOLERANCE) -> str | None:
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
        atol = tolerance * max(expected.abs().max().item() if expected.numel() else 0.0, _ATOL_FLOOR)
        if not torch.allclose(actual, expected, rtol=tolerance, atol=atol):
            max_error = (actual - expected).abs().max().item()
            return f"output {index} differs by up to {max_error:.3g} (rtol={tolerance}, atol={atol:.3g})"
    return None


def _count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(submodule, nn.modules.batchnorm._BatchNorm) for submodule in module.modules())


@dataclass
class _StepLog:
    """Keeps a step only if its outputs match the FP32 reference, recording steps and warnings."""

    reference: object
    tolerance: float = _TOLERANCE
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def keep(self, step: str, output: object) -> bool:
        mismatch = _mismatch(self.reference, output, self.tolerance)
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


def best_float(model: nn.Module, example_inputs: tuple, *, precision: str = "fp32",
               rewrite: str = "compiled") -> FloatModel:
    """Build a plain float version of `model` for inference on `example_inputs`.

    rewrite 'folded' and 'compiled' apply, in order and each only if outputs stay within rtol=1e-3,
    atol=1e-3 x max|output| of the FP32 model's: BatchNorm folding (torch.fx), channels_last for 4-D
    inputs; then ('compiled') torch.compile with inductor freezing (compiled here on the first call,
    which can take tens of seconds; for bf16 checked against the eager bf16 outputs within 2e-2);
    'none' applies neither. Precision 'bf16' runs the result under CPU bf16 autocast (its outputs are
    what the accuracy evaluation is for; float32 out). `model` itself is never modified; the returned
    model runs in eval mode (compiled: without autograd).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of positional arguments, got "
                        f"{type(example_inputs).__name__}; wrap a single tensor as (x,).")
    if precision not in ("fp32", "bf16") or rewrite not in REWRITES:
        raise ValueError(f"precision must be 'fp32' or 'bf16' and rewrite one of {list(REWRITES)}, got "
                         f"{precision!r} and {rewrite!r}.")
    eager = copy.deepcopy(model).eval()
    with torch.no_grad():
        log = _StepLog(reference=eager(*example_inputs))
    optimized = eager
    if rewrite != "none":
        optimized = _to_channels_last(_fold_batchnorm(eager, example_inputs, log), example_inputs, log)
    if precision == "bf16":
        optimized = _Bf16Autocast(optimized)
        log.steps.append("bf16 autocast")
        with torch.no_grad():
            log.reference, log.tolerance = optimized(*example_inputs), _BF16_TOLERANCE
    final = _compile_frozen(optimized, example_inputs, log) if rewrite == "compiled" else optimized
    # a compiled model must not see grad mode change (it would recompile); an eager one skips the wrapper's cost
    return FloatModel(model=_NoGrad(final) if final is not optimized else final, steps=log.steps,
                      warnings=log.warnings)


class FloatBuilds:
    """The `best_float` models of one FP32 model, each built once (compiling takes tens of seconds): the
    float candidates of a search and the FP32 references share them."""

    def __init__(self, model: nn.Module, example_inputs: tuple) -> None:
        self.model, self.example_inputs = model, example_inputs
        self._built: dict[tuple[str, str], FloatModel] = {}

    def get(self, precision: str, rewrite: str) -> FloatModel:
        """`best_float(model, example_inputs, precision=precision, rewrite=rewrite)`, built on first use."""
        if (precision, rewrite) not in self._built:
            self._built[precision, rewrite] = best_float(self.model, self.example_inputs, precision=precision,
                                                         rewrite=rewrite)
        return self._built[precision, rewrite]


@dataclass
class AgainstFP32:
    """The int8 model timed side by side with FP32 eager and the best FP32 (`best_float`)."""

    latency_ms: dict[str, float]  # median ms: fp32_eager, fp32_best, int8 (the returned model, whatever its precision)
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


def fp32_references(builds: FloatBuilds, *, compile_fp32: bool) -> FP32References:
    """FP32 eager (the model as given), `best_float` folded and (compile_fp32) compiled: the 'fp32' plans."""
    reference = builds.get("fp32", "folded")
    models = {"fp32_eager": builds.get("fp32", "none").model, "fp32_folded": reference.model}
    notes = []
    if compile_fp32:
        compiled = builds.get("fp32", "compiled")
        models["fp32_compiled"] = compiled.model
        notes += compiled.warnings
    return FP32References(models, reference.steps, notes)


def against_fp32(int8_model: Callable[..., object], references: FP32References, example_inputs: tuple, *,
                 threads: int | None, seconds: float, lock: bool, confidence: float = DEFAULT_CONFIDENCE,
                 precision: str = "int8") -> AgainstFP32:
    """Time `int8_model` (the returned model: its precision, 'int8' unless int8 did not pay) against the
    FP32 references, interleaved for `seconds` (at least 20 rounds) under the measurement lock."""
    candidates = {**references.models, "int8": int8_model}
    notes = list(references.notes)
    with measurement_lock(lock):
        timing = measure_latency(candidates, example_inputs, threads=threads, target_seconds=seconds, min_repeats=20)
    best = min((name for name in timing if name.startswith("fp32_")), key=lambda name: timing[name].median_ms)
    latency = {"fp32_eager": timing["fp32_eager"].median_ms, "fp32_best": timing[best].median_ms,
               "int8": timing["int8"].median_ms}
    steps = ", ".join(references.steps) if best != "fp32_eager" else ""
    notes.append(f"best FP32 is {best} ({steps or 'no rewrite'}{' + torch.compile' if best == 'fp32_compiled' else ''})")
    eager = speedup_interval(timing["fp32_eager"], timing["int8"], confidence)
    vs_best = speedup_interval(timing[best], timing["int8"], confidence)
    if precision != "fp32" and speed_verdict(*vs_best[1:]) != "faster":
        notes.append(f"{precision} is not measurably faster than the best FP32 on this CPU for these inputs "
                     f"({vs_best[0]:.2f}x, {confidence:.0%} interval {vs_best[1]:.2f}-{vs_best[2]:.2f}x): "
                     f"keep FP32 unless int8 pays elsewhere (with 'fp32' in space.precisions autoq returns the faster)")
    return AgainstFP32(latency, eager[0], eager[1:], vs_best, notes)
