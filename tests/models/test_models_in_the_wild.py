"""Models as users write them: subclassed layers, padding modules, functional calls, unused
outputs, static and data-dependent Python control flow."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn import quantized as nnq

import autoq
from autoq.plan import QuantPlan
from conftest import fast_settings


class PlainSubclassConv(nn.Conv2d):
    """A subclass that only adds a name."""


class HalvingConv(nn.Conv2d):
    """A subclass with its own forward."""

    def forward(self, x):
        return super().forward(x) * 0.5


class Messy(nn.Module):
    def __init__(self, residual: bool = True):
        super().__init__()
        self.pad = nn.ZeroPad2d(1)
        self.conv1 = PlainSubclassConv(1, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = HalvingConv(16, 16, 3, padding=1)
        self.aux_head = nn.Linear(64, 4)  # computed, never used
        self.weight = nn.Parameter(torch.randn(10, 64) * 0.1)
        self.bias = nn.Parameter(torch.zeros(10))
        self.residual = residual  # Python control flow on configuration: traceable

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(self.pad(x))))
        if self.residual:
            x = x + F.relu(self.conv2(x))
        pooled = F.adaptive_avg_pool2d(x, 2).flatten(1)
        _unused = self.aux_head(pooled)
        return F.linear(pooled, self.weight, self.bias)


class Router(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this."""

    def __init__(self):
        super().__init__()
        self.bright = nn.Conv2d(16, 16, 3, padding=1)
        self.dark = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0.5:
            return self.bright(x)
        return self.dark(x)


class WithRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.router = Router()
        self.head = nn.Linear(16 * 64, 10)

    def forward(self, x):
        return self.head(F.relu(self.router(self.stem(x))).flatten(1))


def test_messy_model_is_tuned_and_quantized(digits, tmp_path):
    model = digits.train(Messy())
    assert digits.accuracy(model) > 0.85
    # FX static (PT2E names layers its own way; which recipe wins depends on the CPU)
    result = autoq.tune(model, (digits.x[:1],), digits.calib, digits.accuracy, n_trials=6,
                        **fast_settings(tmp_path, space=autoq.SearchSpace(recipes=["static"])))
    assert result.feasible
    # the plain subclass becomes a real (fusable) layer, the overriding subclass and the functional
    # linear are tunable layers too, and the unused head is dropped
    assert [layer["name"] for layer in result.layers] == ["conv1", "conv2", "<root>:linear#0"]
    assert "aux_head" not in str(result.model.graph)
    with torch.no_grad():
        assert result.model(digits.x[:5]).shape == (5, 10)
    # per-layer kernels are measured for int8 modules; conv2 (forward overridden) and the functional
    # linear become functional int8 ops, which follow the plan's engine
    measured = next(t for t in result.trials if t["params"].get("engine") == "measured")
    assert measured["state"] != "FAIL"
    assert set(QuantPlan.from_dict(measured["plan"]).layer_engines) == {"conv1"}


def test_functional_and_subclassed_layers_fall_back_individually(digits):
    model = digits.train(Messy())
    for layer in ("conv1", "conv2", "<root>:linear#0"):
        quantized = autoq.quantize(model, autoq.QuantPlan(fp32_layers=[layer]), (digits.x[:1],), digits.calib)
        ops = [str(node.target) for node in quantized.graph.nodes if node.op in ("call_function", "call_module")]
        int8_convs = sum("quantized.conv2d" in op for op in ops) + sum(
            isinstance(m, nnq.Conv2d) for m in quantized.modules())
        int8_linears = sum("quantized.linear" in op for op in ops)
        assert (int8_convs, int8_linears) == ((2, 0) if layer.endswith("#0") else (1, 1)), layer
    assert type(model.conv1) is PlainSubclassConv  # the user's model keeps its classes


def test_untraceable_submodule_is_named_with_the_fix(digits, tmp_path):
    model = digits.train(WithRouter(), epochs=20)
    calls = []

    def eval_fn(m):
        calls.append(1)
        return digits.accuracy(m)

    with pytest.raises(autoq.TraceError, match=r"module 'router' \(Router\).*non_traceable_modules=\['router'\]"):
        autoq.tune(model, (digits.x[:1],), digits.calib, eval_fn, n_trials=2, space={"recipes": ["static"]},
                   **fast_settings(tmp_path))
    # with the default recipes ('auto') the model is still tuned, dynamically (no capture needed),
    # and the result says why static was skipped and how to fix it
    result = autoq.tune(model, (digits.x[:1],), digits.calib, eval_fn, n_trials=2, space={"precisions": ["int8"]},
                        **fast_settings(tmp_path))
    assert result.plan["_data"]["recipe"] == "dynamic"
    assert any("static skipped" in note and "non_traceable_modules=['router']" in note for note in result.notes)


def test_non_traceable_module_stays_fp32_and_the_rest_is_quantized(digits, tmp_path):
    model = digits.train(WithRouter(), epochs=20)
    result = autoq.tune(model, (digits.x[:1],), digits.calib, digits.accuracy, n_trials=3,
                        non_traceable_modules=["router"], space={"precisions": ["int8"]}, **fast_settings(tmp_path))
    assert isinstance(result.model.get_submodule("router"), Router)
    assert isinstance(result.model.get_submodule("router").bright, nn.Conv2d)
    assert any(isinstance(m, nnq.Linear) for m in result.model.modules())
    assert [layer["name"] for layer in result.layers] == ["stem.0", "head"]
