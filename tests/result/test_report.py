"""The tuning report (HTML + PNG) from a study alone, finished or not; optuna-dashboard reads the same storage."""

import base64
import json
import re
import wsgiref.util
from html.parser import HTMLParser

import optuna
import pytest
from optuna.trial import TrialState
from optuna_dashboard import wsgi

import autoq
from autoq.plan import QuantPlan
from autoq.report import write_report
from autoq.search.study import RESULT_ATTR, RUN_ATTR, SENSITIVITY_ATTR
from conftest import fast_settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NASTY_ERROR = """eval_fn raised ValueError: <script>alert("x")</script> & 'quotes'"""


class ReportPage(HTMLParser):
    """The parts of report.html a reader sees: text, tables (by id) as rows of cell texts, images."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables, self.images, self.text = {}, [], []
        self._table = self._row = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "id" in attrs:
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def column(self, table: str, header_index: int) -> list[str]:
        return [row[header_index] for row in self.tables[table]]

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())


@pytest.fixture(scope="module")
def tuned(mnist_task, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    result = autoq.tune(mnist_task.model, mnist_task.example_inputs, mnist_task.calib, mnist_task.eval_fn(),
                        n_trials=6, **fast_settings(tmp_path, latency_seconds=0.1))
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    paths = write_report(study, tmp_path / "out" / "report")
    return result, study, paths


def test_writes_html_and_valid_pngs_that_the_page_inlines(tuned):
    _, _, paths = tuned
    assert set(paths) == {"html", "pareto", "history"}
    assert paths["html"].name == "report.html" and paths["html"].parent.is_dir()
    page = ReportPage(paths["html"].read_text(encoding="utf-8"))
    inlined = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in page.images]
    for name in ("pareto", "history"):
        png = paths[name].read_bytes()
        assert paths[name].name == f"{name}.png"
        assert png.startswith(PNG_MAGIC) and len(png) > 20_000, f"{name}.png is not a real plot"
        assert png in inlined, f"{name}.png is not the image inlined in report.html"


def test_html_is_self_contained(tuned):
    _, _, paths = tuned
    text = paths["html"].read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert all(src.startswith("data:image/png;base64,") for src in ReportPage(text).images)


def test_header_shows_status_baseline_budget_counts_and_final_measurement(tuned):
    result, study, paths = tuned
    page = ReportPage(paths["html"].read_text(encoding="utf-8"))
    text = page.plain
    assert result.study_name in text and "finished" in text and "best so far" not in text
    assert f"{result.baseline_accuracy:.4f}" in text
    assert "loss <= 1.00% of baseline (relative)" in text
    states = [trial.state.name for trial in study.trials if trial.state.is_finished()]
    assert all(f"{state}: {states.count(state)}" in text for state in set(states))
    assert f"{result.speedup:.2f}x (final side-by-side measurement)" in text
    assert f"{result.precision} {result.latency_ms['int8']:.3f} ms" in text
    assert all(" ".join(note.split()) in text for note in result.notes)


def test_trial_table_lists_every_trial_and_marks_the_chosen_one(tuned):
    result, _, paths = tuned
    page = ReportPage(paths["html"].read_text(encoding="utf-8"))
    rows = page.tables["trials"]
    assert [int(row[0]) for row in rows] == [trial["number"] for trial in result.trials]
    assert [row[1] for row in rows] == [trial["state"] for trial in result.trials]
    assert [row[7].split(" [")[0] for row in rows] == [f"{trial['speedup']:.2f}x" if trial["speedup"] is not None
                                                       else "–" for trial in result.trials]
    assert all(row[7].endswith("]") for row, trial in zip(rows, result.trials) if trial["speedup_interval"])
    for row, trial in zip(rows, result.trials):
        evaluated = trial["state"] == "COMPLETE"
        assert row[8] == ({True: "yes", False: "no"}[trial["feasible"]] if evaluated else "–")
    text = paths["html"].read_text(encoding="utf-8")
    chosen = re.findall(r'<tr class="chosen[^"]*"><td class="num">(\d+)</td>', text)
    assert len(chosen) == 1
    assert QuantPlan.from_dict(result.trials[int(chosen[0])]["plan"]) == QuantPlan.from_dict(result.plan)


def test_layer_table_matches_the_chosen_plan_per_layer(tuned):
    result, _, paths = tuned
    page = ReportPage(paths["html"].read_text(encoding="utf-8"))
    rows = page.tables["layers"]
    assert [row[0] for row in rows] == [layer["name"] for layer in result.layers]
    for row, layer in zip(rows, result.layers):
        assert row[1] == f"{layer['sqnr_db']:.1f}"
        assert row[3] == ("int8" if layer["quantized"] else "FP32")
        assert row[5] == (layer["engine"] if layer["quantized"] else "–")
    ranks = sorted(range(len(rows)), key=lambda i: result.layers[i]["sqnr_db"])
    assert [rows[i][2] for i in ranks] == [str(r + 1) for r in range(len(rows))]


def test_optuna_dashboard_opens_the_storage_unchanged(tuned):
    result, study, _ = tuned
    app = wsgi(result.storage)

    def get(path):
        environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}
        wsgiref.util.setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
        assert status[0].startswith("200"), (path, status, body[:300])
        return json.loads(body)

    listed = {s["study_name"]: s for s in get("/api/studies")["study_summaries"]}
    assert result.study_name in listed
    detail = get(f"/api/studies/{listed[result.study_name]['study_id']}")
    assert detail["name"] == result.study_name
    assert [t["number"] for t in detail["trials"]] == [t.number for t in study.trials]
    assert {a["key"] for a in detail["user_attrs"]} >= {RUN_ATTR, RESULT_ATTR, SENSITIVITY_ATTR}
    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert complete and all({"loss", "speedup", "plan"} <= {a["key"] for a in t["user_attrs"]} for t in complete)


# Synthetic studies: the edge cases, cheaply (no model, no timing).

LAYERS = ["features.0", "features.3", "classifier.fc"]


def synthetic_study(*trials, loss_type="relative", max_loss=0.01, baseline=0.9, name="synthetic <study>"):
    study = optuna.create_study(study_name=name, direction="maximize")
    study.set_user_attr(RUN_ATTR, {"baseline": baseline, "layers": {"static": LAYERS},
                                   "config": {"max_loss": max_loss, "loss_type": loss_type, "n_trials": 20}})
    study.set_user_attr(SENSITIVITY_ATTR, {"static": {"features.0": 18.5, "features.3": 31.25, "classifier.fc": 1e9}})
    for state, loss, speedup, plan, error in trials:
        attrs = {"plan": plan.to_dict(), "plan_key": plan.key(), "speedup": speedup, "error": error}
        if loss is not None:
            attrs.update(metric=baseline * (1 - loss), loss=loss, int8_ms=1.0 / speedup, fp32_ms=1.0)
        study.add_trial(optuna.trial.create_trial(
            state=state, value=speedup if state == TrialState.COMPLETE else None,
            user_attrs={k: v for k, v in attrs.items() if v is not None},
            constraints=None if loss is None else {"accuracy_loss": loss - max_loss},
        ))
    return study


MEASURED = QuantPlan(dispatch="measured", layer_engines={"features.0": "onednn", "features.3": "fbgemm"},
                     fp32_layers=["classifier.fc"], layer_observers={"features.0": "kl"})
UNFINISHED = (
    (TrialState.COMPLETE, 0.004, 1.5, QuantPlan(engine="fbgemm"), None),
    (TrialState.COMPLETE, 0.03, 2.5, QuantPlan(engine="onednn", reduce_range=False), None),
    (TrialState.FAIL, None, None, QuantPlan(activation_observer="kl"), NASTY_ERROR),
    (TrialState.PRUNED, None, 1.2, QuantPlan(engine="onednn"), None),
    (TrialState.COMPLETE, 0.008, 1.8, MEASURED, None),
)


def test_unfinished_run_shows_best_so_far_with_its_plan_per_layer(tmp_path):
    study = synthetic_study(*UNFINISHED)
    study.ask()  # a trial still running (or left behind by a killed run)
    paths = write_report(study, tmp_path / "new" / "dir")
    page = ReportPage(paths["html"].read_text(encoding="utf-8"))
    text = page.plain
    assert "best so far" in text and "has not finished" in text
    assert "Best plan so far (trial 4)" in text and "running (or left by a killed run): 1" in text
    assert "1.80x (trial 4)" in text and "+0.80% (within budget)" in text
    assert [row[0] for row in page.tables["layers"]] == LAYERS
    assert page.column("layers", 5) == ["onednn", "fbgemm", "–"]  # per-layer kernels; FP32 layer has none
    assert page.column("layers", 3) == ["int8", "int8", "FP32"]
    assert page.column("layers", 4) == ["kl", "histogram", "–"]
    assert page.column("layers", 1) == ["18.5", "31.2", "lossless"]
    assert page.column("trials", 2) == ["fbgemm", "onednn", "x86", "onednn", "measured 1/1"]
    assert page.column("trials", 8) == ["yes", "no", "–", "–", "yes"]
    for name in ("pareto", "history"):
        assert paths[name].read_bytes().startswith(PNG_MAGIC)


def test_text_from_the_study_is_escaped(tmp_path):
    study = synthetic_study(*UNFINISHED)
    text = write_report(study, tmp_path)["html"].read_text(encoding="utf-8")
    assert "<script>" not in text and "<study>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;quotes&#x27;" in text
    assert "synthetic &lt;study&gt;" in text
    assert ReportPage(text).column("trials", 9)[2] == NASTY_ERROR


def test_absolute_budget_is_shown_in_metric_units(tmp_path):
    study = synthetic_study(*UNFINISHED, loss_type="absolute", max_loss=0.02)
    page = ReportPage(write_report(study, tmp_path)["html"].read_text(encoding="utf-8"))
    assert "loss <= 0.0200 (absolute, metric units)" in page.plain
    assert page.column("trials", 6) == ["+0.0040", "+0.0300", "–", "–", "+0.0080"]


def test_nothing_in_budget_yet_shows_the_lowest_loss_trial(tmp_path):
    study = synthetic_study(*UNFINISHED, max_loss=0.001)
    page = ReportPage(write_report(study, tmp_path)["html"].read_text(encoding="utf-8"))
    assert "Best plan so far (trial 0)" in page.plain and "(OVER budget)" in page.plain
    assert "no trial meets the accuracy budget yet" in page.plain


def test_study_without_evaluated_trial_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"study 'empty' has no evaluated trial yet \(0 finished\); run `autoq tune`"):
        write_report(synthetic_study(name="empty"), tmp_path)
    failed = synthetic_study(UNFINISHED[2], name="failed")
    with pytest.raises(ValueError, match="has no evaluated trial yet .1 finished, first error: eval_fn raised"):
        write_report(failed, tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_study_not_written_by_autoq_is_a_clear_error(tmp_path):
    study = optuna.create_study(study_name="plain")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    with pytest.raises(ValueError, match="study 'plain' has no 'autoq_run' attribute.*run `autoq tune`"):
        write_report(study, tmp_path)
