"""OpenVINO 2026 + NNCF 3.4 and ONNX Runtime 1.31 as peers (extra `peers`; autoq never imports them).

Each peer is run the way its documentation tells a user to, on the same FP32 model, calibration batches,
validation split and metric as autoq:

- OpenVINO: `ov.convert_model(model, example_input=...)` (dynamic shapes), compiled for CPU with the
  LATENCY hint and the process's thread count; the FP32 row pins `INFERENCE_PRECISION_HINT=f32` (OpenVINO
  would otherwise run bf16 on CPUs that have it). Every OpenVINO model is also compiled reshaped to the
  deployment (timing) shape, and calls of that shape run it: a dynamic-shape model is slower.
- NNCF default PTQ: `nncf.quantize` with its defaults (subset_size 300 calibration items, one per sample).
- NNCF accuracy control: `nncf.quantize_with_accuracy_control`, max_drop 1% relative, on the whole
  validation split, one item per sample, the metric's per-sample scores returned to NNCF for its ranking.
- ONNX Runtime: the TorchScript-based exporter (opset 17, dynamic batch; ORT's quantization tools reject
  the dynamo exporter's graphs of HF encoders), `quant_pre_process`, CPU execution provider with the
  process's thread count. Static QDQ as ORT documents for CPUs: uint8 activations, int8 per-channel
  weights, and on CPUs without VNNI `reduce_range=True` (7-bit weights: the AVX2 path saturates);
  MinMax, Entropy (calibrated with 2048 histogram bins: at ORT's default 128 it equals MinMax) and
  Percentile (99.999), calibrated CALIB_CHUNK samples per pass (ORT's own calibration keeps every tensor
  of every sample: out of memory on MobileNetV2 at 224 px). On models without convolutions (transformers,
  LSTMs) only MatMul/Gemm are quantized statically (all op types would quantize the attention mask's -inf)
  and ORT dynamic runs too.

Every builder returns `(model, seconds)`: a callable taking and returning torch tensors like the FP32
model (so the benchmark times and scores it like any other), and the wall seconds its tuning took.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from autoq.dispatch.isa import cpu_isa
from autoq.recipes.openvino_lowering import openvino_core

_INSTALL = "{} is not installed: pip install -e '.[peers]' (openvino, nncf, onnxruntime, onnx)"
VNNI_ISAS = ("amx", "avx512-vnni", "avx-vnni")
CALIB_CHUNK = 8  # samples per ORT calibration pass


def _arrays(inputs: Iterable[torch.Tensor]) -> list[np.ndarray]:
    return [x.detach().cpu().numpy() for x in inputs]


def _samples(batches: Iterable[tuple]) -> Iterator[tuple]:
    """Split batches (tuples whose tensors share their first dimension) into one tuple per sample."""
    for batch in batches:
        for row in range(batch[0].shape[0]):
            yield tuple(part[row:row + 1] for part in batch)


def _as_tuple(inputs: torch.Tensor | tuple) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


class Runtime:
    """A peer's model as the benchmark calls it: torch tensors in, the first output as a torch tensor out.
    Calls whose input shapes are `static_shapes` run `static` (compiled for them), all others `dynamic`.
    `source` is what runs, for a profiler: (openvino.Model, its CPU compile config) or an ONNX file's path."""

    def __init__(self, dynamic: Callable[[list], np.ndarray], static: Callable[[list], np.ndarray],
                 static_shapes: list[tuple], source: tuple[object, dict] | Path) -> None:
        self.dynamic, self.static, self.static_shapes, self.source = dynamic, static, static_shapes, source

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        arrays = _arrays(inputs)
        run = self.static if [a.shape for a in arrays] == self.static_shapes else self.dynamic
        return torch.from_numpy(np.array(run(arrays)))


# --- OpenVINO + NNCF ---------------------------------------------------------------------------------

class _SignalStack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


@contextlib.contextmanager
def _signal_stack_kept() -> Iterator[None]:
    """Within: OpenVINO work that may make and drop Cores (NNCF does). On CPUs with AMX, each Core's CPU
    plugin sets the thread's alternate signal stack to a buffer it frees when the Core goes, leaving the
    stack pointing at freed memory: the next signal Python handles (Ctrl-C, SIGTERM) then crashes the
    process (OpenVINO 2026.4 on a Xeon with AMX). The stack in place before (the long-lived `openvino_core`'s, or
    none) is put back after."""
    libc = ctypes.CDLL(None)
    saved = _SignalStack()
    libc.sigaltstack(None, ctypes.byref(saved))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


def _openvino():
    try:
        import openvino
    except ImportError as error:
        raise ImportError(_INSTALL.format("OpenVINO")) from error
    openvino_core()  # the process's one Core: its signal stack is the one `_signal_stack_kept` puts back
    return openvino


def _ov_runner(ov_model, config: dict) -> Callable[[list], np.ndarray]:
    compiled = openvino_core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()

    def run(arrays: list) -> np.ndarray:
        request.infer(arrays)
        return request.get_output_tensor(0).data
    return run


def _ov_runtime(ov_model, example_inputs: tuple, precision: str | None = None) -> Runtime:
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    static = ov_model.clone()
    static.reshape({index: list(x.shape) for index, x in enumerate(example_inputs)})
    shapes = [tuple(x.shape) for x in example_inputs]
    return Runtime(_ov_runner(ov_model, config), _ov_runner(static, config), shapes, (ov_model, config))


def _ov_model(model: torch.nn.Module, example_inputs: tuple):
    return _openvino().convert_model(model, example_input=example_inputs)


def openvino_fp32(model: torch.nn.Module, example_inputs: tuple) -> tuple[Runtime, float]:
    """The FP32 model converted to OpenVINO, run in f32."""
    started = time.perf_counter()
    runtime = _ov_runtime(_ov_model(model, example_inputs), example_inputs, precision="f32")
    return runtime, time.perf_counter() - started


def _nncf():
    _openvino()
    try:
        import nncf
    except ImportError as error:
        raise ImportError(_INSTALL.format("NNCF")) from error
    return nncf


def _calibration(calib: list):
    nncf = _nncf()
    return nncf.Dataset([_arrays(sample) for sample in _samples(_as_tuple(batch) for batch in calib)])


def nncf_default(model: torch.nn.Module, example_inputs: tuple, calib: list) -> tuple[Runtime, float]:
    """NNCF's default post-training quantization of the OpenVINO model."""
    started = time.perf_counter()
    with _signal_stack_kept():
        quantized = _nncf().quantize(_ov_model(model, example_inputs), _calibration(calib))
    return _ov_runtime(quantized, example_inputs), time.perf_counter() - started


def nncf_accuracy_control(model: torch.nn.Module, example_inputs: tuple, calib: list, val_batches: list,
                          score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          max_drop: float = 0.01) -> tuple[Runtime, float]:
    """NNCF's quantization with accuracy control: layers go back to float, most harmful first, until the
    validation metric (the mean of `score` over `val_batches`' samples) is within `max_drop` (relative)."""
    nncf = _nncf()
    items = [(_arrays(inputs), labels) for *inputs, labels in
             _samples(_as_tuple(inputs) + (labels,) for inputs, labels in val_batches)]

    def validate(compiled, data: Iterable) -> tuple[float, list[float]]:
        scores = [float(score(torch.from_numpy(np.array(compiled(inputs)[0])), labels)) for inputs, labels in data]
        return float(np.mean(scores)), scores

    started = time.perf_counter()
    with _signal_stack_kept():
        quantized = nncf.quantize_with_accuracy_control(
            _ov_model(model, example_inputs), _calibration(calib), nncf.Dataset(items, lambda item: item[0]),
            validate, max_drop=max_drop, drop_type=nncf.DropType.RELATIVE)
    return _ov_runtime(quantized, example_inputs), time.perf_counter() - started


# --- ONNX Runtime --------------------------------------------------------------------------------------

def _ort():
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(_INSTALL.format("ONNX Runtime")) from error
    return onnxruntime


def _ort_runtime(path: Path, example_inputs: tuple) -> Runtime:
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]

    def run(arrays: list) -> np.ndarray:
        return session.run(None, dict(zip(names, arrays)))[0]
    return Runtime(run, run, [tuple(x.shape) for x in example_inputs], path)


class OnnxModel:
    """The FP32 model exported once for ONNX Runtime (opset 17, dynamic batch) and pre-processed for its
    quantization tools, in a folder that lives as long as this object."""

    def __init__(self, model: torch.nn.Module, example_inputs: tuple) -> None:
        _ort()
        from onnxruntime.quantization.shape_inference import quant_pre_process
        started = time.perf_counter()
        self._folder = tempfile.TemporaryDirectory(prefix="autoq-bench-onnx-")
        self.folder = Path(self._folder.name)
        self.example_inputs = example_inputs
        self.names = [f"input{i}" for i in range(len(example_inputs))]
        exported = self.folder / "exported.onnx"
        torch.onnx.export(model, example_inputs, str(exported), dynamo=False, opset_version=17,
                          input_names=self.names, output_names=["output"],
                          dynamic_axes={name: {0: "batch"} for name in [*self.names, "output"]})
        self.path = self.folder / "fp32.onnx"
        quant_pre_process(str(exported), str(self.path))
        self.export_seconds = time.perf_counter() - started

    def fp32(self) -> tuple[Runtime, float]:
        return _ort_runtime(self.path, self.example_inputs), self.export_seconds

    def _reader(self, calib: list):
        from onnxruntime.quantization import CalibrationDataReader
        feeds = iter([dict(zip(self.names, _arrays(_as_tuple(batch)))) for batch in calib])

        class Reader(CalibrationDataReader):
            def get_next(self) -> dict | None:
                return next(feeds, None)
        return Reader()

    def static(self, calib: list, method: str, matmul_only: bool) -> tuple[Runtime, float]:
        """ORT static QDQ with `method` ("MinMax", "Entropy" or "Percentile"), as ORT documents for CPUs.

        Calibrated here, CALIB_CHUNK samples per pass, and the ranges handed to quantize_static: its own
        calibration keeps every tensor of the model for every calibration sample until the end (MobileNetV2
        at 224 px ran a 24 GB machine out of memory), and it cannot set Entropy's bin count."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
        started = time.perf_counter()
        calibrate = getattr(CalibrationMethod, method)
        op_types = ["MatMul", "Gemm"] if matmul_only else None
        options = {"num_bins": 2048, "num_quantized_bins": 128} if method == "Entropy" else {}
        calibrator = create_calibrator(self.path, op_types, self.folder / f"augmented-{method}.onnx", calibrate,
                                       extra_options=options)
        samples = list(_samples(_as_tuple(batch) for batch in calib))
        for start in range(0, len(samples), CALIB_CHUNK):
            chunk = tuple(torch.cat(parts) for parts in zip(*samples[start:start + CALIB_CHUNK]))
            calibrator.collect_data(self._reader([chunk]))
        cache = self.folder / f"{method}-ranges.json"
        save_tensors_data(calibrator.compute_data(), cache)
        out = self.folder / f"static-{method}.onnx"
        quantize_static(str(self.path), str(out), None, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=cpu_isa() not in VNNI_ISAS, calibrate_method=calibrate,
                        op_types_to_quantize=op_types, calibration_cache_path=cache)
        return _ort_runtime(out, self.example_inputs), self.export_seconds + time.perf_counter() - started

    def dynamic(self) -> tuple[Runtime, float]:
        """ORT dynamic quantization of the MatMul/Gemm weights (activations ranged per call)."""
        from onnxruntime.quantization import QuantType, quantize_dynamic
        started = time.perf_counter()
        out = self.folder / "dynamic.onnx"
        quantize_dynamic(str(self.path), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=cpu_isa() not in VNNI_ISAS, op_types_to_quantize=["MatMul", "Gemm"])
        return _ort_runtime(out, self.example_inputs), self.export_seconds + time.perf_counter() - started
