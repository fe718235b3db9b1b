"""The QAT recovery arms ('qat' on FX, 'pt2e-qat' on PT2E + Inductor) on a real trained model (a CNN
with BatchNorm on sklearn digits)."""

import copy

import optuna
import pytest
import torch
from torch import nn

import autoq
from torchao.quantization import pt2e as torchao_pt2e

from autoq.plan import QuantPlan
from autoq.recipes.pt2e import Lowered
from autoq.recipes.arms import applicable_arms
from autoq.recipes.qat import Training
from autoq.config import SearchSpace
from autoq.search.space import PlanProposer
from autoq.search.study import DROPPED_RECIPES_ATTR

from conftest import fast_settings, state_of


def bn_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 64, 10))


@pytest.fixture(scope="module")
def cnn(digits):
    return digits.train(bn_cnn(), epochs=40)


def train_batches(digits):
    return [(digits.x[i:i + 100], digits.y[i:i + 100]) for i in range(0, 1200, 100)]


def training(digits, **overrides):
    return Training(**{"train_data": train_batches(digits), "loss_fn": nn.functional.cross_entropy, **overrides})


def test_qat_fine_tunes_a_copy_and_converts_with_the_plan(digits, cnn):
    before = state_of(cnn)
    arms = applicable_arms(cnn, (digits.x[:1],), [(b,) for b in digits.calib], ["qat"], training=training(digits))
    assert arms.recipes == ["qat"]
    builder = arms.builders["qat"]
    assert builder.layers == ["0", "4"]
    plan = QuantPlan(recipe="qat", qat_epochs=1, qat_lr=1e-3, fp32_layers=["4"])
    model = builder.build(plan)
    assert type(model.get_submodule("4")) is nn.Linear  # the fallback
    assert type(model.get_submodule("0")).__module__.startswith("torch.ao.nn.intrinsic.quantized")  # int8 conv+relu
    assert digits.accuracy(model) >= digits.accuracy(cnn) - 0.03
    assert builder.build(plan) is not model  # a copy of the kept fine-tune, not retrained
    assert all(torch.equal(value, before[name]) for name, value in cnn.state_dict().items())


def test_train_fn_gets_the_plans_epochs_and_lr_and_the_time_budget_stops_training(digits, cnn):
    calls = []
    custom = Training(train_fn=lambda model, epochs, lr: calls.append((type(model).__name__, epochs, lr)))
    builder = applicable_arms(cnn, (digits.x[:1],), [(b,) for b in digits.calib], ["qat"],
                              training=custom).builders["qat"]
    builder.build(QuantPlan(recipe="qat", qat_epochs=2, qat_lr=3e-4))
    assert calls == [("GraphModule", 2, 3e-4)]

    seen = []
    def loss(output, target):
        seen.append(1)
        return nn.functional.cross_entropy(output, target)
    budget = applicable_arms(cnn, (digits.x[:1],), [(b,) for b in digits.calib], ["qat"],
                             training=training(digits, loss_fn=loss, max_seconds=1e-9)).builders["qat"]
    budget.build(QuantPlan(recipe="qat", qat_epochs=3))
    assert len(seen) == 1  # stopped after the first step, not 3 epochs x 12 batches


def test_qat_needs_training_inputs_with_a_clear_error(digits, cnn):
    with pytest.raises(ValueError, match="train_fn.*train_data.*loss_fn"):
        Training(train_data=train_batches(digits))
    with pytest.raises(ValueError, match="pass train_data and loss_fn, or train_fn"):
        applicable_arms(cnn, (digits.x[:1],), [(b,) for b in digits.calib], ["qat"])
    with pytest.raises(ValueError, match=r"\(inputs, target\) pairs"):
        applicable_arms(cnn, (digits.x[:1],), [(b,) for b in digits.calib], ["qat"],
                        training=Training(train_data=[digits.x[:10]], loss_fn=nn.functional.cross_entropy)
                        ).builders["qat"].build(QuantPlan(recipe="qat"))


def test_qat_is_tried_only_when_post_training_seeds_miss_the_budget(tmp_path, digits, cnn):
    space = {"recipes": ["static", "qat"], "engines": ["x86"]}
    easy = autoq.tune(cnn, digits.x[:1], digits.calib, digits.accuracy, train_data=train_batches(digits),
                      loss_fn=nn.functional.cross_entropy, n_trials=3, space=space,
                      **fast_settings(tmp_path, study_name="easy", max_loss=0.5))
    assert all(row["plan"]["_data"]["recipe"] == "static" for row in easy.trials)
    study = optuna.load_study(study_name="easy", storage=easy.storage)
    assert "post-training quantization meets the budget" in study.user_attrs[DROPPED_RECIPES_ATTR]["qat"]

    # a budget no int8 model meets (the metric is minus the mean output error vs FP32, FP32 scores 0):
    # the QAT seed runs right after the post-training seed
    with torch.no_grad():
        reference = cnn(digits.x[1200:])

    def fidelity(model):
        return -float((model(digits.x[1200:]) - reference).abs().mean())

    hard = autoq.tune(cnn, digits.x[:1], digits.calib, fidelity, train_data=train_batches(digits),
                      loss_fn=nn.functional.cross_entropy, n_trials=3, space=space,
                      **fast_settings(tmp_path, study_name="hard", loss_type="absolute", max_loss=1e-9))
    recipes = [row["plan"]["_data"]["recipe"] for row in hard.trials]
    assert recipes[0] == "static" and "qat" in recipes
    qat_row = next(row for row in hard.trials if row["plan"]["_data"]["recipe"] == "qat")
    assert qat_row["state"] in ("COMPLETE", "PRUNED") and qat_row["speedup"] is not None


def test_the_plans_activation_range_and_weight_granularity_reach_the_int8_model(digits, cnn):
    builder = applicable_arms(cnn, (digits.x[:1],), [(b,) for b in digits.calib], ["qat"],
                              training=training(digits)).builders["qat"]

    def conv(plan):
        return builder.build(QuantPlan(recipe="qat", qat_epochs=1, **plan)).get_submodule("0")

    full, reduced = conv({"reduce_range": False}), conv({"reduce_range": True})
    # the conv's output is quantized over 256 levels, or 128 (7-bit): about twice the step
    assert 1.8 < reduced.scale / full.scale < 2.2
    assert "per_channel" in str(full.weight().qscheme())
    assert "per_tensor" in str(conv({"weight_granularity": "per_tensor"}).weight().qscheme())


def test_pt2e_qat_fine_tunes_an_exported_copy_and_compiles_it_with_fallbacks(digits, cnn):
    before = state_of(cnn)
    steps = []

    def loss(output, target):
        steps.append(1)
        return nn.functional.cross_entropy(output, target)

    arms = applicable_arms(cnn, (digits.x[:1],), [(b,) for b in digits.calib], ["pt2e-qat"],
                           training=training(digits, loss_fn=loss))
    assert arms.recipes == ["pt2e-qat"]
    builder = arms.builders["pt2e-qat"]
    assert builder.layers == ["0", "4"]
    plan = QuantPlan(recipe="pt2e-qat", qat_epochs=1, qat_lr=1e-3, fp32_layers=["0"])  # a Conv-BN kept FP32
    model = arms.build(plan)
    assert isinstance(model, Lowered) and len(steps) == 12  # one epoch of 12 batches
    targets = [str(node.target) for node in model.graph.graph.nodes]
    assert sum("dequantize_per_channel" in t for t in targets) == 1  # only the Linear's weight is int8
    assert digits.accuracy(model) >= digits.accuracy(cnn) - 0.03
    assert QuantPlan.from_dict(model.meta["autoq"]["plan"]) == plan
    again = builder.build(plan)
    assert again is not model and len(steps) == 12  # the kept fine-tune, compiled again, not retrained
    assert all(torch.equal(value, before[name]) for name, value in cnn.state_dict().items())
    assert cnn.training is False


@pytest.mark.slow  # 40 s: keeps the default suite under 20 min on AVX2-only CPUs
def test_pt2e_qat_train_fn_can_switch_the_exported_model_between_train_and_eval(digits, cnn):
    modes = []

    def train_fn(model, epochs, lr):
        model.eval()
        model.train()
        modes.append((epochs, lr))

    builder = applicable_arms(cnn, (digits.x[:1],), [(b,) for b in digits.calib], ["pt2e-qat"],
                              training=Training(train_fn=train_fn)).builders["pt2e-qat"]
    builder.build(QuantPlan(recipe="pt2e-qat", qat_epochs=2, qat_lr=3e-4))
    assert modes == [(2, 3e-4)]


def test_auto_searches_both_qat_recipes_with_training_data_and_seeds_each(digits, cnn):
    arms = applicable_arms(cnn, (digits.x[:1],), [(b,) for b in digits.calib], ["auto"], training=training(digits))
    assert {"static", "pt2e-static", "qat", "pt2e-qat"} <= set(arms.recipes)
    assert arms.builders["pt2e-qat"].twin is arms.builders["pt2e-static"]
    space = PlanProposer(SearchSpace(), arms, {recipe: arms.layers(recipe) for recipe in arms.recipes})
    plans = [space.suggest(optuna.trial.FixedTrial(params)) for params in space.qat_seeds()]
    # the longest fine-tune: epochs cost tuning time, not inference speed
    assert [(p.recipe, p.fp32_layers, p.qat_epochs) for p in plans] == [("qat", [], 3), ("pt2e-qat", [], 3)]
    assert [p.activation_observer for p in plans] == ["histogram"] * 2  # the static seeds' ranges, then learned
    assert not plans[1].cpp_wrapper and not plans[1].mixed_bf16  # X86InductorQuantizer's QAT defaults


@pytest.fixture(scope="module")
def plain_cnn(digits):
    torch.manual_seed(0)
    return digits.train(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)),
                        epochs=40)


def recording_train_fn(digits, kept, steps=12):
    """A train_fn (Adam on the digits batches) that keeps a copy of the fine-tuned fake-quant model."""
    def train_fn(model, epochs, lr):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for inputs, target in train_batches(digits)[:steps]:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), target).backward()
            optimizer.step()
        kept.append(copy.deepcopy(model))
    return train_fn


@pytest.mark.parametrize("recipe, twin_recipe, model", [("qat", "static", "cnn"),
                                                        ("pt2e-qat", "pt2e-static", "plain_cnn")])
def test_qat_before_its_first_step_is_its_static_twin(digits, recipe, twin_recipe, model, request):
    """The fine-tune starts at the ranges the post-training twin gives the same plan. (FX: exact but for
    rounding ties: QAT and static fold BatchNorm into the conv weights in different float order, and a
    weight on a tie may round the other way, moving an output by one step. PT2E's simulated
    Conv-BatchNorm folding differs from the folded conv by ~0.25%, so its case has no BatchNorm.)"""
    def observe_only(model, epochs, lr):  # one forward pass: weight fake-quants see their weights
        model.eval()
        with torch.no_grad():
            model(digits.x[:10])

    calib, trained = [(b,) for b in digits.calib], request.getfixturevalue(model)
    qat = applicable_arms(trained, (digits.x[:1],), calib, [recipe], training=Training(train_fn=observe_only))
    static = applicable_arms(trained, (digits.x[:1],), calib, [twin_recipe]).builders[twin_recipe]
    outputs = {}
    for observer in ("minmax", "kl"):
        fields = {"activation_observer": observer, "reduce_range": False}
        model = qat.builders[recipe].build(QuantPlan(recipe=recipe, **fields))
        with torch.no_grad():
            outputs[observer] = model(digits.x[1200:])
            twin = static.build(QuantPlan(recipe=twin_recipe, **fields))(digits.x[1200:])
        differ = (outputs[observer] - twin).abs()
        one_step = model.get_submodule("4").scale if recipe == "qat" else 0.0  # PT2E: exact
        assert float(differ.max()) <= 1.01 * one_step + 1e-6
        assert float((differ > 1e-6).float().mean()) < 0.1
    assert not torch.allclose(outputs["minmax"], outputs["kl"], atol=1e-3)  # the plan's observer reached QAT


@pytest.mark.isa
@pytest.mark.parametrize("recipe, model", [("qat", "cnn"), ("pt2e-qat", "plain_cnn")])
def test_the_int8_model_computes_what_the_fine_tune_simulated(digits, recipe, model, request):
    """Fake quantization trains on the grid conversion deploys (PyTorch's fused fake-quant does not:
    this test then fails, at 0.5% of the output's magnitude). PT2E's simulated Conv-BatchNorm folding
    differs from the folded int8 conv by ~0.25%, so its case is a CNN without BatchNorm."""
    kept = []
    arms = applicable_arms(request.getfixturevalue(model), (digits.x[:1],), [(b,) for b in digits.calib], [recipe],
                           training=Training(train_fn=recording_train_fn(digits, kept)))
    # where this CPU's kernels saturate on 8-bit sums (no VNNI), 7-bit weights keep them exact; elsewhere
    # PyTorch's default x86 QAT (7-bit activations), and PT2E's default (full 8-bit)
    if arms.full_range_safe("inductor" if recipe == "pt2e-qat" else "x86"):
        plan = QuantPlan(recipe=recipe, reduce_range=recipe == "qat")
    else:
        plan = QuantPlan(recipe=recipe, reduce_range=False, weight_bits=7)
    int8 = arms.builders[recipe].build(plan)
    simulated = kept[0]
    if recipe == "pt2e-qat":
        torchao_pt2e.move_exported_model_to_eval(simulated)
    else:
        simulated.eval()
    with torch.no_grad():
        expected, got = simulated(digits.x[1200:]), int8(digits.x[1200:])
    assert float((got - expected).abs().mean() / expected.abs().mean()) < 1e-3


def activation_scales(model: nn.Module) -> list[float]:
    """The activation scales of an int8 model: FX quantized modules' output scales, or the scales of a
    compiled PT2E model's quantize ops."""
    if isinstance(model, Lowered):
        return [node.args[1] for node in model.graph.graph.nodes
                if node.target == torch.ops.quantized_decomposed.quantize_per_tensor.default]
    return [module.scale for module in model.modules() if hasattr(module, "scale") and hasattr(module, "weight")]


@pytest.mark.parametrize("recipe, twin_recipe, model", [("qat", "static", "cnn"),
                                                        ("pt2e-qat", "pt2e-static", "plain_cnn")])
def test_qat_learns_its_activation_ranges_from_the_static_start(digits, recipe, twin_recipe, model, request):
    """(The start is the static twin's ranges: test_qat_before_its_first_step_is_its_static_twin.)"""
    calib, trained = [(b,) for b in digits.calib], request.getfixturevalue(model)
    qat = applicable_arms(trained, (digits.x[:1],), calib, [recipe], training=training(digits)).builders[recipe]
    static = applicable_arms(trained, (digits.x[:1],), calib, [twin_recipe]).builders[twin_recipe]
    fields = {"activation_observer": "minmax", "reduce_range": False}
    tuned = activation_scales(qat.build(QuantPlan(recipe=recipe, qat_epochs=2, qat_lr=1e-3, **fields)))
    start = activation_scales(static.build(QuantPlan(recipe=twin_recipe, **fields)))
    assert len(tuned) == len(start) > 0
    assert max(abs(t / s - 1) for t, s in zip(tuned, start)) > 0.01  # ranges moved while training
