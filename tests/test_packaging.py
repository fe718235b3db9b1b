"""The shipped package: what the wheel holds, and what importing it costs."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_of_autoq_is_in_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "autoq").rglob("__init__.py")}
    assert on_disk - set(setuptools["packages"]) == set()
    mapped = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    assert all(folder.is_dir() for folder in mapped.values())


def test_importing_autoq_and_its_config_types_loads_no_heavy_module():
    probe = ("import sys, autoq; autoq.TuneConfig, autoq.QuantPlan, autoq.SearchSpace; "
             "print(sorted(m for m in ('torch', 'torchao', 'optuna', 'autoq.tuner', 'autoq.recipes') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
    probe = "import autoq; print(autoq.tune.__module__, autoq.TuneResult.__name__, 'export' in dir(autoq))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split() == [
        "autoq.tuner", "TuneResult", "True"]
