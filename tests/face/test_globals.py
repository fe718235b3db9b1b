"""A library restores what it touches: autoq leaves torch's and Optuna's process-wide settings as it found them."""

import optuna
import torch
from torch import nn

import autoq
from autoq.cli import main
from autoq.measure.latency import _flush_denormal_enabled
from conftest import fast_settings


def process_settings() -> dict:
    return {"engine": torch.backends.quantized.engine, "threads": torch.get_num_threads(),
            "optuna": optuna.logging.get_verbosity(), "flush_denormal": _flush_denormal_enabled(),
            "grad": torch.is_grad_enabled()}


def test_tune_save_load_export_and_the_cli_leave_process_settings_unchanged(digits, tmp_path):
    original = process_settings()
    # settings autoq itself would never choose, so that restoring them cannot happen by accident
    torch.backends.quantized.engine = "onednn"
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    torch.set_flush_denormal(False)
    try:
        chosen = process_settings()
        model = digits.train(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), epochs=20)
        result = autoq.tune(model, (digits.x[:1],), digits.calib, digits.accuracy, n_trials=3, max_loss=0.05,
                            threads=2, space={"recipes": ["static"], "engines": ["fbgemm", "measured"]},
                            **fast_settings(tmp_path))
        assert process_settings() == chosen
        result.save(tmp_path / "m.autoq")
        autoq.load(tmp_path / "m.autoq", model)
        result.export(tmp_path / "export")
        assert main(["dispatch", "bench", "--out", str(tmp_path / "t.json"), "--threads", "2", "--limit", "2",
                     "--seconds", "0.01", "--passes", "1", "--quiet"]) == 0
        assert process_settings() == chosen
    finally:
        torch.backends.quantized.engine = original["engine"]
        torch.set_num_threads(original["threads"])
        optuna.logging.set_verbosity(original["optuna"])
        torch.set_flush_denormal(original["flush_denormal"])
