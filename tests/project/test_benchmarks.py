"""The benchmark report: table rows, geomeans and the speed-vs-loss figure (on made-up numbers), and
the QAT recovery benchmark's control and trial reading."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from matplotlib.image import imread

from autoq.plan import QuantPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from core import Row, Tuning, by_runtime, coverage, peers_ahead, table  # noqa: E402
from plot import speed_vs_loss_png  # noqa: E402
from qat_recovery import best_all_int8_mse, fine_tune_fp32  # noqa: E402

ROWS = [
    Row("cnn", "FP32 eager", 0.9, 0.9, 0.0, 2.0, 1.0, 0.5),
    Row("cnn", "autoq", 0.9, 0.89, 0.011, 0.5, 4.0, 2.0, Tuning("static kernels=onednn", 12, 3, 41.6, 120.0,
                                                                 (0.004, 0.009)), (1.9, 2.1)),
    Row("cnn", "INC 3.10 autotune (PT2E static)", 0.5, 0.5, 0.44, 1.0, 2.0, 1.0, Tuning("act uint8", 4, None, None, 9.0)),
    Row("lstm", "FP32 eager", 0.8, 0.8, 0.0, 1.0, 1.0, 1.0),
    Row("lstm", "autoq", 0.8, 0.8, 0.0, 1.0, 1.0, 1.0, Tuning("dynamic", 8, 0, 2.4, 30.0)),
]


def test_table_reports_time_to_first_in_budget_model_and_geomeans():
    lines = table(ROWS)
    cells = {(r[0], r[1]): r for r in ([c.strip() for c in line.split("|")[1:-1]] for line in lines[2:])}
    assert cells["cnn", "**autoq**"][11:] == ["#3, 42 s", "120"]
    assert cells["cnn", "INC 3.10 autotune (PT2E static)"][11] == "-"  # never within budget
    assert cells["cnn", "**autoq**"][5:7] == ["+1.10%", "+0.40% (+0.90%)"]  # test loss; confirmed loss (bound)
    assert cells["cnn", "**autoq**"][9] == "2.00x [1.90-2.10]"
    autoq_geomean = cells["geomean (2 models)", "autoq"]
    assert autoq_geomean[8:10] == ["2.00x", "1.41x"]  # sqrt(4 * 1), sqrt(2 * 1)
    assert cells["geomean (1 models)", "INC 3.10 autotune (PT2E static)"][8] == "2.00x"


def test_coverage_counts_bounds_that_held_on_the_test_split():
    assert coverage(ROWS) == ["- autoq's 90% upper bound covered the test-split loss in 0 of 1 tuned runs; autoq's "
                              "pick stayed within the 1% budget on the test split on 1 of 2 models."]


def test_figure_has_a_panel_per_model(tmp_path):
    path = tmp_path / "results.png"
    speed_vs_loss_png(ROWS, path)
    height, width, _ = imread(path).shape
    assert (width, height) == (1500, 420)  # 2 model panels + the legend in one row, 100 dpi


def test_peers_ahead_lists_faster_methods_within_budget_only():
    faster = Row("cnn", "default FX PTQ (fbgemm)", 0.9, 0.9, 0.005, 0.4, 5.0, 2.5)
    faster_over_budget = Row("cnn", "bf16 autocast (compiled)", 0.9, 0.8, 0.02, 0.3, 6.0, 3.0)
    lines = peers_ahead([*ROWS, faster, faster_over_budget])
    assert lines == ["- cnn: default FX PTQ (fbgemm) 2.50x vs autoq 2.00x best PyTorch FP32 "
                     "(held-out loss +0.50% vs +1.10%)"]


def test_by_runtime_sets_autoq_beside_the_fastest_in_budget_method_of_each_runtime():
    rows = [*ROWS,
            Row("cnn", "NNCF default PTQ (OpenVINO)", 0.9, 0.88, 0.02, 0.2, 10.0, 5.0),  # over budget
            Row("cnn", "NNCF accuracy control (OpenVINO)", 0.9, 0.9, 0.005, 0.4, 5.0, 2.5),
            Row("cnn", "OpenVINO FP32", 0.9, 0.9, 0.0, 1.0, 2.0, 1.0),
            Row("cnn", "autoq, QAT recipes pinned", 0.9, 0.9, 0.0, 0.1, 20.0, 10.0)]  # autoq itself: no peer
    lines = by_runtime(rows)
    cells = {r[0]: r[1:] for r in ([c.strip() for c in line.split("|")[1:-1]] for line in lines[2:])}
    assert cells["cnn"] == ["static, +1.10%, 2.00x", "FP32 eager, +0.00%, 0.50x",
                            "NNCF accuracy control (OpenVINO), +0.50%, 2.50x", "-", "0.80x"]
    assert cells["lstm"][-1] == "1.00x"
    lowered = QuantPlan(recipe="pt2e-static", lowering="openvino").to_dict()
    ov_pick = Row("lstm", "autoq", 0.8, 0.8, 0.0, 1.0, 1.0, 1.0, Tuning("pt2e-static kernels=openvino", 8, 0, 2.4,
                                                                     30.0, plan=lowered))
    assert by_runtime([ROWS[3], ov_pick])[2].startswith("| lstm | pt2e-static lowered by OpenVINO, +0.00%, 1.00x |")


def test_qat_recovery_control_fine_tunes_a_copy_and_reads_all_int8_trials():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(x, x) for x in torch.randn(64, 4).split(16)]
    tuned = fine_tune_fp32(model, batches, epochs=2, lr=1e-2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched
    assert not torch.equal(tuned[0].weight, model[0].weight) and not tuned.training

    def row(metric, fp32_layers):
        return {"metric": metric, "plan": QuantPlan(fp32_layers=fp32_layers).to_dict()}
    result = SimpleNamespace(trials=[row(1.0, ["a"]), row(2.0, []), row(3.0, []), {"metric": None}])
    assert best_all_int8_mse(result) == 2.0  # the fallback trial and the failed one do not count
