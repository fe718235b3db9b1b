"""The wheel holds every package of the source tree (an editable install would hide a missing one)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_of_autoq_is_in_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "autoq").rglob("__init__.py")}
    assert on_disk - set(setuptools["packages"]) == set()
    mapped = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    assert all(folder.is_dir() for folder in mapped.values())
