"""Model files are data: opening one never runs code from it, and the model is rebuilt from code + plan."""

import io
import os
import pickle
import types
import warnings

import pytest
import torch
from torch import nn

import autoq
from autoq.cli import main
from autoq.plan import QuantPlan

import nets
from nets import Net, Recurrent, fresh, tuned_model


@pytest.mark.parametrize("recipe, cls, plan, dispatch", [
    ("static", Net, {"reduce_range": False, "fold_relu6": True, "weight_bits": 7}, "measured"),
    ("static", Net, {"channels_last": True, "fp32_layers": ["head"]}, None),
    ("static", Net, {"equalization": "cross_layer", "bias_correction": True, "adaround": True, "fp32_layers": ["head"]}, None),
    ("dynamic", Recurrent, {}, None),
    ("qat", Net, {}, None),
    ("pt2e-static", Net, {"fp32_layers": ["depthwise"], "bias_correction": True}, None),
])
def test_a_saved_model_is_rebuilt_from_another_instance_with_identical_outputs(tmp_path, recipe, cls, plan,
                                                                                dispatch):
    model, x = tuned_model(recipe, cls, dispatch, **plan)
    autoq.save(model, tmp_path / "m.autoq")
    other = fresh(cls, seed=1)  # other weights: everything the int8 model computes with must come from the file
    before = {name: value.clone() for name, value in other.state_dict().items()}
    loaded = autoq.load(tmp_path / "m.autoq", other)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert all(torch.equal(value, before[name]) for name, value in other.state_dict().items())  # untouched
    assert loaded.meta["autoq"]["plan"] == model.meta["autoq"]["plan"]


def test_output_scales_float32_cannot_hold_survive_exactly(tmp_path):
    model, x = tuned_model("static", reduce_range=False, fold_relu6=True, weight_bits=7)
    scales = {name: m.scale for name, m in model.named_modules() if isinstance(getattr(m, "scale", None), float)}
    assert any(scale != float(torch.tensor(scale)) for scale in scales.values())  # a folded ReLU6's 6/255-like scale
    autoq.save(model, tmp_path / "m.autoq")
    loaded = autoq.load(tmp_path / "m.autoq", fresh())
    assert {name: m.scale for name, m in loaded.named_modules() if name in scales} == scales


def test_a_pickled_model_file_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.autoq"
    _write_version_1(path, _Evil(marker))
    with pytest.raises(ValueError, match="trusted=True") as error:
        autoq.load(path, fresh())
    assert "runs code stored in the file" in str(error.value)
    run = tmp_path / "run.toml"
    run.write_text(f'[model]\nfactory = "{os.path.abspath(nets.__file__)}:fresh"\n[calib]\nbuiltin = "digits"\n'
                   f'[eval]\nbuiltin = "digits"\n')
    for command in (["bench", str(path), "--run", str(run)], ["export", str(path), "--run", str(run), "--out",
                    str(tmp_path / "out")], ["dispatch", "apply", str(path), "shipped", "--run", str(run),
                                             "--out", str(tmp_path / "new.autoq")]):
        assert main(command) == 2, command
        assert "--trusted" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "new.autoq").exists()


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


def _write_version_1(path, model, pickle_module=pickle):
    """A file in autoq 0.1's format: a torch.save'd dict with the model pickled inside."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model, buffer, pickle_module=pickle_module)
    torch.save({"format": "autoq.model", "version": 1, "config": QuantPlan().to_dict(), "summary": {},
                "layer_shapes": {}, "inputs": [], "torch_version": str(torch.__version__),
                "model": buffer.getvalue()}, path)


def test_an_old_pickled_file_loads_only_when_trusted_and_saves_again_safely(tmp_path):
    model, x = tuned_model("static")
    old = tmp_path / "old.autoq"
    _write_version_1(old, model, _old_pickle_module())
    with pytest.raises(ValueError, match="old pickled model format"):
        autoq.load(old)
    with pytest.warns(UserWarning, match="runs code stored in the file"):
        trusted = autoq.load(old, trusted=True)
    with torch.no_grad():
        assert torch.equal(trusted(x), model(x))
    trusted.meta["autoq"]["inputs"] = model.meta["autoq"]["inputs"]  # 0.1 files did not always record them
    autoq.save(trusted, tmp_path / "new.autoq")
    with torch.no_grad():
        assert torch.equal(autoq.load(tmp_path / "new.autoq", fresh())(x), model(x))


def _old_pickle_module():
    """The pickle module autoq 0.1 saved with: quantized modules through autoq.result._rebuild_module."""
    from autoq import result

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, nn.Module) and type(obj).__module__.startswith("torch.ao.nn"):
                state = obj.__getstate__()
                if isinstance(state, tuple):
                    return result._rebuild_module, (type(obj), state)
            return NotImplemented

    module = types.ModuleType("autoq_pickle")
    module.Pickler = Pickler
    return module


def test_a_model_of_another_architecture_is_refused_naming_the_difference(tmp_path):
    model, _ = tuned_model("static")
    autoq.save(model, tmp_path / "m.autoq")
    with pytest.raises(ValueError, match="does not fit the model passed"):
        autoq.load(tmp_path / "m.autoq", fresh(Recurrent))
    with pytest.raises(ValueError, match="not its code: pass the FP32 model"):
        autoq.load(tmp_path / "m.autoq")


def test_a_model_whose_code_computes_otherwise_fails_the_output_check(tmp_path):
    model, x = tuned_model("static", gain=1.0)
    autoq.save(model, tmp_path / "m.autoq")
    with pytest.raises(ValueError, match="does not reproduce the outputs recorded"):
        autoq.load(tmp_path / "m.autoq", fresh(gain=1.0 + 2**-4))
    unchecked = autoq.load(tmp_path / "m.autoq", fresh(gain=1.0 + 2**-4), check=False)
    with torch.no_grad():
        assert not torch.equal(unchecked(x), model(x))  # loaded as asked, computing what its code says


def test_a_corrupted_or_truncated_file_is_refused(tmp_path):
    model, _ = tuned_model("static")
    path = tmp_path / "m.autoq"
    autoq.save(model, path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a weight byte
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its checksum"):
        autoq.load(path, fresh())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="not an autoq model file"):
        autoq.load(path, fresh())
    (tmp_path / "x.autoq").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not an autoq model file"):
        autoq.load(tmp_path / "x.autoq", fresh())
