"""A PT2E plan's graph lowered by OpenVINO: the same quantization as Inductor's, run by other kernels; a search
dimension where OpenVINO is installed; saved, loaded and exported like any plan."""

import functools
import json

import optuna
import pytest
import torch

import autoq
from autoq.config import SearchSpace
from autoq.dispatch.isa import int8_path
from autoq.plan import INDUCTOR, QuantPlan
from autoq.recipes.arms import applicable_arms
from autoq.recipes.openvino_lowering import OpenVinoLowered, openvino_available, unfold_weights
from autoq.recipes.pt2e import Pt2eBuilder
from autoq.search.space import PlanProposer

from conftest import run_exported
from nets import MLP

pytestmark = pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed (extra 'openvino')")
# OpenVINO's int8 kernels saturate where oneDNN's do (int16 pair sums without VNNI; measured on Zen 3: 9% off
# at full 8-bit, exact with 7-bit activations or weights): the search gives its plans Inductor's ranges
OPENVINO_PLAN = QuantPlan(recipe="pt2e-static", lowering="openvino", reduce_range=not int8_path().full_range_safe(INDUCTOR))


@pytest.fixture(scope="module")
def trained(digits):
    model = digits.train(MLP())
    return model, Pt2eBuilder(model, (digits.x[:1],), [(batch,) for batch in digits.calib])


def test_unfolded_weights_compute_what_the_folded_graph_computes(trained, digits):
    _, builder = trained
    folded = builder.reference(OPENVINO_PLAN)
    unfolded = unfold_weights(folded)
    def int8_constants(graph):
        return [node for node in graph.graph.nodes if node.op == "get_attr"
                and functools.reduce(getattr, str(node.target).split("."), graph).dtype == torch.int8]

    assert int8_constants(unfolded) == [] and len(int8_constants(folded)) == 3  # the MLP's three weights
    with torch.no_grad():
        assert torch.equal(unfolded(digits.x[:64]), folded(digits.x[:64]))


def test_openvino_runs_the_same_int8_graph_at_the_deployment_shape_and_any_batch(trained, digits):
    fp32, builder = trained
    model = builder.build(OPENVINO_PLAN)
    assert isinstance(model, OpenVinoLowered)
    reference = builder.reference(OPENVINO_PLAN)
    with torch.no_grad():
        for x in (digits.x[:1], digits.x[:300]):  # compiled for batch 1; the dynamic-batch model for the rest
            got, expected = model(x), reference(x)
            assert got.shape == expected.shape and got.dtype == torch.float32
            assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.99
            assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
        assert (model(digits.x[:300]).argmax(1) == fp32(digits.x[:300]).argmax(1)).float().mean() >= 0.97


def test_a_plan_lowered_by_openvino_saves_loads_and_exports(trained, digits, tmp_path):
    fp32, _ = trained
    x = digits.x[:1]
    model = autoq.quantize(fp32, OPENVINO_PLAN, (x,), [(batch,) for batch in digits.calib])
    assert QuantPlan.from_dict(model.meta["autoq"]["plan"]).kernels() == "openvino"
    autoq.save(model, tmp_path / "model.autoq")
    loaded = autoq.load(tmp_path / "model.autoq", fp32)
    written = autoq.export(model, tmp_path / "export")
    assert written.format == "openvino" and (tmp_path / "export" / "model.bin").is_file()
    assert json.loads((tmp_path / "export" / "model.json").read_text())["kind"] == "openvino"
    with torch.no_grad():
        expected = model(digits.x[:8])
        assert isinstance(loaded, OpenVinoLowered) and torch.equal(loaded(digits.x[:8]), expected)
        assert torch.allclose(run_exported(written.directory, [digits.x[:8]], tmp_path), expected, atol=1e-5)


def test_plans_name_the_lowering_only_where_it_applies():
    with pytest.raises(ValueError, match="lowering='openvino' applies to the static PT2E recipes"):
        QuantPlan(recipe="static", lowering="openvino")
    with pytest.raises(ValueError, match="applies to the static PT2E recipes"):
        QuantPlan(recipe="pt2e-dynamic", lowering="openvino")
    with pytest.raises(ValueError, match="cpp_wrapper"):
        QuantPlan(recipe="pt2e-static", lowering="openvino", cpp_wrapper=True)
    with pytest.raises(ValueError, match="'lowering' parameter of QuantPlan must be one of"):
        QuantPlan(recipe="pt2e-static", lowering="tvm")
    stored = QuantPlan(recipe="pt2e-static").to_dict()
    del stored["_data"]["lowering"]  # a plan of autoq before the lowering: Inductor, and the same key
    assert QuantPlan.from_dict(stored).key() == QuantPlan(recipe="pt2e-static").key() != OPENVINO_PLAN.key()


@pytest.mark.parametrize("installed", [True, False])
def test_the_search_seeds_with_openvino_only_where_it_is_installed(trained, digits, installed):
    fp32, _ = trained
    arms = applicable_arms(fp32, (digits.x[:1],), [(batch,) for batch in digits.calib], ["pt2e-static", "pt2e-dynamic"])
    arms.openvino = installed
    space = PlanProposer(SearchSpace(), arms, {recipe: arms.layers(recipe) for recipe in arms.recipes})
    seeds = space.seed_params()
    sweep = [variant for seed in seeds for variant in space.sweep_params(seed.get("recipe", arms.recipes[0]), seed)]
    plans = [space.suggest(optuna.trial.FixedTrial(params)) for params in seeds + sweep]
    static_seeds = [plan for plan in plans[:len(seeds)] if plan.recipe == "pt2e-static"]
    assert static_seeds and {plan.lowering for plan in static_seeds} == ({"openvino"} if installed else {"inductor"})
    lowered = [plan for plan in plans if plan.lowering == "openvino"]
    assert {plan.recipe for plan in lowered} == ({"pt2e-static"} if installed else set())
    assert all(not plan.cpp_wrapper for plan in lowered)
    assert any(plan.lowering == "inductor" and plan.recipe == "pt2e-static" for plan in plans[len(seeds):])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [space.suggest(study.ask()) for _ in range(40)]
    assert {plan.lowering for plan in drawn if plan.recipe == "pt2e-static"} == (
        {"inductor", "openvino"} if installed else {"inductor"})
    assert all(plan.lowering == "inductor" for plan in drawn if plan.recipe == "pt2e-dynamic")
