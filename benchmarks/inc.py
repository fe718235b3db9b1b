"""Intel Neural Compressor 3.10 (`neural-compressor-pt==3.10`) as a peer: static PTQ autotune, default dynamic.

INC's documented PyTorch flow without IPEX: `neural_compressor.torch.export.export` (torch.export,
strict first, non-strict on failure), then `autotune` over INC's default int8 static tuning set,
`StaticQuantConfig.get_config_set_for_tuning()`: weights int8 symmetric per-channel minmax;
activations uint8 per-tensor with (act_sym, act_algo) tried in the order (sym, kl), (sym, minmax),
(asym, kl), (asym, minmax). Each config is applied by torchao's X86InductorQuantizer
(prepare_pt2e, calibrate, convert_pt2e). INC stops at the first config whose accuracy is within
`tolerable_loss` (relative) of the FP32 baseline, else keeps the best of all four. The chosen Q/DQ
graph is compiled by Inductor with freezing, as autoq's own PT2E models are (`Lowered`: freezing
patched in around each call rather than set globally, one static compile per batch size).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import torch

from autoq.recipes.pt2e import Lowered

_INSTALL = "INC is not installed: pip install neural-compressor-pt==3.10 (or: pip install -e '.[inc]')"


def _quiet() -> None:
    """INC logs ~70 INFO lines per trial to its own logger (reset on import): keep its warnings only."""
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)


def _batch_args(batch: torch.Tensor | tuple) -> tuple:
    return batch if isinstance(batch, tuple) else (batch,)


def _exported(model: torch.nn.Module, example_inputs: tuple) -> torch.fx.GraphModule:
    """INC's export of `model` with every batch dimension dynamic (a batch of 1 is doubled first:
    torch.export would specialize a size-1 dimension)."""
    try:
        from neural_compressor.torch.export import export
    except ImportError as error:
        raise ImportError(_INSTALL) from error
    inputs = tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in example_inputs)
    dynamic = tuple({0: torch.export.Dim.AUTO} for _ in inputs)
    return export(copy.deepcopy(model).eval(), inputs, dynamic_shapes=dynamic)


def inc_autotune(model: torch.nn.Module, example_inputs: tuple, calib: list,
                 eval_fn: Callable[[torch.nn.Module], float],
                 tolerable_loss: float = 0.01) -> tuple[torch.nn.Module, dict]:
    """INC 3.10 static PTQ autotune (PT2E, X86InductorQuantizer) of `model` (left unchanged).

    `calib` batches (tensors or tuples of tensors) calibrate every trial; `eval_fn(model)` (higher
    is better) is called once on the exported FP32 graph (the baseline) and once per trial on
    INC's converted Q/DQ reference graph, run eagerly in FP32 -- not on the compiled int8 model.

    Returns the chosen model compiled by Inductor (freezing on), already called once on
    `example_inputs`, and stats: trials (configs evaluated), tune_s (wall seconds of export and
    autotune), first_ok (0-based index of the first config within tolerance, None if none was),
    first_ok_s (wall seconds from the start until it was evaluated) and config (the chosen scheme).
    """
    try:
        from neural_compressor.torch.quantization import StaticQuantConfig, TuningConfig, autotune
    except ImportError as error:
        raise ImportError(_INSTALL) from error
    _quiet()

    scores: list[float] = []
    scored_at: list[float] = []  # perf_counter() after each evaluation

    def scored(candidate: torch.nn.Module) -> float:
        scores.append(eval_fn(candidate))
        scored_at.append(time.perf_counter())
        return scores[-1]

    def calibrate(prepared: torch.nn.Module) -> None:
        for batch in calib:
            prepared(*_batch_args(batch))

    start = time.perf_counter()
    graph = _exported(model, example_inputs)
    # a list: INC 3.10's autotune iterates config_set, so a single (expandable) config raises TypeError
    tune_config = TuningConfig(config_set=[StaticQuantConfig.get_config_set_for_tuning()],
                               tolerable_loss=tolerable_loss)
    quantized = autotune(graph, tune_config, eval_fn=scored, run_fn=calibrate, example_inputs=example_inputs)
    tune_s = time.perf_counter() - start

    baseline, results = scores[0], scores[1:]
    first_ok = next((i for i, r in enumerate(results) if r >= baseline * (1 - tolerable_loss)), None)
    first_ok_s = None if first_ok is None else scored_at[first_ok + 1] - start
    (chosen,) = quantized.qconfig.values()
    config = (f"act {chosen.act_dtype} {'sym' if chosen.act_sym else 'asym'} {chosen.act_algo}, "
              f"w {chosen.w_dtype} {chosen.w_granularity} {'sym' if chosen.w_sym else 'asym'} {chosen.w_algo}")
    lowered = Lowered(quantized, example_inputs, mixed_bf16=False, cpp_wrapper=False)
    lowered(*example_inputs)
    return lowered, {"trials": len(results), "tune_s": tune_s, "first_ok": first_ok, "first_ok_s": first_ok_s,
                     "config": config}


def inc_default_dynamic(model: torch.nn.Module, example_inputs: tuple) -> torch.nn.Module:
    """INC 3.10's default dynamic config on PT2E (`get_default_dynamic_config()`: int8 symmetric
    per-tensor weights, uint8 asymmetric per-tensor activations ranged per call), untuned: prepare,
    one call on `example_inputs` (observes the weights), convert; compiled by Inductor with freezing
    and already called once on `example_inputs`. `model` is left unchanged.

    Inductor (torch 2.14) lowers dynamic int8 linears only with per-channel weights, so this model
    keeps FP32 matmuls with quantize/dequantize around them: INC's accuracy, no int8 kernels.
    """
    try:
        from neural_compressor.torch.quantization import convert, get_default_dynamic_config, prepare
    except ImportError as error:
        raise ImportError(_INSTALL) from error
    _quiet()
    prepared = prepare(_exported(model, example_inputs), get_default_dynamic_config(), example_inputs=example_inputs)
    with torch.no_grad():
        prepared(*example_inputs)
    lowered = Lowered(convert(prepared), example_inputs, mixed_bf16=False, cpp_wrapper=False)
    lowered(*example_inputs)
    return lowered
