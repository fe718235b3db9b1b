"""What a tuning run returns, and saving/loading the tuned int8 model."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from autoq.dispatch.table import DispatchTable
from autoq.measure.latency import speed_verdict
from autoq.deploy import Export, export
from autoq.model_file import load_model, save_model
from autoq.model_file.legacy import rebuild_module
from autoq.plan import QuantPlan, recipe_kind


@dataclass
class TuneResult:
    """The tuned model and the evidence for it: the fastest in-budget deployment the search found, an int8
    plan or, where int8 did not pay, the FP32 (or bf16) model rewritten and compiled (`precision`).

    accuracy / baseline_accuracy: the user's metric for the int8 / FP32 model, on the confirmation
      samples the search never saw (per-sample scores), else on all evaluation samples.
    loss: accuracy loss there, as a fraction of the baseline (relative) or in metric units (absolute).
    verdict: the evidence for `feasible`: part ('confirm', 'search' or 'all'), samples, loss, upper (the
      one-sided upper confidence bound, None without per-sample scores), confidence, method,
      search_loss (the plan's loss on the search part), tried (finalists confirmed, fastest first) and
      guarantee (what is promised, in words).
    speedup: FP32-eager latency / int8 latency (median of per-round ratios), measured side by side at
      the end of the run; speedup_interval: its interval; vs_best_fp32: (ratio, low, high) against
      the best FP32. "Faster" only when an interval excludes 1.
    latency_ms: median milliseconds per call of example_inputs: fp32_eager, fp32_best, int8 (the returned
      model: int8 unless a float candidate was faster, see `precision`).
    timing: where the call's time went: setup_s, trials_s, final_s, total_s, first_feasible_s (to the
      first in-budget plan, None if none), timeout_s, trials_not_started (they would not have fit).
    plan: the JSON-serializable QuantPlan of `model` (autoq.quantize rebuilds it).
    trials: one dict per trial (number, state, params, metric, loss, speedup, feasible, error, seconds,
      finished: Unix time the trial ended).
    pareto_front: trials not dominated in (loss, speedup), lowest loss first.
    feasible: whether `model` meets the accuracy budget.
    layers: per layer: name, sqnr_db (sensitivity), quantized, observer, engine (kernel library).
    dispatch_table: the per-layer kernel timings this run measured (plus autoq's shipped table for
      this CPU, if any) and the rule learned from them; `.save(path)` exports it.
    """

    model: torch.nn.Module
    accuracy: float
    baseline_accuracy: float
    loss: float
    speedup: float
    latency_ms: dict[str, float]
    plan: dict[str, Any]
    trials: list[dict[str, Any]]
    pareto_front: list[dict[str, Any]]
    feasible: bool
    layers: list[dict[str, Any]] = field(default_factory=list)
    study_name: str = ""
    storage: str = ""  # the Optuna storage URL, password hidden
    notes: list[str] = field(default_factory=list)
    dispatch_table: DispatchTable | None = None
    verdict: dict[str, Any] = field(default_factory=dict)
    speedup_interval: tuple[float, float] = (math.nan, math.nan)
    vs_best_fp32: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    timing: dict[str, Any] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        """What the returned model computes in: 'int8', or 'fp32'/'bf16' where no int8 plan was faster."""
        return recipe_kind(QuantPlan.from_dict(self.plan).recipe).precision

    @property
    def config(self) -> dict[str, Any]:
        """Deprecated since 0.2: the plan is `plan` ("config" means a TuneConfig)."""
        warnings.warn("TuneResult.config is deprecated since autoq 0.2: use TuneResult.plan.", DeprecationWarning,
                      stacklevel=2)
        return self.plan

    def save(self, path: str | os.PathLike, model_source: str | None = None) -> None:
        """Write the int8 model to one file (data only, see `autoq.save`); `autoq.load(path, fp32_model)`
        rebuilds it. model_source: where the FP32 model comes from (e.g. a run file), for load's errors."""
        save_model(self.model, path, summary={
            "accuracy": self.accuracy, "baseline_accuracy": self.baseline_accuracy, "loss": self.loss,
            "speedup": self.speedup, "latency_ms": self.latency_ms,
        }, model_source=model_source)

    def export(self, directory: str | os.PathLike) -> Export:
        """Write the int8 model as a folder plain PyTorch runs without autoq (see `autoq.export`):
        TorchScript for FX plans, an AOTInductor package for PT2E plans, with run.py."""
        return export(self.model, directory)

    def stored(self) -> dict[str, Any]:
        """What the study keeps of the final choice (the report reads it)."""
        return {"plan": self.plan, "accuracy": self.accuracy, "baseline_accuracy": self.baseline_accuracy,
                "loss": self.loss, "speedup": self.speedup,
                "latency_ms": self.latency_ms, "feasible": self.feasible, "layers": self.layers, "notes": self.notes,
                "verdict": self.verdict, "speedup_interval": list(self.speedup_interval),
                "vs_best_fp32": list(self.vs_best_fp32), "timing": self.timing}

    def summary(self) -> str:
        """A short human-readable table of the outcome."""
        lat, verdict = self.latency_ms, self.verdict
        status = "meets the budget" if self.feasible else "DOES NOT meet the budget (best effort)"
        where = {"confirm": f"{verdict.get('samples')} held-back samples the search never saw",
                 "search": f"the search's {verdict.get('samples')} samples"}.get(verdict.get("part"), "all evaluation data")
        bound = (f" ({verdict['confidence']:.0%} upper bound {verdict['upper']:+.4f})"
                 if verdict.get("upper") is not None else "")
        low, high = self.speedup_interval
        best, best_low, best_high = self.vs_best_fp32
        plan = QuantPlan.from_dict(self.plan)
        returned = self.precision if self.precision == "int8" else f"{self.precision} ({plan.kernels()})"
        lines = [
            f"autoq result: {status}, returning the {returned} model",
            f"  metric    FP32 {self.baseline_accuracy:.4f}   {self.precision} {self.accuracy:.4f}   on {where}",
            f"  loss      {self.loss:+.4f}{bound}" + (f"   (search part {verdict['search_loss']:+.4f})"
                                                      if verdict.get("search_loss") is not None else ""),
            f"  latency   FP32 eager {lat['fp32_eager']:.3f} ms   FP32 best {lat['fp32_best']:.3f} ms   "
            f"{self.precision} {lat['int8']:.3f} ms",
            f"  speedup   {self.speedup:.2f}x [{low:.2f}-{high:.2f}] vs FP32 eager   {best:.2f}x [{best_low:.2f}-"
            f"{best_high:.2f}] vs best FP32 ({speed_verdict(best_low, best_high)})",
            f"  trials    {len(self.trials)} in study '{self.study_name}'",
        ]
        if verdict.get("guarantee"):
            lines.append(f"  promise   {verdict['guarantee']}")
        if self.timing:
            lines.append(f"  time      {describe_timing(self.timing)}")
        lines.append(
            f"  plan      recipe={plan.recipe} kernels={plan.kernels()}{' (oneDNN/FBGEMM layers)' if plan.layer_engines else ''} "
            + "".join(f"{name}={getattr(plan, name)} " for name in recipe_kind(plan.recipe).fields)
            + f"fp32_layers={len(plan.fp32_layers)}"
        )
        lines += [f"  note      {note}" for note in self.notes]
        return "\n".join(lines)


def describe_timing(timing: dict[str, Any]) -> str:
    """Where a call's time went, in one line (from `TuneResult.timing`)."""
    first = timing.get("first_feasible_s")
    found = f"first in-budget plan after {first:.0f} s" if first is not None else "no in-budget plan in the search"
    limit = f" of timeout {timing['timeout_s']:.0f} s" if timing.get("timeout_s") is not None else ""
    skipped = (f"; {timing['trials_not_started']} trial(s) not started for lack of time"
               if timing.get("trials_not_started") else "")
    steps = ", ".join(f"{name} {seconds:.0f}" for name, seconds in (timing.get("setup_steps") or {}).items())
    return (f"setup {timing['setup_s']:.0f} s{f' ({steps})' if steps else ''}, trials {timing['trials_s']:.0f} s, "
            f"final {timing['final_s']:.0f} s "
            f"(total {timing['total_s']:.0f} s{limit}); {found}{skipped}")


_rebuild_module = rebuild_module  # the name autoq's old pickled files (loaded only when trusted) refer to


def save(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Save an int8 model built by `autoq.quantize`, `autoq.tune` or `autoq.load` to one file.

    The file is data only (safetensors): the plan with its per-layer kernels, the int8 numbers and
    the outputs the model gave on synthetic inputs; `autoq.load(path, fp32_model)` rebuilds it."""
    save_model(model, path)


def load(path: str | os.PathLike, model: torch.nn.Module | None = None, *, trusted: bool = False,
         check: bool = True) -> torch.nn.Module:
    """The int8 model saved at `path`, rebuilt on `model`, the FP32 model it was tuned from (unchanged).

    Opening a file never runs code from it: the structure comes from `model` and the saved plan
    (no calibration data or training needed), the numbers from the file, and the rebuilt model must
    reproduce the outputs recorded at save time (check=False skips that). Files of autoq's old
    pickled format (before 0.2) load without `model` only with trusted=True, which runs code stored
    in them. The plan is in `model.meta['autoq']`.
    """
    return load_model(path, model, trusted=trusted, check=check)
