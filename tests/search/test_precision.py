"""Precision as a search dimension: the float candidates (FP32 rewritten and compiled, bf16 where the CPU
has it) compete with the int8 plans in one study, and the result is the fastest in-budget deployment."""

import dataclasses
import hashlib
import json

import pytest
import torch
from torch import nn

import autoq
from autoq.measure.fp32 import best_float
from autoq.plan import QuantPlan
from autoq.recipes.arms import applicable_arms
from autoq.recipes.pt2e import bf16_supported
from autoq.search.study import DROPPED_ATTR, DROPPED_RECIPES_ATTR
from conftest import DigitsData, fast_settings

import optuna


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    return DigitsData()


@pytest.fixture(scope="module")
def small_mlp(digits: DigitsData) -> nn.Module:
    """A trained 64-32-10 MLP: at batch 1 its int8 plans spend more on (de)quantizing than they save
    (0.2-0.3x FP32 eager measured on AMD EPYC Zen 3, AVX2; a 0.03 ms model leaves VNNI nothing to win)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(digits.x[:1000]), digits.y[:1000]).backward()
        optimizer.step()
    return model.eval()


def _tune(model, digits, tmp_path, **settings):
    eval_data = [(digits.x[i:i + 100], digits.y[i:i + 100]) for i in range(1000, 1700, 100)]
    return autoq.tune(model, digits.x[:1], [(batch,) for batch in digits.calib], eval_data=eval_data, metric="top1",
                      **fast_settings(tmp_path, **settings))


def test_where_int8_does_not_pay_the_fp32_model_is_returned_and_int8_is_one_setting_away(small_mlp, digits, tmp_path):
    result = _tune(small_mlp, digits, tmp_path, n_trials=6)

    assert result.precision == "fp32" and result.plan["_data"]["recipe"] == "fp32"
    assert not any(type(module).__module__.startswith("torch.ao.nn.quantized") for module in result.model.modules())
    assert result.feasible and result.loss == pytest.approx(0.0, abs=1e-9)
    assert "returning the fp32" in result.summary() and "space.precisions=['int8']" in " ".join(result.notes)
    # the float seeds run first (eager only: compile_fp32=False), and are no reason to drop an int8 recipe
    recipes = [row["plan"]["_data"]["recipe"] for row in result.trials if row["plan"]]
    assert recipes[:2] == ["fp32", "fp32"] and {"static", "dynamic"} <= set(recipes)
    study = optuna.load_study(study_name=result.study_name, storage=fast_settings(tmp_path)["storage"])
    assert not study.user_attrs.get(DROPPED_RECIPES_ATTR)
    with torch.no_grad():
        assert torch.equal(result.model(digits.x[:5]), small_mlp(digits.x[:5]))

    int8 = _tune(small_mlp, digits, tmp_path, n_trials=3, space={"precisions": ["int8"]})
    assert int8.precision == "int8" and "fp32" not in {row["plan"]["_data"]["recipe"] for row in int8.trials}


def test_a_float_plan_is_measured_once_and_its_repeats_do_not_count(small_mlp, digits, tmp_path):
    result = _tune(small_mlp, digits, tmp_path, n_trials=5, space={"recipes": ["fp32"]})

    assert [QuantPlan.from_dict(row["plan"]).rewrite
            for row in result.trials if row["state"] == "COMPLETE"] == ["folded", "none"]
    study = optuna.load_study(study_name=result.study_name, storage=fast_settings(tmp_path)["storage"])
    repeats = [t for t in study.trials if t.user_attrs.get(DROPPED_ATTR)]
    assert len(repeats) == 1  # the search stops at the first repeat: nothing is left to search


def test_a_float_plan_pruned_as_slower_is_not_counted_again(mnist_task, tmp_path):
    """On the MNIST CNN (BatchNorm) the model as given runs ~0.7x its folded rewrite, so prune_slower stops
    it; drawing it again must neither count nor re-run it. (Seed 2: the sampler draws it again.)"""
    result = autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn(),
                        n_trials=5, space={"recipes": ["fp32"]}, **fast_settings(tmp_path, seed=2))

    study = optuna.load_study(study_name=result.study_name, storage=fast_settings(tmp_path)["storage"])
    counted = [t.user_attrs["plan_key"] for t in study.trials if not t.user_attrs.get(DROPPED_ATTR)]
    assert len(counted) == len(set(counted)) == 2
    pruned = {t.user_attrs["plan_key"] for t in study.trials if t.state == optuna.trial.TrialState.PRUNED
              and not t.user_attrs.get(DROPPED_ATTR)}
    repeats = [t.user_attrs["plan_key"] for t in study.trials if t.user_attrs.get(DROPPED_ATTR)]
    assert pruned and pruned & set(repeats)  # the pruned plan was drawn again, and that draw ran nothing


def test_a_float_model_saves_loads_and_refuses_another_fp32_model(small_mlp, digits, tmp_path):
    model = autoq.quantize(small_mlp, QuantPlan(recipe="fp32", rewrite="folded"), digits.x[:1], None)
    path = tmp_path / "fp32.autoq"
    autoq.save(model, path)

    loaded = autoq.load(path, small_mlp)
    with torch.no_grad():
        assert torch.allclose(loaded(digits.x[:7]), small_mlp(digits.x[:7]))
    assert QuantPlan.from_dict(loaded.meta["autoq"]["plan"]).recipe == "fp32"
    retrained = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with pytest.raises(ValueError):
        autoq.load(path, retrained)


def test_bf16_runs_under_autocast_with_float32_outputs_and_auto_searches_it_only_where_the_cpu_has_bf16(
        small_mlp, digits):
    bf16 = best_float(small_mlp, (digits.x[:1],), precision="bf16", rewrite="folded")
    with torch.no_grad():
        output, reference = bf16.model(digits.x[:50]), small_mlp(digits.x[:50])
    assert output.dtype == torch.float32 and "bf16 autocast" in bf16.steps
    assert not torch.equal(output, reference)  # bf16 matmuls round
    assert torch.allclose(output, reference, rtol=5e-2, atol=5e-2 * reference.abs().max().item())

    arms = applicable_arms(small_mlp, (digits.x[:1],), [(batch,) for batch in digits.calib], ["auto"])
    assert ("bf16" in arms.recipes) == bf16_supported()
    assert ("bf16" in arms.skipped) == (not bf16_supported())
    asked = applicable_arms(small_mlp, (digits.x[:1],), [], ["bf16"])  # by name: measured even if emulated
    assert asked.recipes == ["bf16"]


def test_plans_and_spaces_say_what_is_wrong_with_a_precision_choice():
    with pytest.raises(ValueError, match="rewrite applies to the float recipes"):
        QuantPlan(recipe="static", rewrite="none")
    with pytest.raises(ValueError, match="precision is not in its 'precisions'"):
        autoq.SearchSpace(recipes=("fp32",), precisions=("int8",))
    with pytest.raises(ValueError, match="'precisions' parameter"):
        autoq.SearchSpace(precisions=("fp16",))
    # plans written before the precision field keep their keys (stored studies dedupe them as before)
    fields = dataclasses.asdict(QuantPlan())
    del fields["rewrite"], fields["lowering"]  # neither field existed in v5
    v5_key = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    assert QuantPlan.from_dict({"_type": "autoq.QuantPlan", "_version": 5, "_data": fields}).key() == v5_key
    assert QuantPlan(recipe="fp32", rewrite="none").key() != QuantPlan(recipe="fp32").key()
