"""What a run shows while it works: progress bars with ETA and one line per event, on stderr.

Bars appear only on a terminal (rich); elsewhere (CI logs, pipes) only the lines are written.
Quiet mode (`verbose=False`, `autoq tune --quiet`) writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Advance = Callable[[int], None]


class Reporter:
    """Progress bars and messages of one run; every method is a no-op when quiet."""

    _shared: dict[bool, Reporter] = {}

    @classmethod
    def shared(cls, verbose: bool) -> Reporter:
        """The process's reporter: bars opened anywhere in a run (e.g. a run file's evaluation) nest."""
        if verbose not in cls._shared:
            cls._shared[verbose] = cls(verbose)
        return cls._shared[verbose]

    def __init__(self, verbose: bool = True, console: Console | None = None) -> None:
        self.verbose = verbose
        self.console = console or Console(stderr=True, highlight=False)
        self._bars = Progress(
            TextColumn("[autoq] {task.description:<12}", markup=False), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=True, disable=not (verbose and self.console.is_terminal),
        )
        self._open = 0  # bars shown now (nested bars share one live display)

    def line(self, message: str) -> None:
        """One line of text (above any live bars)."""
        if self.verbose:
            self.console.print(f"[autoq] {message}", markup=False, soft_wrap=True)

    @contextmanager
    def bar(self, description: str, total: int | None) -> Iterator[Advance]:
        """A bar for `total` steps (None: unknown, e.g. a timeout-bound search); yields advance(n)."""
        if self._bars.disable:
            yield lambda steps=1: None
            return
        if self._open == 0:
            self._bars.start()
        self._open += 1
        task = self._bars.add_task(description, total=total)
        try:
            yield lambda steps=1: self._bars.advance(task, steps)
        finally:
            self._bars.remove_task(task)
            self._open -= 1
            if self._open == 0:
                self._bars.stop()
