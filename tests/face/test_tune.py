"""autoq.tune end to end on a small CNN trained on real MNIST digits."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.ao.nn import quantized as nnq

import autoq
from autoq.dispatch.isa import cpu_isa
from autoq.plan import QuantPlan, default_plan
from autoq.measure.evaluation import split
from autoq.search.policy import CANDIDATES
from conftest import fast_settings, state_of


@pytest.fixture(scope="module")
def tuned(mnist_task, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tune")
    before = state_of(mnist_task.model)
    training_flag = mnist_task.model.training
    result = autoq.tune(
        mnist_task.model, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn(),
        max_loss=0.01, n_trials=10, space={"recipes": ["static"]}, **fast_settings(tmp_path),
    )  # FX static: the tests below check its int8 graph (the PT2E recipes have tests of their own)
    return result, before, training_flag, tmp_path


def test_result_meets_budget_on_validation_and_held_out_data(tuned, mnist_task):
    result, *_ = tuned
    assert result.feasible and result.loss <= 0.01
    correct = mnist_task.correct(result.model, "val")  # on the validation images the search never saw
    held_back = split(len(correct), 0.5, seed=0)["confirm"]
    assert result.verdict["part"] == "confirm" and result.verdict["samples"] == len(held_back)
    assert result.accuracy == pytest.approx(float(correct[held_back].mean()))
    test_fp32 = mnist_task.accuracy(mnist_task.model, "test")
    test_int8 = mnist_task.accuracy(result.model, "test")
    # held-out: 500 images, so one image is 0.2%; the 1% budget holds there too
    assert (test_fp32 - test_int8) / test_fp32 <= 0.01


def test_result_names_the_cpus_int8_path(tuned):
    result, *_ = tuned
    assert result.notes[0].startswith(f"int8 path {cpu_isa()}")
    assert result.notes[0] in result.summary()


def test_trials_record_when_they_ended(tuned):
    result, *_ = tuned
    ended = [trial["finished"] for trial in result.trials]
    assert ended == sorted(ended)  # one worker: trials end in number order
    assert all(trial["seconds"] > 0 for trial in result.trials)
    assert ended[-1] - ended[0] >= sum(trial["seconds"] for trial in result.trials[1:]) * 0.99


def test_first_trial_is_pytorch_default_x86_ptq(tuned):
    result, *_ = tuned
    first = result.trials[0]
    assert first["number"] == 0
    plan = QuantPlan.from_dict(first["plan"])
    assert plan == QuantPlan(**{**default_plan("x86").__dict__, "calib_samples": plan.calib_samples})
    assert plan.calib_samples == 128  # every calibration sample, as PyTorch's default would use


def test_result_is_one_of_the_fastest_feasible_trials(tuned):
    # the CANDIDATES fastest feasible plans are re-timed side by side and confirmed in speed order
    result, *_ = tuned
    feasible = sorted((t for t in result.trials if t["feasible"] and t["state"] == "COMPLETE"),
                      key=lambda t: -t["speedup"])
    finalists = []
    for trial in feasible:
        if trial["plan"] not in finalists:
            finalists.append(trial["plan"])
    assert result.plan in finalists[:CANDIDATES]
    assert result.verdict["tried"][-1]["within"] and result.verdict["tried"][-1]["plan_key"] == QuantPlan.from_dict(
        result.plan).key()  # the first confirmed one, all faster finalists failed confirmation
    assert result.speedup_interval[0] <= result.speedup <= result.speedup_interval[1]
    assert set(result.latency_ms) == {"fp32_eager", "fp32_best", "int8"}
    assert all(v > 0 for v in result.latency_ms.values())


def test_model_is_int8_on_the_x86_engine(tuned):
    result, *_ = tuned
    plan = QuantPlan.from_dict(result.plan)
    quantized = [n for n, m in result.model.named_modules() if isinstance(m, (nnq.Conv2d, nnq.Linear))]
    assert len(quantized) == len(result.layers) - len(plan.fp32_layers) > 0
    assert any("quantize_per_tensor" in str(node.target) for node in result.model.graph.nodes)


def test_users_model_is_not_modified(tuned, mnist_task):
    _, before, training_flag, _ = tuned
    after = mnist_task.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert mnist_task.model.training == training_flag
    assert all(type(m).__module__.startswith("torch.nn.modules") or m is mnist_task.model
               for m in mnist_task.model.modules())


def test_history_pareto_front_and_layers(tuned, mnist_task):
    result, *_ = tuned
    assert len(result.trials) == 10
    assert {t["state"] for t in result.trials} <= {"COMPLETE", "PRUNED", "FAIL"}
    front = result.pareto_front
    assert front and all(a["loss"] <= b["loss"] for a, b in zip(front, front[1:]))
    assert all(a["speedup"] > b["speedup"] for a, b in zip(front[1:], front)), "front must trade speed for loss"
    weighted = [n for n, m in mnist_task.model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert [layer["name"] for layer in result.layers] == weighted
    assert all(layer["sqnr_db"] > 0 for layer in result.layers)


def test_save_and_load_in_a_new_process_gives_identical_outputs(tuned, mnist_task, tmp_path):
    result, *_ = tuned
    path = tmp_path / "model.autoq"
    inputs = mnist_task.calib[1]
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(result.model(inputs), tmp_path / "expected.pt")
    result.save(path)
    script = textwrap.dedent(f"""
        import torch, autoq
        from autoq_zoo import mnist_cnn
        model = autoq.load({str(path)!r}, mnist_cnn())  # the FP32 model the file was tuned from
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            assert torch.equal(model(inputs), expected), "outputs differ after reload"
        assert model.meta["autoq"]["plan"]["_data"]["engine"] in ("x86", "fbgemm", "onednn")
        assert set(model.meta["autoq"]["layer_shapes"]) == {{
            name for name, m in model.named_modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)
            or isinstance(m, torch.ao.nn.quantized.Linear)}}  # so autoq.apply_dispatch needs no inputs
        print("identical")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "identical" in out.stdout


def test_quantize_rebuilds_the_tuned_model_from_its_config(tuned, mnist_task):
    result, *_ = tuned
    rebuilt = autoq.quantize(mnist_task.model, result.plan, mnist_task.example_inputs, mnist_task.calib)
    inputs = mnist_task.calib[2]
    with torch.no_grad():
        assert torch.equal(rebuilt(inputs), result.model(inputs))


def test_resume_keeps_finished_trials_and_runs_only_the_rest(tuned, mnist_task):
    result, _, _, tmp_path = tuned
    resumed = autoq.tune(
        mnist_task.model, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn(),
        max_loss=0.01, n_trials=12, space={"recipes": ["static"]}, **fast_settings(tmp_path),
    )
    assert resumed.study_name == result.study_name
    assert len(resumed.trials) == 12
    for old, new in zip(result.trials, resumed.trials[:10]):
        assert (old["number"], old["params"], old["metric"], old["speedup"]) == (
            new["number"], new["params"], new["metric"], new["speedup"])


def test_nothing_in_budget_returns_best_effort_with_warning(mnist_task, tmp_path):
    def harsh_metric(model):  # every int8 candidate (not the FP32 class) scores 5 points below its accuracy
        return mnist_task.accuracy(model) - (0.05 if type(model) is not type(mnist_task.model) else 0.0)

    with pytest.warns(UserWarning, match="no plan met the accuracy budget"):
        result = autoq.tune(
            mnist_task.model, mnist_task.example_inputs, mnist_task.calib, harsh_metric,
            max_loss=0.01, n_trials=4,
            space=autoq.SearchSpace(kernels=("fbgemm",), observers=("minmax", "kl"), max_fallback=0,
                                    precisions=("int8",)),
            **fast_settings(tmp_path),
        )
    assert result is not None and not result.feasible and result.loss > 0.01
    assert result.pareto_front and result.model is not None
    assert result.loss == pytest.approx(min(t["loss"] for t in result.trials if t["loss"] is not None))
