"""The shipped package: what the wheel holds (every package of the source tree, which an editable install
would hide a missing one of, and nothing of the demo zoo in zoo/), and what importing it costs."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names, as dotted paths
    (``from autoq import zoo`` gives both ``autoq`` and ``autoq.zoo``; relative imports resolved)."""
    package = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*parent, node.module] if node.module else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_the_demo_zoo():
    """The zoo (demo models, training, caches) is the separate autoq-zoo distribution in zoo/."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = [ROOT / "autoq", *(ROOT / folder for folder in setuptools["package-dir"].values())]
    modules = sorted(path for folder in folders for path in folder.rglob("*.py"))
    assert ROOT / "autoq" / "run" / "sources.py" in modules
    assert not [path for path in modules if path.stem == "zoo" or path.parent.name == "zoo"]
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in modules
        for name in _imported_modules(path)
        if name.split(".")[0] == "autoq_zoo" or "zoo" in name.split(".")
    }
    assert offenders == set()


def test_the_zoo_is_not_in_autoqs_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not [name for name in setuptools["packages"] if "zoo" in name]
    zoo_project = tomllib.loads((ROOT / "zoo" / "pyproject.toml").read_text())
    assert zoo_project["project"]["name"] == "autoq-zoo" and "autoq" in zoo_project["project"]["dependencies"]
    assert zoo_project["tool"]["setuptools"]["packages"] == ["autoq_zoo"]


# (modules, what they may not import): imports point down the pipeline (docs/architecture.md)
LAYERS = [
    (("autoq.recipes", "autoq.calibrate", "autoq.dispatch", "autoq.measure", "autoq.search", "autoq.config",
      "autoq.plan", "autoq.result", "autoq.report", "autoq.run", "autoq.model_file", "autoq.deploy", "autoq.files"),
     ("autoq.cli", "autoq.tuner")),
    (("autoq.recipes", "autoq.calibrate", "autoq.dispatch", "autoq.measure", "autoq.model_file", "autoq.deploy",
      "autoq.result"), ("autoq.search",)),
    (("autoq.measure", "autoq.calibrate", "autoq.dispatch"), ("autoq.recipes",)),
    (("autoq.config", "autoq.plan", "autoq.files"), ("autoq.recipes", "autoq.search", "autoq.calibrate",
                                                     "autoq.dispatch", "autoq.measure")),
]


def test_imports_point_down_the_pipeline():
    upward = []
    for path in sorted((ROOT / "autoq").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for sources, forbidden in LAYERS:
            if any(module == s or module.startswith(f"{s}.") for s in sources):
                upward += [f"{module} imports {target}" for target in _imported_modules(path)
                           for f in forbidden if (target == f or target.startswith(f"{f}.")) and not module.startswith(f)]
    assert upward == []
