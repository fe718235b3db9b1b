"""Ctrl-C during a study: it stops a trial's work at once, but never cuts a storage write in half.

A KeyboardInterrupt raised inside SQLAlchemy can leave a transaction open (SQLite then stays locked:
the stopped trial cannot even be marked failed), and one raised inside a finalizer is swallowed by
Python (the run goes on as if nothing was pressed). So while a study runs, Ctrl-C raises at once only
inside `work()` blocks (building, timing, evaluating a candidate); anywhere else it is remembered and
raised when the next `work()` block starts or ends, or when the study ends. A second Ctrl-C always
raises at once (a storage that hangs must not trap the user).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _CtrlC:
    def __init__(self) -> None:
        self.pressed = False
        self._raise_now = True

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Within: Ctrl-C outside `work()` blocks is remembered and raised later as KeyboardInterrupt."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        self.pressed, self._raise_now = False, False
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            self._raise_now = True
        self.check()

    @contextmanager
    def work(self) -> Iterator[None]:
        """Within: Ctrl-C raises KeyboardInterrupt at once. Keep storage writes out of these blocks."""
        self.check()
        saved, self._raise_now = self._raise_now, True
        try:
            yield
        finally:
            self._raise_now = saved
        self.check()  # raised inside but swallowed (e.g. by a finalizer): stop now

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed during this study (it stays pressed)."""
        if self.pressed:
            raise KeyboardInterrupt

    def _handle(self, signum: int, frame: object) -> None:
        pressed_before, self.pressed = self.pressed, True
        if self._raise_now or pressed_before:
            raise KeyboardInterrupt


CTRL_C = _CtrlC()
