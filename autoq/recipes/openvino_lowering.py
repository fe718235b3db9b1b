"""A PT2E plan's int8 graph lowered by OpenVINO instead of Inductor (plan.lowering='openvino'; extra `openvino`).

The graph is the one the Inductor lowering compiles (torch.export, X86InductorQuantizer with the plan's
ranges, fallbacks and bias correction, convert_pt2e), so the quantization is the same and only the
lowering changes: exported again, it is converted by `openvino.convert_model`, which turns each
quantize/dequantize pair into int8 ops of OpenVINO's CPU plugin. The converter does not take
convert_pt2e's folded weights (an int8 constant, then a dequantize: the conv gets an int8 input), so
`unfold_weights` first puts back the float weight each one dequantizes to, quantized again in the graph
(the same int8 values).

One OpenVINO Core serves the process and is never dropped: on CPUs with AMX its CPU plugin points the
thread's alternate signal stack at a buffer it frees with the Core, and the next signal Python handles
(Ctrl-C) then crashes the process (OpenVINO 2026.4).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from autoq.recover.graph_bias import attr_value

_QUANTIZE_OF = {torch.ops.quantized_decomposed.dequantize_per_channel.default:
                (torch.ops.quantized_decomposed.quantize_per_channel.default, 7),
                torch.ops.quantized_decomposed.dequantize_per_tensor.default:
                (torch.ops.quantized_decomposed.quantize_per_tensor.default, 6)}  # and its argument count


def openvino_available() -> bool:
    """Whether OpenVINO is installed (`pip install 'autoq[openvino]'`)."""
    return importlib.util.find_spec("openvino") is not None


@functools.cache
def openvino_core():
    """The process's OpenVINO Core, its CPU plugin loaded (see the module docstring); the only one autoq and its
    benchmarks make."""
    try:
        import openvino
    except ImportError as error:
        raise ImportError("lowering='openvino' needs OpenVINO: pip install 'autoq[openvino]', or search "
                          "space={'lowerings': ['inductor']}.") from error
    core = openvino.Core()
    core.get_property("CPU", "FULL_DEVICE_NAME")  # loads the plugin now
    return core


def unfold_weights(graph: fx.GraphModule) -> fx.GraphModule:
    """A copy of a converted PT2E graph whose int8 weight constants are float weights quantized in the graph:
    each `dequantize(w_int8, ...)` becomes `dequantize(quantize(dequantize(w_int8), ...), ...)` with the inner
    dequantize computed here, so the same int8 values reach the same dequantize."""
    graph = copy.deepcopy(graph)
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target not in _QUANTIZE_OF or node.args[0].op != "get_attr":
            continue
        quantize, n_args = _QUANTIZE_OF[node.target]
        args = [attr_value(graph, arg) for arg in node.args[:n_args]]
        if not isinstance(args[0], torch.Tensor) or args[0].is_floating_point():
            continue
        name = f"_autoq_float_{node.args[0].target.replace('.', '_')}"
        graph.register_buffer(name, node.target(*args))
        with graph.graph.inserting_before(node):
            weight = graph.graph.get_attr(name)
            quantized = graph.graph.call_function(quantize, (weight, *node.args[1:n_args]))
        node.args = (quantized, *node.args[1:])
    graph.graph.eliminate_dead_code()
    graph.delete_all_unused_submodules()
    graph.recompile()
    return graph


class OpenVinoLowered(nn.Module):
    """A converted PT2E graph run by OpenVINO: compiled for the example inputs' shapes (the deployment shape)
    and once with a dynamic batch for any other; torch tensors in and out, as the graph's outputs.

    `graph` (the converted graph, not run) carries the model's numbers, as an Inductor-lowered model's does;
    `ov_model` is the OpenVINO model (dynamic batch) and `config` its CPU compile configuration.
    """

    def __init__(self, graph: fx.GraphModule, program: torch.export.ExportedProgram, example_inputs: tuple, *,
                 mixed_bf16: bool) -> None:
        """program: `graph` with its weights unfolded (`unfold_weights`), exported with a dynamic batch."""
        super().__init__()
        import openvino
        self.graph, self.example_inputs, self.mixed_bf16 = graph, example_inputs, mixed_bf16
        self.meta: dict = {}  # model.meta['autoq'] holds the plan (autoq.dispatch.apply.carrying_plan)
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                       "INFERENCE_PRECISION_HINT": "bf16" if mixed_bf16 else "f32"}
        self._out_spec = program.call_spec.out_spec
        self.ov_model = openvino.convert_model(program)
        static = self.ov_model.clone()
        static.reshape({index: list(x.shape) for index, x in enumerate(example_inputs)})
        self._static_shapes = [tuple(x.shape) for x in example_inputs]
        self._static, self._dynamic = self._request(static), self._request(self.ov_model)

    def save_ir(self, path: Path) -> None:
        """Write the OpenVINO model (dynamic batch) as OpenVINO IR: `path` (.xml) and its .bin beside it."""
        import openvino
        openvino.save_model(self.ov_model, str(path), compress_to_fp16=False)

    def _request(self, model):
        return openvino_core().compile_model(model, "CPU", self.config).create_infer_request()

    def forward(self, *args: torch.Tensor) -> object:
        arrays = [np.ascontiguousarray(x.detach().cpu().numpy()) for x in args]
        request = self._static if [a.shape for a in arrays] == self._static_shapes else self._dynamic
        request.infer(arrays)
        outputs = [torch.from_numpy(np.array(tensor.data)) for tensor in request.output_tensors]
        return pytree.tree_unflatten(outputs, self._out_spec)
