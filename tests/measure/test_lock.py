"""autoq.measure.lock: a private per-user lock file, refused when others could tamper with it, with a timeout.

(That workers really take turns under the lock is tested in test_resume.py.)
"""

import fcntl
import os
import stat
import tempfile
import time

import pytest

from autoq.measure.lock import lock_path, measurement_lock


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """No XDG_RUNTIME_DIR and tempfile.gettempdir() == tmp_path: the lock goes to tmp_path/autoq-<uid>."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_the_lock_is_per_user_in_a_private_directory(temp_dir, monkeypatch):
    path = lock_path()
    assert path == temp_dir / f"autoq-{os.getuid()}" / "measure.lock"
    assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
    with measurement_lock(True):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    runtime = temp_dir / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert lock_path() == runtime / "autoq" / "measure.lock"


def test_a_symlinked_lock_directory_is_refused(temp_dir):
    elsewhere = temp_dir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (temp_dir / f"autoq-{os.getuid()}").symlink_to(elsewhere)
    with pytest.raises(ValueError, match=f"autoq-{os.getuid()} is a symbolic link.*rm "):
        with measurement_lock(True):
            pass
    assert os.listdir(elsewhere) == []


def test_a_lock_directory_others_can_write_is_refused(temp_dir):
    directory = temp_dir / f"autoq-{os.getuid()}"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(ValueError, match=r"writable by other users \(mode 777\).*chmod 700"):
        lock_path()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_lock_directory_of_another_user_is_refused(temp_dir):
    directory = temp_dir / f"autoq-{os.getuid()}"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(ValueError, match="belongs to user id 65534"):
        lock_path()


def test_a_symlinked_lock_file_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "measure.lock").symlink_to(victim)
    with pytest.raises(ValueError, match="is a symbolic link"):
        with measurement_lock(True, tmp_path / "measure.lock"):
            pass


def test_waiting_for_a_held_lock_times_out_with_the_path_and_what_to_do(tmp_path):
    path = tmp_path / "measure.lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # another open file description: another worker
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"Waited 0\.[3-9] s for the measurement lock {path}.*measure_lock"):
            with measurement_lock(True, path, timeout=0.3):
                pytest.fail("got a lock another worker holds")
        assert 0.3 <= time.monotonic() - started < 2
        fcntl.flock(holder, fcntl.LOCK_UN)
        with measurement_lock(True, path, timeout=0.3):
            with pytest.raises(BlockingIOError):  # now this worker holds it
                fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(holder)
