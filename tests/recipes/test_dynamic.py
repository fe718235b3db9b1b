"""The dynamic recipe on real trained models (sklearn digits): an MLP and an LSTM reading image rows."""

import pytest
import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn

import autoq
from autoq.dispatch.table import shipped_tables
from autoq.plan import QuantPlan
from autoq.recipes.arms import applicable_arms
from autoq.recipes.dynamic import DynamicBuilder
from autoq.recipes.sensitivity import single_layer_sensitivity

from conftest import fast_settings, state_of
from nets import MLP


class MyLinear(nn.Linear):
    """A user's subclass that keeps nn.Linear's forward."""


class RowLSTM(nn.Module):
    """Reads an 8x8 digit as 8 time steps of 8 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = MyLinear(8, 32)
        self.lstm = nn.LSTM(32, 48, batch_first=True)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        rows = x.view(x.shape[0], 8, 8)
        output, _ = self.lstm(torch.relu(self.embed(rows)))
        return self.head(output[:, -1])


@pytest.fixture(scope="module")
def lstm(digits):
    return digits.train(RowLSTM(), epochs=150)


def test_builder_converts_every_linear_and_lstm_and_keeps_the_fallbacks(digits, lstm):
    before = state_of(lstm)
    builder = DynamicBuilder(lstm, (digits.x[:1],))
    assert builder.layers == ["embed", "lstm", "head"]
    model = builder.build(QuantPlan(recipe="dynamic", fp32_layers=["head"], weight_granularity="per_channel"))
    assert isinstance(model.embed, nnqd.Linear) and isinstance(model.lstm, nnqd.LSTM)
    assert type(model.head) is nn.Linear
    assert model.embed.weight().qscheme() == torch.per_channel_affine
    per_tensor = builder.build(QuantPlan(recipe="dynamic", weight_granularity="per_tensor"))
    assert per_tensor.embed.weight().qscheme() == torch.per_tensor_affine
    assert abs(digits.accuracy(model) - digits.accuracy(lstm)) <= 0.02
    assert type(lstm.embed) is MyLinear and all(torch.equal(v, before[k]) for k, v in state_of(lstm).items())
    with pytest.raises(ValueError, match="not Linear/LSTM/GRU modules"):
        builder.build(QuantPlan(recipe="dynamic", fp32_layers=["body"]))


def test_dynamic_sensitivity_ranks_every_layer_with_real_int8_kernels(digits, lstm):
    builder = DynamicBuilder(lstm, (digits.x[:1],))
    plan = QuantPlan(recipe="dynamic")
    scores = single_layer_sensitivity(lambda layer: builder.build(plan, layers=[layer]), builder.layers, lstm,
                                      [(digits.x[:64],)])
    assert set(scores) == {"embed", "lstm", "head"}
    assert all(10 < value < 80 for value in scores.values())  # int8 noise: finite, far from lossless


def test_auto_picks_recipes_by_layer_types(digits, lstm, mnist_task):
    everything = ["static", "pt2e-static", "dynamic", "pt2e-dynamic", "fp32"]  # (and bf16 where the CPU has it)
    int8 = ("int8",)
    assert applicable_arms(lstm, (digits.x[:1],), [(digits.calib[0],)], ["auto"], precisions=("int8", "fp32")
                           ).recipes == everything
    mlp = MLP().eval()
    assert applicable_arms(mlp, (digits.x[:1],), [(digits.calib[0],)], ["auto"], precisions=int8).recipes == everything[:4]
    cnn = applicable_arms(mnist_task.model, mnist_task.example_inputs, [(b,) for b in mnist_task.calib[:1]], ["auto"],
                          precisions=int8)
    assert cnn.recipes == ["static", "pt2e-static"] and "conv net" in cnn.skipped["dynamic"]
    assert "conv net" in cnn.skipped["pt2e-dynamic"] and "training data" in cnn.skipped["qat"]
    forced = applicable_arms(mnist_task.model, mnist_task.example_inputs, [(b,) for b in mnist_task.calib[:1]],
                             ["dynamic"])
    assert forced.recipes == ["dynamic"]
    with pytest.raises(ValueError, match="needs Linear, LSTM or GRU"):
        applicable_arms(nn.Sequential(nn.Conv2d(1, 2, 3)), (digits.x[:1],), [(digits.calib[0],)], ["dynamic"])


def test_tuning_an_lstm_searches_both_recipes_and_returns_a_loadable_model(digits, lstm, tmp_path):
    result = autoq.tune(lstm, (digits.x[:1],), digits.calib, digits.accuracy, n_trials=10, max_loss=0.02,
                        space={"recipes": ["static", "dynamic"]}, **fast_settings(tmp_path))
    recipes = {row["params"]["recipe"] for row in result.trials}
    assert recipes == {"static", "dynamic"}
    assert result.feasible and result.loss <= 0.02
    dynamic_rows = [row for row in result.trials if row["params"]["recipe"] == "dynamic"]
    assert all(QuantPlan.from_dict(row["plan"]).recipe == "dynamic" for row in dynamic_rows)
    plan = QuantPlan.from_dict(result.plan)
    assert [layer["name"] for layer in result.layers] == (["embed", "lstm", "head"] if plan.recipe == "dynamic"
                                                          else ["embed", "head"])
    result.save(tmp_path / "model.autoq")
    loaded = autoq.load(tmp_path / "model.autoq", lstm)
    with torch.no_grad():
        assert torch.equal(loaded(digits.x[:16]), result.model(digits.x[:16]))


def test_quantize_rebuilds_a_dynamic_plan_with_per_layer_kernels(digits, tmp_path):
    mlp = digits.train(MLP(), epochs=60)
    plan = QuantPlan(recipe="dynamic", weight_granularity="per_channel")
    table = shipped_tables()[0]  # by path: 'shipped' means this CPU's table, and CI machines vary
    model = autoq.quantize(mlp, plan, (digits.x[:1],), digits.calib, dispatch=table)
    libraries = QuantPlan.from_dict(model.meta["autoq"]["plan"]).layer_engines
    assert set(libraries) == {"body.1", "body.3", "head"} and set(libraries.values()) <= {"fbgemm", "onednn"}
    assert abs(digits.accuracy(model) - digits.accuracy(mlp)) <= 0.02
    autoq.save(model, tmp_path / "mlp.autoq")
    assert QuantPlan.from_dict(autoq.load(tmp_path / "mlp.autoq", mlp).meta["autoq"]["plan"]).recipe == "dynamic"
