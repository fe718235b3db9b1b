"""The benchmark's peers (benchmarks/peers.py): OpenVINO + NNCF and ONNX Runtime run a PyTorch model as
the benchmark calls it (torch tensors in and out, any batch), with outputs that match FP32 where they
should, and a table row that says the tool reports no trial count."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from core import Row, Tuning, table  # noqa: E402
from peers import OnnxModel, nncf_accuracy_control, nncf_default, openvino_fp32  # noqa: E402


@pytest.fixture(scope="module")
def net():
    """A small conv net with BatchNorm, its deployment batch of 1, and calibration/validation batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 4)).eval()
    images = torch.randn(96, 1, 8, 8)
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    calib = [images[i:i + 16] for i in range(0, 32, 16)]
    val = [(images[i:i + 32], labels[i:i + 32]) for i in range(32, 96, 32)]
    return model, (images[:1],), calib, val


def _top1(outputs, labels):
    return (outputs.argmax(dim=1) == labels).float()


@pytest.mark.parametrize("build", ["openvino", "onnxruntime"])
def test_fp32_peers_match_pytorch_at_the_deployment_shape_and_at_other_batches(net, build):
    model, example, _, _ = net
    runtime, seconds = openvino_fp32(model, example) if build == "openvino" else OnnxModel(model, example).fp32()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        for inputs in (example[0], x):
            output = runtime(inputs)
            assert isinstance(output, torch.Tensor) and output.shape == (inputs.shape[0], 4)
            torch.testing.assert_close(output, model(inputs), atol=1e-4, rtol=1e-4)
    assert seconds > 0


def test_quantized_peers_run_int8_models_that_keep_the_top1_of_an_easy_task(net):
    model, example, calib, val = net
    onnx = OnnxModel(model, example)
    built = {"nncf": nncf_default(model, example, calib),
             "nncf-ac": nncf_accuracy_control(model, example, calib, val, _top1),
             **{method: onnx.static(calib, method, matmul_only=False)
                for method in ("MinMax", "Entropy", "Percentile")},
             "dynamic": onnx.dynamic()}
    for name, (runtime, seconds) in built.items():
        agreement = torch.cat([_top1(runtime(x), y) for x, y in val]).mean()
        assert agreement >= 0.75, name  # labels are FP32's own top-1: int8 must mostly agree
        assert runtime(example[0]).shape == (1, 4) and seconds > 0
    ops = {node.op_type for node in __import__("onnx").load(onnx.folder / "static-Entropy.onnx").graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops  # a QDQ model, not a copy of FP32


def test_a_peer_without_a_trial_count_prints_a_dash():
    rows = [Row("cnn", "FP32 eager", 0.9, 0.9, 0.0, 2.0, 1.0, 1.0),
            Row("cnn", "ORT static MinMax", 0.9, 0.9, 0.0, 1.0, 2.0, 2.0, Tuning("QDQ", None, None, None, 4.2))]
    cells = [c.strip() for c in table(rows)[3].split("|")[1:-1]]
    assert cells[10:] == ["-", "-", "4"]


@pytest.mark.parametrize("build", ["pytorch", "openvino", "onnxruntime"])
def test_the_op_profile_sees_inside_each_runtime(net, build):
    from op_profile import op_times, section
    model, example, _, _ = net
    onnx = OnnxModel(model, example)  # its folder holds the ONNX file while it lives
    runtime = {"pytorch": model, "openvino": openvino_fp32(model, example)[0], "onnxruntime": onnx.fp32()[0]}[build]
    profiler, ops = op_times(runtime, example, calls=5)
    assert profiler.startswith({"pytorch": "torch.profiler", "openvino": "OpenVINO", "onnxruntime": "ONNX"}[build])
    assert any("conv" in op.lower() for op in ops), sorted(ops)  # each names the conv (fused or not)
    assert all(calls > 0 and ms >= 0 for calls, ms in ops.values())
    assert any("| op [kernel] |" in line for line in section(build, runtime, example, calls=5))
