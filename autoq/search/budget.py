"""The time of one `tune` call: where it goes (setup, trials, final), and whether the next step fits `timeout`.

`timeout` bounds the whole call: setup work is sized to a share of it, a trial is started only when
its expected cost (the slowest trial of its recipe so far, else an estimate from the setup's own
measurements) fits before the final phase's reserve, and the final phase sizes itself to what is
left. The call returns within `timeout + slack` (the larger of 5% and 30 s).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from autoq.plan import RecipeKind

PHASES = ("setup", "trials", "final")
SLACK_FRACTION, SLACK_SECONDS = 0.05, 30.0
CALIBRATION_SHARE = 0.15  # of the timeout, at most, for calibrating every recipe (two passes each)
CALIBRATION_OVERHEAD = 4.0  # a calibration pass over one sample costs this many FP32 forwards of it
MIN_CALIBRATION = 32  # samples a timeout never cuts calibration below (the first statistics snapshot)
RANKING_SHARE = 0.1  # of the timeout, at most, for ranking the layers of every recipe
RANKING_OVERHEAD = 1.5  # ranking one layer on one sample costs this many FP32 forwards of a sample


FINAL_OVERHEAD = 5.0  # seconds of the final phase besides builds, confirmations and timing
UNSEEN_COMPILE = 60.0  # seconds assumed for an Inductor compile when the FP32 model was not compiled


@dataclass
class Costs:
    """Seconds measured during setup, from which a trial no one has run yet and the final phase are
    estimated (the trials themselves then replace these guesses)."""

    evaluation: float  # scoring one model on the search part
    confirmation: float  # scoring one model on the confirmation part
    compile: float  # one torch.compile of the FP32 model (0: not compiled)
    latency: float  # TuneConfig.latency_seconds: timing effort per trial
    calibration: float = 0.0  # capturing and calibrating one recipe (an equalized model is calibrated anew)

    def unseen_build(self, kind: RecipeKind, n_layers: int) -> float:
        """A first build of a recipe: an Inductor compile or an FX conversion (a fine-tune not included)."""
        return 2 * (self.compile or UNSEEN_COMPILE) if kind.inductor else max(2.0, 0.1 * n_layers)

    def after_build(self) -> float:
        """A trial's work after its build: timing and evaluation."""
        return 3 * self.latency + 1.2 * self.evaluation

    def final(self, builds: list[float]) -> float:
        """The final phase for finalists built in `builds` seconds each: rebuilt, timed side by side,
        confirmed one by one (at worst all), then timed against FP32."""
        return sum(builds) + len(builds) * self.confirmation + 6 * self.latency + FINAL_OVERHEAD


def slack(timeout: float) -> float:
    """How far past `timeout` a call may return: the larger of 5% and 30 s."""
    return max(SLACK_FRACTION * timeout, SLACK_SECONDS)


class TimeBudget:
    """The clock of one call; `timeout` None means unbounded (every step fits)."""

    def __init__(self, timeout: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout, self.clock = timeout, clock
        self.started = clock()
        self.spent = dict.fromkeys(PHASES, 0.0)
        self.first_feasible: float | None = None  # seconds from the start to the first in-budget plan
        self.trial_seconds: dict[str, list[float]] = {}  # trial kind -> durations of its trials in this call
        self.build_seconds: dict[str, list[float]] = {}  # recipe -> durations of its builds in this call
        self.skipped_trials = 0  # trials not started: they would not have fit
        self.costs: Costs | None = None  # set once setup has measured them
        self._current: tuple[str, float] | None = None  # the phase running now and its start
        self.steps: dict[str, float] = {}  # setup step -> seconds

    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float:
        return math.inf if self.timeout is None else self.timeout - self.elapsed()

    def share(self, fraction: float) -> float:
        """`fraction` of the timeout in seconds (inf when unbounded)."""
        return math.inf if self.timeout is None else fraction * self.timeout

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._current = (name, self.clock())
        try:
            yield
        finally:
            self.spent[name] += self.clock() - self._current[1]
            self._current = None

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one named step of the setup (baseline, calibration, ...), for `as_dict`'s setup_steps."""
        start = self.clock()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + self.clock() - start

    def feasible_found(self) -> None:
        if self.first_feasible is None:
            self.first_feasible = self.elapsed()

    def trial_done(self, kind: str, seconds: float) -> None:
        self.trial_seconds.setdefault(kind, []).append(seconds)

    def build_done(self, recipe: str, seconds: float) -> None:
        self.build_seconds.setdefault(recipe, []).append(seconds)

    def trial_estimate(self, kind: str, unseen: float) -> float:
        """Expected seconds of the next trial of `kind`: its slowest so far, else `unseen`."""
        return max(self.trial_seconds.get(kind) or [unseen])

    def fits(self, seconds: float, reserve: float = 0.0) -> bool:
        """Whether `seconds` of work fit before `reserve` seconds are left."""
        return self.remaining() - reserve >= seconds

    def progress(self) -> str:
        """'312/900 s' (elapsed of the timeout), for per-trial lines; '' when unbounded."""
        return "" if self.timeout is None else f"{self.elapsed():.0f}/{self.timeout:.0f} s"

    def as_dict(self) -> dict:
        """Plain data for TuneResult.timing: seconds per phase, total, first in-budget plan, timeout."""
        spent = dict(self.spent)
        if self._current is not None:  # the final phase reports while it runs
            spent[self._current[0]] += self.clock() - self._current[1]
        return {**{f"{phase}_s": round(spent[phase], 1) for phase in PHASES},
                "total_s": round(self.elapsed(), 1), "first_feasible_s": self.first_feasible and round(self.first_feasible, 1),
                "timeout_s": self.timeout, "trials_not_started": self.skipped_trials,
                "setup_steps": {name: round(seconds, 1) for name, seconds in self.steps.items()}}

