"""A storage URL's password never reaches logs, result.json, TuneResult.storage or the study's records."""

import json
from pathlib import Path

import optuna
import pytest
import sqlalchemy

import autoq.cli
from autoq.cli import main
from autoq.search.study import RUN_ATTR, redacted

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mnist_cnn.toml"
PASSWORD = "s3cret-pw"


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://alice:s3cret-pw@db.example:5432/runs?sslmode=require",
     "postgresql+psycopg://alice:***@db.example:5432/runs?sslmode=require"),
    ("mysql://alice:s3cret%40pw@db.example/runs", "mysql://alice:***@db.example/runs"),
    ("postgresql://alice:s3cret@pw@db.example/runs", "postgresql://alice:***@db.example/runs"),  # '@' not escaped
    ("postgresql://db.example/runs?user=alice&password=s3cret-pw",
     "postgresql://db.example/runs?user=alice&password=***"),
    ("redis://:s3cret-pw@cache.example:6379/0", "redis://:***@cache.example:6379/0"),
    ("postgresql+psycopg://alice@db.example/runs?b=1&a=2", "postgresql+psycopg://alice@db.example/runs?b=1&a=2"),
    ("sqlite:///autoq-runs/autoq.db", "sqlite:///autoq-runs/autoq.db"),
    ("sqlite:////tmp/a:b@c/autoq.db", "sqlite:////tmp/a:b@c/autoq.db"),
    ("autoq-runs/journal.log", "autoq-runs/journal.log"),
])
def test_redacted_hides_only_the_password(url, shown):
    assert redacted(url) == shown
    assert "s3cret" not in redacted(url)


def test_tune_with_a_password_in_the_storage_url_records_it_nowhere(fresh_postgres_url, tmp_path, capsys,
                                                                     monkeypatch):
    # the test server trusts loopback connections, so any password connects
    url = sqlalchemy.engine.make_url(fresh_postgres_url).set(password=PASSWORD).render_as_string(hide_password=False)
    opened = []
    write_report = autoq.cli._write_report
    monkeypatch.setattr(autoq.cli, "_write_report", lambda url, *args: opened.append(url) or write_report(url, *args))
    out = tmp_path / "out"
    assert main(["tune", str(EXAMPLE), "--storage", url, "--trials", "2", "--out", str(out)]) == 0
    assert opened == [url]  # the report reads the study with the real password
    err = capsys.readouterr().err
    assert f"in {redacted(url)}" in err and ":***@" in redacted(url)
    record = json.loads((out / "result.json").read_text())
    assert record["storage"] == redacted(url)
    study = optuna.load_study(study_name=record["study"], storage=url)
    assert study.user_attrs[RUN_ATTR]["config"]["storage"] == redacted(url)
    assert PASSWORD not in err
    assert [path.name for path in out.iterdir() if PASSWORD.encode() in path.read_bytes()] == []
