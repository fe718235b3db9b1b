"""A per-user lock that makes co-located workers take turns when they time candidates.

The lock file lives in a directory only its user can write ($XDG_RUNTIME_DIR/autoq, else
<temp dir>/autoq-<uid>), so another user can neither block autoq by creating it first nor
redirect it with a symlink.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = "measure.lock"
TIMEOUT_SECONDS = 600.0  # default wait for the lock before giving up
POLL_SECONDS = 0.1  # how often a waiting worker retries


def lock_path() -> Path:
    """This user's lock file, in a private directory (mode 0700) created if needed.

    Raises ValueError if that directory is a symlink, not this user's, or writable by others.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.stat(runtime).st_uid == os.getuid():
        directory = Path(runtime) / "autoq"
    else:
        directory = Path(tempfile.gettempdir()) / f"autoq-{os.getuid()}"
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    _check_private(directory)
    return directory / LOCK_NAME


def _check_private(directory: Path) -> None:
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        problem, fix = "is a symbolic link", f"Remove it (`rm {directory}`)"
    elif not stat.S_ISDIR(info.st_mode):
        problem, fix = "is not a directory", f"Remove it (`rm {directory}`)"
    elif info.st_uid != os.getuid():
        problem, fix = (f"belongs to user id {info.st_uid}, not to you ({os.getuid()})",
                        "Ask its owner or an administrator to remove it")
    elif info.st_mode & 0o022:
        problem, fix = (f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})",
                        f"Make it private (`chmod 700 {directory}`)")
    else:
        return
    raise ValueError(f"The measurement lock directory {directory} {problem}, so another user could block or "
                     f"redirect the lock. {fix}, or run without measure_lock.")


@contextmanager
def measurement_lock(enabled: bool, path: str | os.PathLike | None = None,
                     timeout: float = TIMEOUT_SECONDS) -> Iterator[None]:
    """Hold an exclusive lock shared by this user's autoq processes on this machine, if enabled.

    path: the lock file (default: `lock_path()`). Waits at most `timeout` seconds for another
    worker to release it, then raises TimeoutError. A lock file that is a symlink is refused (ValueError).
    """
    if not enabled:
        yield
        return
    path = Path(lock_path() if path is None else path)
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise ValueError(f"The measurement lock file {path} is a symbolic link; remove it (`rm {path}`).") from error
    try:
        _acquire(handle, path, timeout)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)


def _acquire(handle: int, path: Path, timeout: float) -> None:
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            waited = time.monotonic() - started
            if waited >= timeout:
                raise TimeoutError(
                    f"Waited {waited:.1f} s for the measurement lock {path}: another autoq worker on this machine "
                    f"holds it while it times candidates. Wait for that worker to finish, or run without "
                    f"measure_lock (`measure_lock = false`, no `--measure-lock`) and accept that the timings of "
                    f"workers sharing the machine disturb each other.") from None
            time.sleep(min(POLL_SECONDS, timeout - waited))
