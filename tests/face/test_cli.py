"""Every `autoq` command, run the way a user runs it, on examples/mnist_cnn.toml (a real trained CNN)."""

import json
import shutil
from pathlib import Path

import optuna
import pytest

import autoq
from autoq.cli import main
from autoq.run import load_run, prepare
from autoq.config import strategies
from autoq.recipes.pt2e import bf16_supported
from autoq.search.study import FINISHED

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mnist_cnn.toml"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One CLI tuning run (4 trials) shared by the tests that read its outputs."""
    folder = tmp_path_factory.mktemp("cli")
    storage = f"sqlite:///{folder / 'study.db'}"
    out = folder / "out"
    code = main(["tune", str(EXAMPLE), "--storage", storage, "--trials", "4", "--out", str(out), "--quiet"])
    assert code == 0
    return folder, storage, out


def test_tune_writes_model_result_table_and_report(tuned):
    _, storage, out = tuned
    assert {"model.autoq", "result.json", "report.html", "pareto.png", "history.png"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "result.json").read_text())
    study = optuna.load_study(study_name=record["study"], storage=storage)
    assert len(study.get_trials(states=FINISHED)) == 4 and record["storage"] == storage
    assert record["feasible"] and record["loss"] <= 0.01


def test_tune_shows_progress_and_a_line_per_trial_unless_quiet(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    floats = 4 if bf16_supported() else 2  # the float seeds: as given and folded (the example does not compile)
    trials = str(floats + 2)
    assert main(["tune", str(EXAMPLE), "--storage", storage, "--trials", trials, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    trial_lines = [line for line in err.splitlines() if line.startswith("[autoq] trial")]
    assert len(trial_lines) == floats + 2
    # the FP32 candidates come first (then bf16 on CPUs that compute it natively): the bar int8 has to beat
    assert all("recipe=fp32" in line and "speedup" in line for line in trial_lines[:2])
    assert all("recipe=bf16" in line and "speedup" in line for line in trial_lines[2:floats])
    assert "PyTorch default recipe" in trial_lines[floats] and "speedup" in trial_lines[floats]
    assert any(verdict in trial_lines[-1] for verdict in ("feasible", "over budget", "pruned"))
    assert "kernels=fbgemm" in trial_lines[-1]  # the next seed changes the engine, and the line says so
    assert main(["resume", str(EXAMPLE), "--storage", storage, "--trials", str(floats + 3), "--out", str(tmp_path),
                 "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "[autoq]" not in captured.err
    assert "autoq result" in captured.out


def test_resume_continues_the_study_and_keeps_finished_trials(tuned, tmp_path):
    folder, storage, _ = tuned
    copy = tmp_path / "study.db"
    shutil.copy(folder / "study.db", copy)
    url = f"sqlite:///{copy}"
    name = optuna.get_all_study_names(url)[0]
    finished = optuna.load_study(study_name=name, storage=url).get_trials(states=FINISHED)
    before = {t.number: (t.state, t.value, t.datetime_complete) for t in finished}
    assert main(["resume", str(EXAMPLE), "--storage", url, "--trials", "6", "--out", str(tmp_path), "--quiet"]) == 0
    after = optuna.load_study(study_name=name, storage=url).get_trials(states=FINISHED)
    assert len(after) == 6
    assert {t.number: (t.state, t.value, t.datetime_complete) for t in after if t.number in before} == before


def test_resume_without_a_study_is_an_error(tmp_path, capsys):
    code = main(["resume", str(EXAMPLE), "--storage", f"sqlite:///{tmp_path / 'empty.db'}", "--out", str(tmp_path)])
    assert code == 2
    assert "There is no study" in capsys.readouterr().err
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'empty.db'}") == []


def test_report_from_the_run_file_or_the_storage(tuned, tmp_path, capsys):
    _, storage, out = tuned
    assert main(["report", "--storage", storage, "--out", str(tmp_path / "a")]) == 0
    html = (tmp_path / "a" / "report.html").read_text()
    record = json.loads((out / "result.json").read_text())
    assert record["study"] in html
    assert main(["report", "--storage", storage, "--study", "nope"]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err


def test_report_with_the_run_file_finds_the_runs_study(tuned, tmp_path, capsys):
    folder, storage, out = tuned
    run = tmp_path / "run.toml"
    run.write_text(EXAMPLE.read_text().replace('name = "mnist-cnn"',
                                               f'name = "mnist-cnn"\noutput = "{out}"').replace(
        "[tune]\n", f'[tune]\nstorage = "{storage}"\n'))
    (out / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert (out / "report.html").is_file()


def test_bench_times_a_saved_model_against_fp32_and_needs_the_run_file(tuned, capsys):
    _, _, out = tuned
    assert main(["bench", str(out / "model.autoq"), "--seconds", "0.3"]) == 2
    error = capsys.readouterr().err
    assert "--run RUN.toml" in error and f"the run file {EXAMPLE}" in error  # the file says where it came from
    assert main(["bench", str(out / "model.autoq"), "--run", str(EXAMPLE), "--seconds", "0.3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["model", "median"] and "(1, 1, 28, 28)" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"fp32", "int8"}
    job = prepare(load_run(EXAMPLE))  # the run's metric over all its eval data (the run judged halves of it)
    assert float(rows["int8"][4]) == pytest.approx(job.score(autoq.load(out / "model.autoq", job.model)), abs=1e-4)
    assert rows["fp32"][5] == "1.00x"


def test_export_writes_a_folder_that_plain_torch_runs(tuned, tmp_path, capsys):
    _, _, out = tuned
    assert main(["export", str(out / "model.autoq"), "--run", str(EXAMPLE), "--out", str(tmp_path / "deploy")]) == 0
    said = capsys.readouterr().out
    program = "model.pt2" if "model.pt2 (aoti" in said else "model.pt"  # PT2E picks export for AOTInductor
    assert f"{program} (" in said and ("torchscript" in said) == (program == "model.pt")
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["model.json", program, "run.py"]


def test_bench_rejects_a_file_that_is_not_an_autoq_model(tmp_path, capsys):
    (tmp_path / "x.autoq").write_bytes(b"not a model")
    assert main(["bench", str(tmp_path / "x.autoq")]) == 2
    assert "is not an autoq model file" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing.autoq")]) == 2
    assert "not found" in capsys.readouterr().err


def test_strategies_lists_every_preset(capsys):
    assert main(["strategies"]) == 0
    listed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == strategies()


def test_a_bad_run_file_exits_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("n_trials = 12", "n_trial = 12"))
    assert main(["tune", str(bad)]) == 2
    assert "Unknown key ['n_trial'] in [tune]" in capsys.readouterr().err
    assert main(["tune", str(EXAMPLE), "--strategy", "quick"]) == 2
    assert "Unknown strategy 'quick'" in capsys.readouterr().err
