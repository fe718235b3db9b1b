import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import autoq_zoo as zoo


@pytest.fixture(scope="session")
def mnist_task():
    """Small CNN trained on MNIST-5k (cached after the first run)."""
    return zoo.mnist_cnn_task(seed=0)


@pytest.fixture(autouse=True)
def _quiet_torch_ao_deprecations():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torch.ao")
        yield


def fast_settings(tmp_path, **overrides):
    """Settings that keep a tuning test to seconds."""
    settings = dict(storage=f"sqlite:///{tmp_path / 'study.db'}", compile_fp32=False, latency_seconds=0.2,
                    verbose=False, seed=0)
    settings.update(overrides)
    return settings


def hide_package(monkeypatch: pytest.MonkeyPatch, package: str, search_location: Path | None = None) -> None:
    """Make ``importlib.util.find_spec(package)`` report it missing, or installed at ``search_location``."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        if name != package:
            return real_find_spec(name, *args)
        if search_location is None:
            return None
        return SimpleNamespace(submodule_search_locations=[str(search_location)])

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def state_of(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


class DigitsData:
    """sklearn's 8x8 digits as (train, val) tensors; fast enough to train models inside tests."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        self.x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        self.y = torch.tensor(labels)
        self.calib = [self.x[i : i + 32] for i in range(0, 128, 32)]

    def train(self, model: torch.nn.Module, epochs: int = 60, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(epochs):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(self.x[:1200]), self.y[:1200]).backward()
            optimizer.step()
        return model.eval()

    def accuracy(self, model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((model(self.x[1200:]).argmax(1) == self.y[1200:]).float().mean())


@pytest.fixture(scope="session")
def digits():
    return DigitsData()


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL of a database on a throwaway PostgreSQL server on 127.0.0.1 (tests/postgres.py).

    Skips when PostgreSQL is not installed, unless AUTOQ_REQUIRE_POSTGRES=1 (CI): then the test fails.
    """
    import os

    from postgres import PostgresUnavailable, postgres_server

    try:
        with postgres_server() as url:
            yield url
    except PostgresUnavailable as reason:
        if os.environ.get("AUTOQ_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"AUTOQ_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
        pytest.skip(f"PostgreSQL unavailable: {reason}")


@pytest.fixture
def fresh_postgres_url(postgres_url, request):
    """URL of a new, empty database on the test PostgreSQL server (named after the test)."""
    import sqlalchemy

    database = "fresh_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {database}"))
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
    finally:
        engine.dispose()
    return f"{postgres_url.rsplit('/', 1)[0]}/{database}"


# run.py in an isolated interpreter (-I: no PYTHONPATH, no working directory) where importing autoq fails
CHILD = ("import runpy, sys; sys.modules['autoq'] = None; sys.argv = ['run.py', {inputs!r}, {outputs!r}]; "
         "runpy.run_path({run!r}, run_name='__main__')")


def run_exported(folder, inputs, tmp_path):
    """The outputs of the exported model in `folder` on `inputs`, computed by its run.py without autoq."""
    torch.save(tuple(inputs), tmp_path / "inputs.pt")
    child = CHILD.format(inputs=str(tmp_path / "inputs.pt"), outputs=str(tmp_path / "outputs.pt"),
                         run=str(folder / "run.py"))
    done = subprocess.run([sys.executable, "-I", "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(tmp_path / "outputs.pt", weights_only=True)
