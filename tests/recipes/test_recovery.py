"""Accuracy recovery as plan fields of 'static': cross-layer equalization and bias correction (issue 17)."""

import torch
from torch import nn

from autoq.config import SearchSpace
from autoq.measure.outputs import sqnr_db
from autoq.plan import PLAN_TYPE, QuantPlan
from autoq.recipes.arms import applicable_arms
from autoq.recipes.static import StaticBuilder
from autoq.search.space import PlanProposer

from nets import Net, biased_depthwise, positive_mean_inputs

SCALE = 1000  # how much larger one channel is than the others


def badly_scaled_net() -> nn.Module:
    """Conv-BN-ReLU-Conv whose first conv has one output channel SCALE times larger than the others and
    the next conv's matching input column SCALE times smaller: the same function, but per-tensor int8
    weights of the first conv round every other channel to a handful of levels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
        model[0].weight[0] *= SCALE
        model[0].bias[0] *= SCALE
        model[1].running_mean[0] *= SCALE
        model[1].running_var[0] *= SCALE**2  # BN then normalizes channel 0 back: scale its affine weight instead
        model[1].weight[0] *= SCALE
        model[1].bias[0] *= SCALE
        model[3].weight[:, 0] /= SCALE
    return model


def output_sqnr(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return sqnr_db(reference(x), model(x))


def test_equalization_recovers_per_tensor_weights_of_a_badly_scaled_channel():
    model = badly_scaled_net()
    batches = [(torch.randn(8, 3, 16, 16),) for _ in range(4)]
    builder = StaticBuilder(model, batches[0], batches)
    plan = QuantPlan(weight_granularity="per_tensor", activation_observer="minmax", reduce_range=False)
    test = torch.randn(32, 3, 16, 16)
    plain = output_sqnr(builder.build(plan), model, test)
    folded = output_sqnr(builder.build(QuantPlan(**{**plan.__dict__, "equalization": "fold_bn"})), model, test)
    equalized = output_sqnr(builder.build(QuantPlan(**{**plan.__dict__, "equalization": "cross_layer"})), model, test)
    assert equalized >= max(plain, folded) + 10, (f"output SQNR {plain:.1f} dB, BatchNorm folded {folded:.1f} dB, "
                                                  f"equalized {equalized:.1f} dB")
    assert builder.equalizations["cross_layer"].pairs == [("0", "3")]
    assert builder.equalizations["cross_layer"].folded == builder.equalizations["fold_bn"].folded == ["1"]
    assert builder.equalizations["fold_bn"].pairs == []


def test_bias_correction_in_a_plan_removes_the_output_shift_of_rounded_weights():
    model = biased_depthwise()
    batches, test = positive_mean_inputs()
    builder = StaticBuilder(model, batches[0], batches)

    def shift(bias_correction: bool) -> float:
        int8 = builder.build(QuantPlan(activation_observer="minmax", bias_correction=bias_correction))
        with torch.no_grad():
            error = int8(test) - model(test)
        return float(error.mean((0, 2, 3)).abs().mean())

    before, after = shift(False), shift(True)
    assert after * 5 <= before, f"mean |output shift| per channel {before:.4f} -> {after:.4f}"
    assert shift(False) == before  # a plan without it is built as before: the correction is the plan's alone


def test_the_sweep_tries_each_recovery_technique_and_their_combination():
    model = Net().eval()
    arms = applicable_arms(model, (torch.randn(1, 3, 8, 8),), [(torch.randn(4, 3, 8, 8),)], ["static"])
    proposer = PlanProposer(SearchSpace(), arms, {"static": arms.layers("static")})
    seed = proposer.seed_params()[0]
    assert seed["equalization"] == "none" and seed["bias_correction"] is False  # PyTorch's default has neither
    recovered = [(p["equalization"], p["bias_correction"]) for p in proposer.sweep_params("static", seed)
                 if p["equalization"] != "none" or p["bias_correction"]]
    assert sorted(recovered) == [("cross_layer", True), ("fold_bn", True), ("none", True)]
    off = PlanProposer(SearchSpace(equalizations=["none"], bias_correction=[False]), arms,
                       {"static": arms.layers("static")})
    assert not any(p["equalization"] != "none" or p["bias_correction"]
                   for p in off.sweep_params("static", off.seed_params()[0]))


def test_plans_of_version_4_read_with_recovery_off():
    fields = {k: v for k, v in QuantPlan().to_dict()["_data"].items() if k not in ("equalization", "bias_correction")}
    plan = QuantPlan.from_dict({"_type": PLAN_TYPE, "_version": 4, "_data": fields})
    assert plan.equalization == "none" and plan.bias_correction is False
