"""The int8 path of this CPU (VNNI, AMX, AVX2 without VNNI) and the search space that follows from it.

The probe tests assert what holds on the CPU they run on; the search-space tests give Arms a made-up
int8 path, so they test the policy for every CPU kind on any machine. CI also runs this file with
the AVX2 caps of the kernel libraries set (`make test-avx2`): on a VNNI machine the probe test then
checks that the caps take effect.
"""

import json
import operator
import os

import optuna
import pytest
import torch

import autoq
from autoq.dispatch.isa import KERNEL_KINDS, Int8Path, cpu_isa, int8_path, module_kinds
from autoq.plan import LIBRARIES, QuantPlan
from autoq.recipes.arms import applicable_arms
from autoq.config import SearchSpace
from autoq.search.space import PlanProposer
from autoq.tuner import isa_note
from nets import X, Block, saturation_net

pytestmark = pytest.mark.isa
CAPPED_TO_AVX2 = (os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2"
                  and os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper() == "AVX2")
EVERY_KERNEL = frozenset((library, kind) for library in LIBRARIES for kind in KERNEL_KINDS)
AVX2 = Int8Path("avx2", EVERY_KERNEL - {("onednn", "depthwise")}, frozenset())  # as probed on AMD Zen 3
# FBGEMM's depthwise kernel adds in int16 even with VNNI (the dispatch tests found it on Zen 5 and Xeon)
VNNI = Int8Path("avx512-vnni", frozenset({("fbgemm", "depthwise")}), frozenset())


def test_the_probe_finds_what_this_cpu_computes():
    path = int8_path()
    print(path.describe(), f"(cpu flags: {cpu_isa()})")
    assert not path.saturating_7bit  # 127 * 127 * 2 fits int16 on every path
    assert ("fbgemm", "depthwise") in path.saturating  # FBGEMM's depthwise kernel adds pairs in int16 everywhere
    without_vnni = {(library, kind) for library in LIBRARIES for kind in ("linear", "conv")}
    if CAPPED_TO_AVX2 or cpu_isa() in ("avx2", "avx512"):
        assert without_vnni <= path.saturating
    else:  # VNNI / AMX: oneDNN sums in int32
        assert not {kernel for kernel in path.saturating if kernel[0] == "onednn"}


@pytest.mark.parametrize("engine", ["fbgemm", "onednn"])
def test_seven_bit_weights_or_activations_keep_every_library_exact(engine):
    model, x = saturation_net(), X
    with torch.no_grad():
        expected = model(x)

    def error(**fields) -> float:
        int8 = autoq.quantize(model, QuantPlan(engine=engine, activation_observer="minmax", **fields), x, [x])
        with torch.no_grad():
            return float((int8(x) - expected).abs().max() / expected.abs().max())

    assert error(reduce_range=False, weight_bits=7) < 0.02
    assert error(reduce_range=True) < 0.02
    saturates = not int8_path().full_range_safe(engine, module_kinds(model).values())
    assert (error(reduce_range=False) > 0.2) == saturates  # the probe predicts the model


@pytest.fixture(scope="module")
def relu6_arms():
    """Arms (FX static, PT2E static) of a model with ReLU6, where folding is on offer."""
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    return applicable_arms(Block().eval(), (data[0][:1],), [(b,) for b in data], ["static", "pt2e-static"])


def proposer(space: SearchSpace, arms) -> PlanProposer:
    """The plan proposer of `arms` with their layers ranked in order."""
    return PlanProposer(space, arms, {recipe: arms.layers(recipe) for recipe in arms.recipes})


def plans_of(space: SearchSpace, arms, n_random: int = 60) -> tuple[list[QuantPlan], list[QuantPlan]]:
    """The plans of the space's seeds and sweeps, and of n_random trials of a random sampler."""
    space = proposer(space, arms)
    seeds = space.seed_params()
    proposed = [*seeds, *(variant for seed in seeds
                          for variant in space.sweep_params(seed.get("recipe", arms.recipes[0]), seed))]
    planned = [space.suggest(optuna.trial.FixedTrial(params)) for params in proposed]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = []
    for _ in range(n_random):
        trial = study.ask()
        sampled.append(space.suggest(trial))
        study.tell(trial, 1.0)
    return planned, sampled


def test_on_a_cpu_without_vnni_no_plan_saturates(relu6_arms):
    relu6_arms.int8 = AVX2
    planned, sampled = plans_of(SearchSpace(), relu6_arms)
    for plan in planned + sampled:
        assert plan.reduce_range or plan.weight_bits == 7, plan
        assert not plan.fold_relu6 or plan.weight_bits == 7, plan  # folded outputs use all 8 bits
    seeds = planned[:len(proposer(SearchSpace(), relu6_arms).seed_params())]
    # x86, fbgemm, onednn, measured (x86's recipe), then x86 with the most sensitive layer FP32
    assert [p.engine for p in seeds if p.recipe == "static"] == ["x86", "fbgemm", "onednn", "x86", "x86"]
    assert [len(p.fp32_layers) for p in seeds if p.recipe == "static"] == [0, 0, 0, 0, 1]
    onednn_seed = next(p for p in seeds if p.engine == "onednn")
    assert (onednn_seed.reduce_range, onednn_seed.weight_bits) == (False, 7)  # its 8-bit default, made safe
    assert next(p for p in seeds if p.recipe == "pt2e-static").reduce_range  # torchao's advice without VNNI
    assert {(p.reduce_range, p.weight_bits) for p in sampled} == {(True, 8), (False, 7)}  # both ways searched
    assert any(p.fold_relu6 for p in planned)  # the sweep folds ReLU6, with 7-bit weights
    # 8-bit weights stay where the kernel sums exactly: oneDNN's depthwise conv 'b'
    on_onednn = [p for p in planned + sampled
                 if p.weight_bits == 7 and (p.recipe == "pt2e-static" or (p.engine, p.dispatch) == ("onednn", "engine"))]
    assert {p.recipe for p in on_onednn} == {"static", "pt2e-static"}
    assert all(p.layer_weight_bits == {"b": 8} for p in on_onednn)
    assert all(not p.layer_weight_bits for p in planned + sampled
               if p.recipe == "static" and (p.engine != "onednn" or p.dispatch != "engine"))
    note = isa_note(relu6_arms)
    assert "7-bit activations (reduce_range) or 7-bit weights" in note and "inductor" in note


def test_on_a_vnni_cpu_the_space_is_pytorchs(relu6_arms):
    relu6_arms.int8 = VNNI  # the model has depthwise convs: only FBGEMM's saturate
    planned, sampled = plans_of(SearchSpace(), relu6_arms)
    assert all(p.weight_bits == 8 for p in planned + sampled if p.engine == "onednn" or p.recipe == "pt2e-static")
    onednn_seed = next(p for p in planned if p.engine == "onednn")
    assert (onednn_seed.reduce_range, onednn_seed.weight_bits) == (False, 8)  # PyTorch's onednn default
    assert all(not p.reduce_range for p in planned + sampled if p.recipe == "pt2e-static")
    on_fbgemm = {(p.reduce_range, p.weight_bits) for p in sampled if p.engine == "fbgemm" and p.recipe == "static"}
    assert on_fbgemm == {(True, 8), (False, 7)}  # the model's depthwise convs saturate in FBGEMM even with VNNI


def test_pt2e_plans_of_older_versions_keep_their_8_bit_activations():
    plan = QuantPlan(recipe="pt2e-static").to_dict()
    old = json.loads(json.dumps({**plan, "_version": 3}))
    del old["_data"]["weight_bits"]
    assert QuantPlan.from_dict(old) == QuantPlan(recipe="pt2e-static", reduce_range=False)
    assert QuantPlan.from_dict({**plan, "_version": 3}).reduce_range is False
    assert QuantPlan.from_dict(plan).reduce_range is True
    with pytest.raises(ValueError, match="weight_bits"):
        QuantPlan(weight_bits=4)


def test_layer_weight_bits_reach_the_int8_weights():
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    plan = dict(reduce_range=False, weight_bits=7, layer_weight_bits={"b": 8}, activation_observer="minmax")
    fx = autoq.quantize(Block().eval(), QuantPlan(engine="onednn", **plan), data[0][:1], data)
    widest = {name: int(fx.get_submodule(name).weight().int_repr().abs().max()) for name in "abcd"}
    assert widest == {"a": 63, "b": 127, "c": 63, "d": 63}
    arms = applicable_arms(Block().eval(), (data[0][:1],), [(b,) for b in data], ["pt2e-static"])
    reference = arms.builders["pt2e-static"].reference(QuantPlan(recipe="pt2e-static", **plan))
    constants = [operator.attrgetter(node.target)(reference) for node in reference.graph.nodes if node.op == "get_attr"]
    int8_weights = [tensor for tensor in constants if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.int8]
    assert sorted(int(w.abs().max()) for w in int8_weights) == [63, 63, 63, 127]
