"""The simulated per-layer sensitivity agrees with real int8 conversions of one layer at a time."""

import dataclasses

import torch

from autoq.plan import default_plan
from autoq.recipes.static import StaticBuilder
from autoq.measure.outputs import float_outputs, sqnr_db
from autoq.recipes.sensitivity import layer_sensitivity
from autoq.search.rankings import rank_layers


def test_simulated_sqnr_matches_converting_each_layer_alone(mnist_task):
    # in this CNN every quantized op belongs to a layer, so simulation and conversion must agree
    batches = [(b,) for b in mnist_task.calib[:2]]
    builder = StaticBuilder(mnist_task.model, mnist_task.example_inputs, batches)
    plan = default_plan("x86")
    simulated = layer_sensitivity(builder, mnist_task.model, batches, plan)
    with torch.no_grad():
        reference = [t for b in batches for t in float_outputs(mnist_task.model(*b))]
        for layer in builder.layers:
            others = [name for name in builder.layers if name != layer]
            model = builder.build(dataclasses.replace(plan, fp32_layers=others))
            real = sqnr_db(reference, [t for b in batches for t in float_outputs(model(*b))])
            assert abs(simulated[layer] - real) < 4.0, (layer, simulated[layer], real)
    assert rank_layers(simulated)[0] == min(simulated, key=simulated.get)


def test_sqnr_definition():
    signal = torch.ones(100)
    assert sqnr_db([signal], [signal]) == float("inf")
    assert abs(sqnr_db([signal], [signal * 1.1]) - 20.0) < 1e-4  # noise power 1% of signal
