"""The PT2E + Inductor recipes on a real trained model (an MLP on sklearn digits) and BERT-like structure."""

import optuna
import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86q

import autoq
from autoq.capture import TraceError
from autoq.plan import QuantPlan
from autoq.recipes.arms import applicable_arms
from autoq.recipes.openvino_lowering import OpenVinoLowered
from autoq.recipes.pt2e import Lowered, Pt2eBuilder
from autoq.search.study import DROPPED_ATTR, DROPPED_RECIPES_ATTR
from autoq.search.policy import dominated_recipes

from conftest import fast_settings, state_of
from nets import MLP

DEQUANTIZE_WEIGHT = torch.ops.quantized_decomposed.dequantize_per_channel.default
QUANTIZE_ACTIVATION = torch.ops.quantized_decomposed.quantize_per_tensor.default


class Encoder(nn.Module):
    """BERT-like: returns its hidden states and a pooled output (Linear -> Tanh) nobody uses."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 16)
        self.pooler = nn.Sequential(nn.Linear(16, 16), nn.Tanh())

    def forward(self, x):
        hidden = self.layer(x)
        return hidden, self.pooler(hidden[:, 0])


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        hidden, _ = self.encoder(x)
        return self.head(hidden.mean(1))


@pytest.fixture(scope="module")
def mlp(digits):
    return digits.train(MLP())


@pytest.fixture(scope="module")
def static_builder(digits, mlp):
    return Pt2eBuilder(mlp, (digits.x[:1],), [(batch,) for batch in digits.calib], recipe="pt2e-static")


def _quantized_weights(graph: torch.fx.GraphModule) -> int:
    return sum(node.target == DEQUANTIZE_WEIGHT for node in graph.graph.nodes)


def _activation_scales(graph: torch.fx.GraphModule) -> list[float]:
    return [node.args[1] for node in graph.graph.nodes if node.target == QUANTIZE_ACTIVATION]


def test_compiled_int8_model_is_accurate_on_any_batch_size_and_the_user_model_is_untouched(digits, mlp):
    before = state_of(mlp)
    for recipe in ("pt2e-static", "pt2e-dynamic"):
        builder = Pt2eBuilder(mlp, (digits.x[:1],), [(batch,) for batch in digits.calib], recipe=recipe)
        assert builder.layers == ["body.1", "body.3", "head"]
        model = builder.build(QuantPlan(recipe=recipe))
        assert isinstance(model, Lowered)
        assert digits.accuracy(model) >= digits.accuracy(mlp) - 0.02  # 597 samples at once: a new batch size
        assert model(digits.x[:1]).shape == (1, 10)
    assert all(torch.equal(value, before[name]) for name, value in mlp.state_dict().items())


def test_fallbacks_keep_layers_fp32_and_observers_set_the_ranges(static_builder):
    full = static_builder.reference(QuantPlan(recipe="pt2e-static"))
    assert _quantized_weights(full) == 3
    partial = static_builder.reference(QuantPlan(recipe="pt2e-static", fp32_layers=["head"]))
    assert _quantized_weights(partial) == 2
    minmax = _activation_scales(static_builder.reference(QuantPlan(recipe="pt2e-static", activation_observer="minmax")))
    clipped = _activation_scales(static_builder.reference(
        QuantPlan(recipe="pt2e-static", activation_observer="percentile", percentile=99.0)))
    assert len(minmax) == len(clipped) > 0
    assert all(c <= m for c, m in zip(clipped, minmax)) and clipped != minmax
    with pytest.raises(ValueError, match="not linear/conv layers"):
        static_builder.reference(QuantPlan(recipe="pt2e-static", fp32_layers=["nope"]))


class PooledCNN(nn.Module):
    """Conv -> pooling -> flatten -> Linear: the quantizer shares one observer between a pooling op's input
    and output (and, once the head stays FP32, adds observers on tensors the full plan never observes)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x))


def test_every_single_layer_fallback_of_a_pooled_cnn_is_calibrated_and_accurate(digits):
    cnn = digits.train(PooledCNN(), epochs=80)
    builder = Pt2eBuilder(cnn, (digits.x[:1],), [(batch,) for batch in digits.calib], recipe="pt2e-static")
    assert builder.layers == ["features.0", "features.2", "head"]
    fp32 = digits.accuracy(cnn)
    assert fp32 > 0.8
    for layer in [None, *builder.layers]:
        plan = QuantPlan(recipe="pt2e-static", fp32_layers=[layer] if layer else [])
        graph = builder.reference(plan)
        scales = _activation_scales(graph)
        assert len(scales) > 0 and all(0 < scale < 1 for scale in scales), (layer, scales)
        assert digits.accuracy(graph) >= fp32 - 0.03, layer


def test_mixed_bf16_and_cpp_wrapper_build_and_return_float32(digits, mlp, static_builder):
    model = static_builder.build(QuantPlan(recipe="pt2e-static", mixed_bf16=True, cpp_wrapper=True))
    output = model(digits.x[:4])
    assert output.dtype == torch.float32
    assert digits.accuracy(model) >= digits.accuracy(mlp) - 0.03


@pytest.mark.isa
def test_unused_outputs_are_dropped_so_prepare_pt2e_works():
    model, x = Classifier().eval(), (torch.randn(2, 5, 16),)
    quantizer = x86q.X86InductorQuantizer().set_global(x86q.get_default_x86_inductor_quantization_config())
    with pytest.raises(IndexError):  # the trap: the dead pooler breaks torchao's prepare
        prepare_pt2e(torch.export.export(model, x, strict=False).module(), quantizer)
    builder = Pt2eBuilder(model, x, [x], recipe="pt2e-static")
    assert builder.layers == ["encoder.layer", "head"]
    int8 = builder.build(QuantPlan(recipe="pt2e-static"))
    assert torch.allclose(int8(*x), model(*x), atol=0.05)


class Residual(nn.Module):
    """torchvision ResNet's block: conv-BN, then an in-place `out += identity` before the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.stem, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 64, 10)

    def forward(self, x):
        identity = self.relu(self.stem(x))
        out = self.bn(self.conv(identity))
        out += identity
        return self.head(torch.flatten(self.relu(out), 1))


def test_in_place_residual_adds_are_exported_so_the_quantizer_can_match_them(digits):
    model = digits.train(Residual(), epochs=40)
    quantizer = x86q.X86InductorQuantizer().set_global(x86q.get_default_x86_inductor_quantization_config())
    with pytest.raises(ValueError, match="more than one output node"):  # the trap of a non-strict export
        prepare_pt2e(torch.export.export(model, (digits.x[:2],), strict=False).module(), quantizer)
    builder = Pt2eBuilder(model, (digits.x[:1],), [(batch,) for batch in digits.calib], recipe="pt2e-static")
    assert builder.layers == ["stem", "conv", "head"]
    assert digits.accuracy(builder.build(QuantPlan(recipe="pt2e-static"))) >= digits.accuracy(model) - 0.03


def test_auto_skips_pt2e_with_the_reason_when_the_quantizer_cannot_prepare_the_graph(monkeypatch, digits, mlp):
    def fails(*args, **kwargs):
        raise ValueError("Input partition has more than one output node")

    monkeypatch.setattr("autoq.recipes.pt2e.prepare_pt2e", fails)
    arms = applicable_arms(mlp, (digits.x[:1],), [(batch,) for batch in digits.calib], ["auto"])
    assert "pt2e-static" not in arms.recipes and "static" in arms.recipes
    assert "X86InductorQuantizer could not prepare" in arms.skipped["pt2e-static"]
    assert "more than one output node" in arms.skipped["pt2e-static"]
    with pytest.raises(TraceError, match="recipes=\\['static', 'dynamic'\\]"):
        applicable_arms(mlp, (digits.x[:1],), [(batch,) for batch in digits.calib], ["pt2e-static"])


def test_quantize_save_and_load_a_pt2e_plan(tmp_path, digits, mlp):
    plan = QuantPlan(recipe="pt2e-static", fp32_layers=["head"], activation_observer="minmax")
    model = autoq.quantize(mlp, plan, digits.x[:1], digits.calib)
    autoq.save(model, tmp_path / "m.autoq")
    loaded = autoq.load(tmp_path / "m.autoq", mlp)
    assert isinstance(loaded, Lowered)
    assert QuantPlan.from_dict(loaded.meta["autoq"]["plan"]) == plan
    assert torch.equal(loaded(digits.x[:16]), model(digits.x[:16]))  # recompiled: the same int8 graph
    with pytest.raises(ValueError, match="Inductor picks its kernels"):
        autoq.quantize(mlp, plan, digits.x[:1], digits.calib, dispatch="shipped")


def test_pinned_pt2e_tuning_meets_the_budget(tmp_path, digits, mlp):
    result = autoq.tune(mlp, digits.x[:1], digits.calib, digits.accuracy, n_trials=3,
                        space={"recipes": ["pt2e-static"]}, **fast_settings(tmp_path))
    assert result.feasible and QuantPlan.from_dict(result.plan).recipe == "pt2e-static"
    lowering = QuantPlan.from_dict(result.plan).lowering
    assert isinstance(result.model, {"inductor": Lowered, "openvino": OpenVinoLowered}[lowering])
    assert all(row["plan"]["_data"]["recipe"] == "pt2e-static" for row in result.trials)
    assert all(name.startswith("pt2e-static:") for row in result.trials for name in row["params"])


def test_a_recipe_is_dropped_only_when_another_is_clearly_faster_and_as_accurate():
    best = {"static": {"speedup": 2.0, "loss": 0.002}, "dynamic": {"speedup": 1.2, "loss": 0.001},
            "pt2e-static": {"speedup": 2.2, "loss": 0.03}}
    dropped = dominated_recipes(best, max_loss=0.01)
    assert set(dropped) == {"dynamic"} and "static is 1.67x faster" in dropped["dynamic"]
    # pt2e-static is faster than static, but over budget and less accurate: nothing drops static
    assert dominated_recipes({"a": {"speedup": 1.0, "loss": 0.02}, "b": {"speedup": 2.0, "loss": 0.05}}, 0.01) == {}
    # a recipe that loses over 10x another's loss (MobileNetV2's PT2E: 86% where static lost 6.8%) is dropped,
    # however fast; 10x the budget is the least counted as hopeless
    hopeless = dominated_recipes({"static": {"speedup": 1.8, "loss": 0.068},
                                  "pt2e-static": {"speedup": 2.0, "loss": 0.86}}, 0.01)
    assert set(hopeless) == {"pt2e-static"} and "over 10x" in hopeless["pt2e-static"]
    assert dominated_recipes({"a": {"speedup": 1.0, "loss": 0.0}, "b": {"speedup": 2.0, "loss": 0.09}}, 0.01) == {}


def test_trials_of_a_dropped_recipe_run_nothing_and_do_not_count(tmp_path, digits, mlp):
    settings = fast_settings(tmp_path, study_name="dropping", n_trials=4,
                             space={"recipes": ["static", "dynamic"], "engines": ["x86"]})
    study = optuna.create_study(study_name="dropping", storage=settings["storage"], direction="maximize")
    study.set_user_attr(DROPPED_RECIPES_ATTR, {"dynamic": "measured clearly worse (set by this test)"})
    result = autoq.tune(mlp, digits.x[:1], digits.calib, digits.accuracy, resume=False, **settings)
    assert len(result.trials) == 4 and all(row["plan"]["_data"]["recipe"] == "static" for row in result.trials)
    dropped = [t for t in optuna.load_study(study_name="dropping", storage=settings["storage"]).trials
               if t.user_attrs.get(DROPPED_ATTR)]
    assert dropped and all(t.user_attrs[DROPPED_ATTR] == "dynamic" and "metric" not in t.user_attrs for t in dropped)
