"""Exports run with plain PyTorch in a fresh process without autoq and reproduce the tuned model."""

import json

import pytest
import torch

import autoq
from autoq.dispatch.table import current_cpu
from autoq.plan import QuantPlan
from conftest import run_exported
from nets import FBGEMM_PLAN, X, Recurrent, fresh, saturation_net, tuned_model, two_entry_table

def test_torchscript_export_keeps_each_layers_kernel_library(tmp_path):
    fp32 = saturation_net()
    mixed = autoq.quantize(fp32, FBGEMM_PLAN, X, [X], dispatch=two_entry_table(current_cpu(), "onednn"))
    assert QuantPlan.from_dict(mixed.meta["autoq"]["plan"]).layer_engines == {"0": "onednn", "1": "fbgemm"}
    everything_fbgemm = autoq.quantize(fp32, FBGEMM_PLAN, X, [X])
    with torch.no_grad():
        expected = mixed(X)
        assert not torch.equal(expected, everything_fbgemm(X))  # FBGEMM's depthwise kernel saturates on X
    written = autoq.export(mixed, tmp_path / "export")
    assert written.format == "torchscript" and written.size_bytes == written.model_file.stat().st_size > 0
    manifest = json.loads((tmp_path / "export" / "model.json").read_text())
    assert manifest["layer_engines"] == {"0": "onednn", "1": "fbgemm"} and manifest["engine"] == "fbgemm"
    assert torch.equal(run_exported(written.directory, [X], tmp_path), expected)


def test_an_eager_dynamic_model_exports_as_torchscript(tmp_path):
    model, x = tuned_model("dynamic", Recurrent)
    written = autoq.export(model, tmp_path / "export")
    assert json.loads((written.directory / "model.json").read_text())["capture"] == "script"
    with torch.no_grad():
        assert torch.allclose(run_exported(written.directory, [x], tmp_path), model(x), rtol=1e-5, atol=1e-6)


def test_a_pt2e_plan_exports_an_aoti_package(tmp_path):
    model, x = tuned_model("pt2e-static")
    written = autoq.export(model, tmp_path / "export")
    assert written.format == "aoti" and written.model_file.suffix == ".pt2"
    with torch.no_grad():
        assert torch.equal(run_exported(written.directory, [x], tmp_path), model(x))


def test_a_model_torchscript_cannot_compile_is_traced_with_a_warning(tmp_path):
    model, x = tuned_model("dynamic", Recurrent)
    model.forward = lambda inputs: type(model).forward(model, inputs)  # a Python attribute script cannot compile
    with pytest.warns(UserWarning, match="traced on inputs of its tuned shapes"):
        written = autoq.export(model, tmp_path / "export")
    assert json.loads((written.directory / "model.json").read_text())["capture"] == "trace"
    with torch.no_grad():
        assert torch.allclose(run_exported(written.directory, [x], tmp_path), model(x), rtol=1e-5, atol=1e-6)


def test_export_replaces_only_an_earlier_export(tmp_path):
    model, _ = tuned_model("static")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an autoq export folder"):
        autoq.export(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    autoq.export(model, tmp_path / "export")
    (tmp_path / "export" / "stale.txt").write_text("from the first export")
    autoq.export(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.json", "model.pt", "run.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]  # no staging folder left behind


def test_a_loaded_model_exports_like_the_tuned_one(tmp_path):
    model, x = tuned_model("static", reduce_range=False)
    autoq.save(model, tmp_path / "m.autoq")
    written = autoq.export(autoq.load(tmp_path / "m.autoq", fresh()), tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(run_exported(written.directory, [x], tmp_path), model(x))


@pytest.mark.parametrize("rewrite, format", [("folded", "torchscript"), ("compiled", "aoti")])
def test_a_float_plan_exports_its_rewritten_fp32_model(tmp_path, rewrite, format):
    model, x = tuned_model("fp32", rewrite=rewrite)
    written = autoq.export(model, tmp_path / "export")
    assert written.format == format
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(run_exported(written.directory, [x], tmp_path), expected, rtol=1e-4,
                              atol=1e-4 * expected.abs().max().item())
