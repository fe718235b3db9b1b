"""A machine-wide lock that makes co-located workers take turns when they time candidates."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

LOCK_PATH = os.path.join(tempfile.gettempdir(), "autoq-measure.lock")


@contextmanager
def measurement_lock(enabled: bool, path: str = LOCK_PATH) -> Iterator[None]:
    """Hold an exclusive lock on `path` (shared by every autoq process on this machine) if enabled."""
    if not enabled:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
