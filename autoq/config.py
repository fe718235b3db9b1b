"""The settings of a tuning run as one plain dataclass, validated once, up front.

The same type is filled from keyword arguments (`autoq.tune(..., max_loss=0.02)`), from a run
file's [tune] table, and from a strategy preset (strategies/NAME.toml) that either one names.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from importlib import resources
from typing import Any

from autoq.plan import (
    AUTO, EQUALIZATIONS, KERNEL_CHOICES, LOWERINGS, OBSERVERS, PRECISIONS, RECIPE_KINDS, WEIGHT_GRANULARITIES,
)

LOSS_TYPES = ("relative", "absolute")
STRATEGY_KEY = "strategy"


def _invalid(name: str, expected: str, value: object) -> ValueError:
    return ValueError(f"The '{name}' setting of autoq.tune must be {expected}. Got {value!r} instead.")


def strategies() -> list[str]:
    """Names of the strategy presets shipped with autoq (package data `autoq.strategies`)."""
    return sorted(path.name[:-5] for path in resources.files("autoq.strategies").iterdir()
                  if path.name.endswith(".toml"))


def load_strategy(name: str) -> dict[str, Any]:
    """The settings of strategy preset `name` (a [tune] table: TuneConfig fields, `space` nested)."""
    if not isinstance(name, str) or name not in strategies():
        raise ValueError(f"Unknown strategy {name!r}. Shipped strategies: {strategies()}.")
    with resources.files("autoq.strategies").joinpath(f"{name}.toml").open("rb") as file:
        return tomllib.load(file)


def check_keys(data: Mapping, allowed: list[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown key{'s' if len(unknown) > 1 else ''} {unknown} in {where}. "
                         f"Allowed keys: {sorted(allowed)}.")


BOOLEAN_CHOICES = tuple((name, (False, True)) for name in
                        ("activation_symmetric", "reduce_range", "channels_last", "fold_relu6", "mixed_bf16",
                         "cpp_wrapper", "bias_correction", "adaround"))


@dataclass
class SearchSpace:
    """What the search may vary. Every field is a tuple of allowed values or a bound."""

    recipes: tuple[str, ...] = (AUTO,)
    # what the returned model may compute in: int8 plans compete with the FP32 model rewritten and compiled
    # ('fp32') and, on CPUs with native bf16 (AVX512-BF16, AMX), under bf16 autocast ('bf16'); ['int8']:
    # the best int8 plan even where it is slower than FP32
    precisions: tuple[str, ...] = PRECISIONS
    # the kernel choice of eager-kernel plans: a whole-model engine ('x86' lets PyTorch pick per layer,
    # 'fbgemm', 'onednn') or 'measured' (each layer timed in place under both libraries)
    kernels: tuple[str, ...] = KERNEL_CHOICES
    observers: tuple[str, ...] = OBSERVERS
    weight_granularities: tuple[str, ...] = WEIGHT_GRANULARITIES
    activation_symmetric: tuple[bool, ...] = (False, True)
    reduce_range: tuple[bool, ...] = (True, False)  # where kernels saturate (no VNNI), False means 7-bit weights
    channels_last: tuple[bool, ...] = (False, True)
    fold_relu6: tuple[bool, ...] = (False, True)
    mixed_bf16: tuple[bool, ...] = (False, True)  # Inductor recipes; only where the CPU has bf16
    cpp_wrapper: tuple[bool, ...] = (False, True)  # Inductor recipes
    # what compiles a static PT2E plan's int8 graph: Inductor, or OpenVINO where it is installed (extra `openvino`)
    lowerings: tuple[str, ...] = LOWERINGS
    equalizations: tuple[str, ...] = EQUALIZATIONS  # FP32 rewrites before capture ('static')
    bias_correction: tuple[bool, ...] = (False, True)  # bias corrected for weight rounding ('static')
    adaround: tuple[bool, ...] = (False,)  # learned weight rounding ('static'; opt in: minutes per weight setting)
    qat_epochs: tuple[int, int] = (1, 3)  # QAT fine-tune length, epochs (inclusive bounds)
    qat_lr: tuple[float, float] = (1e-5, 1e-3)  # QAT learning rate bounds (searched on a log scale)
    max_fallback: int | None = None  # most layers that may stay FP32 (None: a quarter, at least 4)
    layer_observer_slots: int = 3  # most sensitive layers that get their own observer choice
    engines: InitVar[tuple[str, ...] | None] = None  # the name of `kernels` before autoq 0.3 (deprecated)

    def __post_init__(self, engines: tuple[str, ...] | None) -> None:
        if engines is not None:
            warnings.warn("SearchSpace's 'engines' is called 'kernels' since autoq 0.3 (it also holds 'measured'); "
                          "rename it.", DeprecationWarning, stacklevel=3)
            if tuple(self.kernels) != KERNEL_CHOICES:
                raise ValueError("SearchSpace got both 'kernels' and its old name 'engines': keep 'kernels'.")
            self.kernels = engines
        for name, allowed in (("recipes", (AUTO, *RECIPE_KINDS)), ("precisions", PRECISIONS),
                              ("kernels", KERNEL_CHOICES), ("observers", OBSERVERS),
                              ("weight_granularities", WEIGHT_GRANULARITIES), ("equalizations", EQUALIZATIONS),
                              ("lowerings", LOWERINGS),
                              *BOOLEAN_CHOICES):
            values = getattr(self, name)
            if isinstance(values, (str, bool)) or not isinstance(values, (list, tuple)):
                raise ValueError(f"The '{name}' parameter of SearchSpace must be a list of values from "
                                 f"{list(allowed)}. Got {values!r} instead.")
            values = tuple(values)
            setattr(self, name, values)
            bad = [v for v in values if v not in allowed or type(v) is not type(allowed[0])]
            if not values or bad:
                raise ValueError(
                    f"The '{name}' parameter of SearchSpace must be a non-empty subset of {list(allowed)}. "
                    f"Got {list(values)} instead."
                )
        if AUTO in self.recipes and len(self.recipes) > 1:
            raise ValueError(f"The 'recipes' parameter of SearchSpace is either ['auto'] or a list of recipes "
                             f"to search. Got {list(self.recipes)} instead.")
        excluded = [recipe for recipe in self.recipes if recipe != AUTO
                    and RECIPE_KINDS[recipe].precision not in self.precisions]
        if excluded:
            raise ValueError(f"SearchSpace asks for recipes {excluded}, whose precision is not in its 'precisions' "
                             f"{list(self.precisions)}: add their precision or drop them.")
        self.qat_epochs, self.qat_lr = tuple(self.qat_epochs), tuple(self.qat_lr)
        if not (len(self.qat_epochs) == 2 and all(isinstance(e, int) for e in self.qat_epochs)
                and 1 <= self.qat_epochs[0] <= self.qat_epochs[1]):
            raise ValueError(f"The 'qat_epochs' parameter of SearchSpace must be [low, high] with 1 <= low <= high. "
                             f"Got {list(self.qat_epochs)} instead.")
        if not (len(self.qat_lr) == 2 and 0 < self.qat_lr[0] <= self.qat_lr[1] < 1):
            raise ValueError(f"The 'qat_lr' parameter of SearchSpace must be [low, high] with 0 < low <= high < 1. "
                             f"Got {list(self.qat_lr)} instead.")
        if self.max_fallback is not None and (not isinstance(self.max_fallback, int) or self.max_fallback < 0):
            raise ValueError(f"The 'max_fallback' parameter of SearchSpace must be >= 0. Got {self.max_fallback}.")
        if not isinstance(self.layer_observer_slots, int) or self.layer_observer_slots < 0:
            raise ValueError(f"'layer_observer_slots' must be >= 0. Got {self.layer_observer_slots}.")

    def fallback_limit(self, n_layers: int) -> int:
        limit = self.max_fallback if self.max_fallback is not None else max(4, n_layers // 4)
        return min(limit, max(n_layers - 1, 0))

@dataclass
class TuneConfig:
    """Everything about a run except the model, data and metric (which are Python objects).

    higher_is_better: the metric's direction (None: not given, assumed higher-is-better, and autoq warns
      when the evidence says otherwise).
    max_loss: accuracy budget; a fraction of the baseline metric (loss_type='relative') or metric
      units (loss_type='absolute').
    confidence: with per-sample scores, a plan is within budget only if the one-sided upper confidence
      bound of its loss at this level is <= max_loss (None: the point estimate decides).
    confirm_fraction: with per-sample scores, the fraction of evaluation samples held back from the
      search (seeded split) on which the finalists are confirmed (0: no confirmation part).
    n_trials: total trials in the study (a resumed study counts its finished trials);
      timeout: seconds this call may take in all (setup, trials, final choice): it returns within
      timeout + max(5%, 30 s), once at least one plan was measured. Neither given: 40 trials.
    storage: Optuna storage URL; None: sqlite file autoq-runs/autoq.db under the working directory.
    calib_max_samples: calibration samples used at most; eval is never run on them.
    sensitivity_samples: calibration samples used to rank layer sensitivity.
    threads: intra-op threads for latency measurement (None: torch's current setting).
    latency_seconds: timing effort per trial in seconds (the final comparison uses 4x as much).
    compile_fp32: also build the best FP32 baseline with torch.compile (freezing).
    prune_slower: skip the accuracy evaluation of candidates measurably slower than the best
      feasible one found so far (they cannot win).
    verbose: progress bars (on a terminal) and a one-line summary per trial on stderr.
    measure_lock: workers on one machine take turns to time candidates (a file lock), so
      co-located workers do not disturb each other's latency measurements.
    qat_seconds: longest QAT fine-tune of one candidate, seconds (it stops there, whatever its epochs).
    resume: only continue an existing study (its name comes from the model, data and settings);
      an error if there is none. Without it, an existing study is continued and a new one started.
    """

    higher_is_better: bool | None = None
    max_loss: float = 0.01
    loss_type: str = "relative"
    confidence: float | None = 0.9
    confirm_fraction: float = 0.5
    n_trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None
    seed: int = 0
    calib_max_samples: int = 512
    sensitivity_samples: int = 32
    threads: int | None = None
    latency_seconds: float = 1.0
    compile_fp32: bool = True
    prune_slower: bool = True
    non_traceable_modules: list[str] = field(default_factory=list)
    space: SearchSpace = field(default_factory=SearchSpace)
    verbose: bool = True
    measure_lock: bool = False
    qat_seconds: float = 300.0
    resume: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the tune settings") -> TuneConfig:
        """A config from plain data (keyword settings, a run file's [tune] table).

        data['strategy'] names a preset whose settings apply first; the other keys override them
        (`space` key by key). Unknown keys raise a ValueError that lists the allowed ones.
        """
        data = dict(data)
        strategy = data.pop(STRATEGY_KEY, None)
        names = [f.name for f in dataclasses.fields(cls)]
        check_keys(data, [*names, STRATEGY_KEY], where)
        settings = load_strategy(strategy) if strategy is not None else {}
        check_keys(settings, names, f"strategy {strategy!r}")
        space = data.get("space", {})
        if isinstance(space, Mapping):
            if "engines" in space and "kernels" not in space:  # its old name overrides the preset's kernels
                space = {("kernels" if key == "engines" else key): value for key, value in space.items()}
                warnings.warn(f"'engines' in {where}'s space is called 'kernels' since autoq 0.3: rename it.",
                              DeprecationWarning, stacklevel=2)
            data["space"] = {**settings.get("space", {}), **space}
        settings.update(data)
        return cls(**settings)

    def __post_init__(self) -> None:
        if isinstance(self.space, Mapping):
            check_keys(self.space, [f.name for f in dataclasses.fields(SearchSpace)] + ["engines"], "the search space")
            self.space = SearchSpace(**self.space)
        if not isinstance(self.max_loss, (int, float)) or not math.isfinite(self.max_loss) or self.max_loss <= 0:
            raise _invalid("max_loss", "a positive finite number (e.g. 0.01 for 1% relative loss)", self.max_loss)
        if self.loss_type not in LOSS_TYPES:
            raise _invalid("loss_type", f"one of {list(LOSS_TYPES)}", self.loss_type)
        if self.n_trials is not None and (not isinstance(self.n_trials, int) or self.n_trials < 1):
            raise _invalid("n_trials", "a positive int or None", self.n_trials)
        if self.timeout is not None and (not isinstance(self.timeout, (int, float)) or self.timeout <= 0):
            raise _invalid("timeout", "a positive number of seconds or None", self.timeout)
        if not isinstance(self.qat_seconds, (int, float)) or not self.qat_seconds > 0:
            raise _invalid("qat_seconds", "a positive number of seconds", self.qat_seconds)
        if self.n_trials is None and self.timeout is None:
            self.n_trials = 40
        if not isinstance(self.seed, int):
            raise _invalid("seed", "an int", self.seed)
        for name in ("calib_max_samples", "sensitivity_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise _invalid(name, "a positive int", value)
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise _invalid("threads", "a positive int or None", self.threads)
        if not isinstance(self.latency_seconds, (int, float)) or self.latency_seconds <= 0:
            raise _invalid("latency_seconds", "a positive number of seconds", self.latency_seconds)
        if not isinstance(self.space, SearchSpace):
            raise _invalid("space", "an autoq.SearchSpace (or a dict of its fields)", self.space)
        if self.higher_is_better is not None and not isinstance(self.higher_is_better, bool):
            raise _invalid("higher_is_better", "true, false or None (not given: assumed true)", self.higher_is_better)
        if self.confidence is not None and not (isinstance(self.confidence, float) and 0.5 < self.confidence < 1):
            raise _invalid("confidence", "a float in (0.5, 1), e.g. 0.9, or None (point estimates)", self.confidence)
        if not (isinstance(self.confirm_fraction, (int, float)) and 0 <= self.confirm_fraction < 1):
            raise _invalid("confirm_fraction", "a fraction in [0, 1), e.g. 0.5 (0: no confirmation)",
                           self.confirm_fraction)
        for name in ("compile_fp32", "prune_slower", "verbose", "measure_lock", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, "true or false", getattr(self, name))
        for name in ("storage", "study_name"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise _invalid(name, "a string or None", getattr(self, name))
        if not isinstance(self.non_traceable_modules, (list, tuple)):
            raise _invalid("non_traceable_modules", "a list of module class names", self.non_traceable_modules)
        self.non_traceable_modules = list(self.non_traceable_modules)

    def loss(self, baseline: float, metric: float) -> float:
        """Accuracy loss of `metric` against `baseline` (positive = worse), in this config's units."""
        drop = baseline - metric if self.higher_is_better is not False else metric - baseline
        return drop / abs(baseline) if self.loss_type == "relative" else drop

    def metric_at(self, baseline: float, loss: float) -> float:
        """The metric whose `loss` against `baseline` is `loss` (the inverse of `loss`)."""
        drop = loss * abs(baseline) if self.loss_type == "relative" else loss
        return baseline - drop if self.higher_is_better is not False else baseline + drop
