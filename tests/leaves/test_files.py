"""autoq.files: a file written with write_atomic / replacing is its old or its new content, never a mix."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import autoq.files
from autoq.files import replacing, write_atomic

SIZE = 20 << 20  # bytes: large enough that a kill often lands in the middle of a write
WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1])  # without importing autoq (and torch)
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
payloads = [b"A" * int(sys.argv[3]), b"B" * int(sys.argv[3])]
for step in range(10**9):
    files.write_atomic(sys.argv[2], payloads[step % 2])
"""


def test_a_writer_killed_at_any_moment_leaves_the_old_or_the_new_content(tmp_path):
    path = tmp_path / "payload.bin"
    rng = random.Random(0)
    for _ in range(5):
        path.unlink(missing_ok=True)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, autoq.files.__file__, str(path), str(SIZE)])
        deadline = time.monotonic() + 5
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert path.exists(), "the writer did not write a first payload in 5 s"
        time.sleep(rng.uniform(0, 0.3))
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=10) == -signal.SIGKILL  # killed mid-loop, not finished or crashed
        data = path.read_bytes()
        assert len(data) == SIZE and data in (b"A" * SIZE, b"B" * SIZE)


def test_an_error_while_replacing_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "table.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="half-way"):
        with replacing(path) as temporary:
            assert temporary.parent == tmp_path and temporary.name.startswith(".table.json.")
            temporary.write_text("new, half written")
            raise RuntimeError("half-way")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["table.json"]


def test_replacing_a_file_keeps_the_other_files_and_gives_the_usual_permissions(tmp_path):
    (tmp_path / "model.autoq").write_bytes(b"model")
    path = tmp_path / "report.html"
    path.write_text("old report")
    umask = os.umask(0o027)
    try:
        write_atomic(path, "new report \u2713")
        write_atomic(tmp_path / "pareto.png", b"\x89PNG")
    finally:
        os.umask(umask)
    assert sorted(os.listdir(tmp_path)) == ["model.autoq", "pareto.png", "report.html"]
    assert (tmp_path / "model.autoq").read_bytes() == b"model"
    assert path.read_bytes() == "new report \u2713".encode("utf-8")
    assert (tmp_path / "pareto.png").read_bytes() == b"\x89PNG"
    assert {os.stat(tmp_path / name).st_mode & 0o777 for name in ("report.html", "pareto.png")} == {0o640}


def test_replacing_writes_a_fresh_file_instead_of_following_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    link = tmp_path / "result.json"
    link.symlink_to(victim)
    write_atomic(link, "{}")
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and Path(link).read_text() == "{}"
