"""Reference methods that autoq is compared against, built exactly as their users would."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86q

from autoq.dispatch.engine import quantized_engine
from autoq.recipes.pt2e import Lowered, export_graph, float32_outputs


@torch.no_grad()
def default_fx_ptq(model: torch.nn.Module, example_inputs: tuple, calib_batches: Iterable[tuple],
                   engine: str = "x86") -> torch.fx.GraphModule:
    """PyTorch's untuned FX post-training quantization: default qconfig mapping, calibrate, convert."""
    with warnings.catch_warnings(), quantized_engine(engine):
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(engine), example_inputs)
        for batch in calib_batches:
            prepared(*batch)
        return convert_fx(prepared)


@torch.no_grad()
def default_pt2e(model: torch.nn.Module, example_inputs: tuple, calib_batches: Iterable[tuple], *,
                 dynamic: bool = False, mixed_bf16: bool = False) -> torch.nn.Module:
    """torchao's documented PT2E flow, untuned: torch.export, X86InductorQuantizer defaults,
    calibrate, convert, torch.compile with freezing (compiled here, on the first call).

    The graph is exported with a dynamic batch dimension and its dead code dropped, as autoq does:
    without that, models with unused outputs (a BERT pooler) fail in prepare_pt2e.
    """
    graph = export_graph(copy.deepcopy(model).eval(), example_inputs)
    quantizer = x86q.X86InductorQuantizer().set_global(
        x86q.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(graph, quantizer)
        for batch in calib_batches:
            prepared(*batch)
        model = Lowered(convert_pt2e(prepared), example_inputs, mixed_bf16=mixed_bf16, cpp_wrapper=False)
    model(*example_inputs)
    return model


def default_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """PyTorch's default dynamic quantization: `quantize_dynamic` of every Linear/LSTM/GRU, per-tensor weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8)


class _Bf16Autocast(nn.Module):
    """Runs `inner` under CPU bf16 autocast without autograd; floating outputs come back as float32."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: object) -> object:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return float32_outputs(self.inner(*args))


def bf16_autocast(model: torch.nn.Module, example_inputs: tuple, *, compile: bool) -> torch.nn.Module:
    """The FP32 model under bf16 autocast, the alternative users weigh int8 against: eager, or
    compiled by Inductor with freezing (compiled here, on the first call)."""
    model = copy.deepcopy(model).eval()
    if compile:
        model = Lowered(model, example_inputs, mixed_bf16=True, cpp_wrapper=False)
    else:
        model = _Bf16Autocast(model)
    with torch.no_grad():
        model(*example_inputs)
    return model
