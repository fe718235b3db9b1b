"""Per-layer kernel dispatch: packing, shapes, tables (format, apply, reload, other CPU), rule, suite, CLI."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.ao.nn.quantized as nnq
from torch import nn

import autoq
from autoq.cli import main
from autoq.dispatch.layers import LayerShape, layer_shapes, set_layer_engines, weighted_layers
from autoq.dispatch.microbench import float_kernels, synthetic_layer, time_layers_in_model
from autoq.dispatch.rule import Measurement, fit_with_holdout, x86_rule
from autoq.dispatch.suite import bench_shapes, load_suite
from autoq.dispatch.table import CpuIdentity, DispatchTable, current_cpu, shipped_tables
from autoq.plan import QuantPlan

import nets
from nets import FBGEMM_PLAN, X, saturation_net, two_entry_table


def saturation_run_file(folder: Path) -> Path:
    """A run file whose model is saturation_net (its data sections are required, not read by model commands)."""
    run = folder / "saturation.toml"
    run.write_text(f'[model]\nfactory = "{Path(nets.__file__).resolve()}:saturation_net"\n'
                   f'[calib]\nbuiltin = "digits"\n[eval]\nbuiltin = "digits"\n')
    return run


def depthwise_output(model: nn.Module) -> torch.Tensor:
    """The int8 output of saturation_net's depthwise layer '0' on X."""
    outputs = []
    hook = model.get_submodule("0").register_forward_hook(lambda _, __, output: outputs.append(output.dequantize()))
    try:
        with torch.no_grad():
            model(X)
    finally:
        hook.remove()
    return outputs[0]


def depthwise_library(model: nn.Module) -> str:
    """Which library ran layer '0': its output equals that of a model built wholly on that library."""
    matches = [library for library in ("fbgemm", "onednn")
               if torch.equal(depthwise_output(model), depthwise_output(autoq.quantize(
                   saturation_net(), QuantPlan(engine=library, reduce_range=False, activation_observer="minmax"),
                   X, [X])))]
    assert len(matches) == 1, f"the libraries' depthwise outputs must tell them apart; matched {matches}"
    return matches[0]


@pytest.mark.isa
def test_repacking_one_layer_switches_its_kernel_library():
    model = autoq.quantize(saturation_net(), FBGEMM_PLAN, X, [X])
    assert depthwise_library(model) == "fbgemm"
    set_layer_engines(model, {"0": "onednn"})
    assert depthwise_library(model) == "onednn"
    with pytest.raises(ValueError, match="not quantized conv/linear modules"):
        set_layer_engines(model, {"missing": "onednn"})


def test_layer_shapes_describe_what_each_kernel_sees():
    model = autoq.quantize(saturation_net(), FBGEMM_PLAN, X, [X])
    shapes = layer_shapes(model, (X,))
    assert shapes["0"] == LayerShape("conv2d", 1, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8, (6, 6), False)
    assert shapes["1"].channels_last  # int8 convs hand NHWC tensors on
    assert shapes["1"].gemm() == (36, 8, 4)
    assert LayerShape.from_dict(json.loads(json.dumps(shapes["0"].to_dict()))) == shapes["0"]
    linear = nnq.Linear(16, 4)
    x = torch.quantize_per_tensor(torch.rand(2, 5, 16), 0.01, 0, torch.quint8)
    assert layer_shapes(nn.Sequential(linear), (x,))["0"] == LayerShape("linear", 10, 16, 4)


@pytest.mark.isa
def test_table_applies_to_a_new_model_and_the_saved_model_keeps_its_dispatch(tmp_path):
    fp32 = saturation_net()
    table = two_entry_table(current_cpu(), "onednn")
    model = autoq.quantize(fp32, FBGEMM_PLAN, X, [X], dispatch=table)
    plan = QuantPlan.from_dict(model.meta["autoq"]["plan"])
    assert plan.dispatch == "table" and plan.layer_engines == {"0": "onednn", "1": "fbgemm"}
    assert depthwise_library(model) == "onednn"
    autoq.save(model, tmp_path / "m.autoq")
    # rebuilding packs every layer under the plan's engine (FBGEMM): load must re-apply layer 0's oneDNN
    reloaded = autoq.load(tmp_path / "m.autoq", fp32)
    assert depthwise_library(reloaded) == "onednn"
    with torch.no_grad():
        assert torch.equal(reloaded(X), model(X))


@pytest.mark.isa
def test_a_saved_model_is_re_dispatched_from_the_cli_without_inputs(tmp_path, capsys):
    fp32 = saturation_net()
    autoq.save(autoq.quantize(fp32, FBGEMM_PLAN, X, [X]), tmp_path / "fbgemm.autoq")
    two_entry_table(current_cpu(), "onednn").save(tmp_path / "t.json")
    run = saturation_run_file(tmp_path)
    assert main(["dispatch", "apply", str(tmp_path / "fbgemm.autoq"), str(tmp_path / "t.json"), "--run", str(run),
                 "--out", str(tmp_path / "dispatched.autoq")]) == 0
    assert "1 layers on oneDNN, 1 on FBGEMM" in capsys.readouterr().out
    model = autoq.load(tmp_path / "dispatched.autoq", fp32)
    assert QuantPlan.from_dict(model.meta["autoq"]["plan"]).layer_engines == {"0": "onednn", "1": "fbgemm"}
    assert depthwise_library(model) == "onednn"
    assert depthwise_library(autoq.load(tmp_path / "fbgemm.autoq", fp32)) == "fbgemm"  # the input file is untouched
    bare = copy.deepcopy(model)
    bare.meta["autoq"]["layer_shapes"] = {}
    with pytest.raises(ValueError, match="layer shapes are recorded"):
        autoq.apply_dispatch(bare, tmp_path / "t.json")


@pytest.mark.isa
def test_table_from_another_cpu_warns_and_uses_only_its_rule():
    other = CpuIdentity("GenuineIntel", "Some Xeon", ("avx512f", "amx_int8"))
    table = two_entry_table(other, "onednn")
    with pytest.warns(UserWarning, match="measured on Some Xeon.*learned rule"):
        model = autoq.quantize(saturation_net(), FBGEMM_PLAN, X, [X], dispatch=table)
    assert QuantPlan.from_dict(model.meta["autoq"]["plan"]).layer_engines == {"0": "fbgemm", "1": "fbgemm"}
    assert depthwise_library(model) == "fbgemm"


def test_table_json_round_trips_and_rejects_foreign_files(tmp_path):
    table = two_entry_table(current_cpu(), "onednn")
    table.refit()
    table.save(tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["_type"] == "autoq.DispatchTable" and data["_version"] == 1
    assert data["cpu"]["flags"] == list(current_cpu().flags) and data["torch_version"] == torch.__version__
    assert {e["library"] for e in data["entries"]} == {"onednn", "fbgemm"} and "text" in data["rule"]
    assert DispatchTable.load(tmp_path / "t.json").to_dict() == table.to_dict()
    (tmp_path / "v9.json").write_text(json.dumps({**data, "_version": 9}))
    with pytest.raises(ValueError, match="version 9 is not supported"):
        DispatchTable.load(tmp_path / "v9.json")
    (tmp_path / "plan.json").write_text(json.dumps(QuantPlan().to_dict()))
    with pytest.raises(ValueError, match="Not an autoq dispatch table"):
        DispatchTable.load(tmp_path / "plan.json")
    with pytest.raises(ValueError, match="Cannot read dispatch table"):
        DispatchTable.load(tmp_path / "missing.json")


def grouped_conv(groups: int, spatial: int = 28) -> LayerShape:
    return LayerShape("conv2d", 1, 256, 256, (3, 3), (1, 1), (1, 1), (1, 1), groups, (spatial, spatial), True)


def test_learned_rule_recovers_a_threshold_and_generalizes_to_unseen_shapes():
    # oneDNN 30% faster up to 16 groups, FBGEMM 30% faster above: the rule must find the boundary
    def measured(shape):
        return Measurement(shape, {"onednn": 70.0, "fbgemm": 100.0} if shape.groups <= 16 else
                                  {"onednn": 100.0, "fbgemm": 70.0})
    train = [measured(grouped_conv(g, s)) for g in (1, 2, 4, 8, 16, 32, 64, 128) for s in (14, 28, 56)]
    rule = fit_with_holdout(train)
    assert rule.heldout["within_tolerance"] == 1.0 and rule.heldout["x86_rule"] < 1.0
    unseen = [measured(grouped_conv(g, 21)) for g in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert [rule.choose(m.shape) for m in unseen] == [m.fastest for m in unseen]
    assert "if " in rule.text() and rule.text().count("onednn") >= 1
    assert x86_rule(grouped_conv(64)) == "onednn" and x86_rule(LayerShape("linear", 8, 64, 64)) == "fbgemm"


def test_shipped_table_is_package_data_with_a_rule_that_meets_the_held_out_target():
    paths = shipped_tables()
    assert paths, "kernels/tables/*.json must ship as package data of autoq.kernels"
    for path in paths:
        table = DispatchTable.load(path)
        assert len(table.entries) == len(load_suite())
        assert table.rule.heldout["within_tolerance"] >= 0.9


def test_suite_is_deterministic_and_bad_suites_name_the_family(tmp_path):
    shapes = load_suite()
    assert [s.key() for s in shapes] == [s.key() for s in load_suite()]
    assert {s.kind for s in shapes} == {"conv2d", "linear"} and len(shapes) == 250
    (tmp_path / "bad.toml").write_text('[[family]]\nname = "oops"\nkind = "conv2d"\nsamples = 3\n')
    with pytest.raises(ValueError, match="'oops'.*missing"):
        load_suite(tmp_path / "bad.toml")


def test_bench_times_both_libraries_and_fp32_per_shape():
    entries = bench_shapes([grouped_conv(4, 7), LayerShape("linear", 4, 64, 32)], seconds=0.01, passes=2)
    assert [e.shape.kind for e in entries] == ["conv2d", "linear"]
    for entry in entries:
        assert set(entry.micros) == {"fbgemm", "onednn"} and all(us > 0 for us in entry.micros.values())
        assert entry.source == "microbench" and entry.fp32_micros > 0


@pytest.mark.parametrize("shape", [grouped_conv(1, 7), grouped_conv(256, 7), LayerShape("linear", 4, 64, 32),
                                   LayerShape("conv2d", 2, 16, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, (9, 9), False)],
                         ids=["conv", "depthwise", "linear", "conv-nchw-strided"])
def test_the_fp32_kernels_timed_beside_int8_compute_the_layer(shape):
    module, x = synthetic_layer(shape)
    weight, bias, inputs = (t.double() for t in (module.weight().dequantize(), module.bias(), x.dequantize()))
    expected = torch.nn.functional.linear(inputs, weight, bias) if shape.kind == "linear" else \
        torch.nn.functional.conv2d(inputs, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    kernels = float_kernels(module, x)
    assert "fp32 eager" in kernels and (shape.kind == "linear" or "fp32 packed" in kernels)
    for name, (function, inputs) in kernels.items():
        with torch.no_grad():
            got = function(inputs)
        assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, atol=1e-3, rtol=1e-4), name


def test_the_table_says_where_int8_beats_fp32(tmp_path, capsys):
    table = DispatchTable.for_this_machine([
        Measurement(grouped_conv(1), {"onednn": 50.0, "fbgemm": 80.0}, "microbench", 100.0),  # int8 2x
        Measurement(grouped_conv(1, 14), {"onednn": 25.0, "fbgemm": 20.0}, "microbench", 80.0),  # 4x
        Measurement(grouped_conv(256), {"onednn": 40.0, "fbgemm": 60.0}, "microbench", 20.0),  # 0.5x
        Measurement(LayerShape("linear", 4, 64, 32), {"onednn": 9.0, "fbgemm": 10.0}, "tuning"),  # no FP32 time
    ])
    table.refit()
    ceiling = table.int8_over_fp32()
    assert ceiling == {"conv": (pytest.approx(8 ** 0.5), 2.0, 4.0, 2), "depthwise": (0.5, 0.5, 0.5, 1)}
    table.save(tmp_path / "t.json")
    assert DispatchTable.load(tmp_path / "t.json").int8_over_fp32() == ceiling
    assert main(["dispatch", "show", str(tmp_path / "t.json")]) == 0
    assert "conv 2.83x geomean (2.00-4.00x, 2 shapes); depthwise 0.50x" in capsys.readouterr().out


def test_cli_dispatch_bench_show_and_errors(tmp_path, capsys):
    out = tmp_path / "table.json"
    assert main(["dispatch", "bench", "--limit", "3", "--seconds", "0.01", "--passes", "1", "--quiet",
                 "--out", str(out)]) == 0
    assert len(DispatchTable.load(out).entries) == 3
    assert main(["dispatch", "show", str(out)]) == 0
    assert "dispatch table for" in capsys.readouterr().out
    assert main(["dispatch", "show", str(tmp_path / "none.json")]) == 2
    assert "Cannot read dispatch table" in capsys.readouterr().err
    assert main(["dispatch", "export", "--study", "nope", "--storage", f"sqlite:///{tmp_path}/s.db",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err


def test_layers_are_timed_inside_whole_model_runs():
    model = autoq.quantize(saturation_net(), FBGEMM_PLAN, X, [X])
    variants = {}
    for library in ("fbgemm", "onednn"):
        variants[library] = copy.deepcopy(model)
        set_layer_engines(variants[library], {"0": library, "1": library})
    timings = time_layers_in_model(variants, (X,), seconds=0.05)
    assert set(timings) == {"0", "1"}
    assert all(set(t) == {"fbgemm", "onednn"} and min(t.values()) > 0 for t in timings.values())
    assert not any(m._forward_hooks or m._forward_pre_hooks for v in variants.values() for m in v.modules())


def test_quantize_rejects_a_bad_dispatch_argument():
    with pytest.raises(TypeError, match="must be a DispatchTable, a JSON path or 'shipped'"):
        autoq.quantize(saturation_net(), FBGEMM_PLAN, X, [X], dispatch=3)
    model = autoq.quantize(saturation_net(), FBGEMM_PLAN, X, [X], dispatch="measured")
    plan = QuantPlan.from_dict(model.meta["autoq"]["plan"])
    assert plan.dispatch == "measured" and set(plan.layer_engines) == set(weighted_layers(model))
    assert copy.deepcopy(plan) == plan


def test_tuning_times_layers_in_place_stores_them_and_resume_reuses_them(mnist_task, tmp_path, monkeypatch):
    from conftest import fast_settings

    settings = fast_settings(tmp_path, space=autoq.SearchSpace(recipes=("static",), kernels=("measured",)))
    args = (mnist_task.model, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn())
    result = autoq.tune(*args, n_trials=3, **settings)
    plan = QuantPlan.from_dict(result.plan)
    assert plan.dispatch == "measured" and set(plan.layer_engines) == set(weighted_layers(result.model))
    assert {layer["engine"] for layer in result.layers if layer["quantized"]} <= {"fbgemm", "onednn"}
    measured = {key for key, entry in result.dispatch_table.entries.items() if entry.source == "tuning"}
    assert {shape.key() for shape in layer_shapes(result.model, mnist_task.example_inputs).values()} <= measured
    assert {e.source for e in result.dispatch_table.entries.values()} <= {"tuning", "microbench"}

    out = tmp_path / "run-table.json"
    assert main(["dispatch", "export", "--study", result.study_name, "--storage", settings["storage"],
                 "--out", str(out)]) == 0
    assert set(DispatchTable.load(out).entries) == measured

    import autoq.dispatch.measured as measured_module

    timed_again = []
    original = measured_module.time_layers_in_model

    def recording(variants, example_inputs, **kwargs):
        timings = original(variants, example_inputs, **kwargs)
        model = next(iter(variants.values()))
        timed_again.extend(shape.key() for shape in layer_shapes(model, example_inputs).values())
        return timings
    monkeypatch.setattr(measured_module, "time_layers_in_model", recording)
    resumed = autoq.tune(*args, n_trials=6, **settings)
    assert len(resumed.trials) == 6 and all(t["state"] != "FAIL" for t in resumed.trials)
    assert not set(timed_again) & measured  # layers the first run timed come from the study
