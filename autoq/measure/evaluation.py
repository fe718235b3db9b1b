"""How autoq scores a model, per sample where it can, so FP32 and int8 compare sample by sample.

Three sources of a metric:
- `eval_fn(model) -> float`: one number. No confidence bound can be computed; the result says so.
- `eval_fn(model) -> 1-D array/tensor` of per-sample scores (the metric is their mean): autoq splits
  the samples into a search part and a confirmation part. The function still runs on every sample;
  the search only ever sees its own part's scores.
- `eval_data` (batches of (inputs, target)) + `metric`: autoq runs the model itself, and only on the
  samples of the part it asks for, so confirmation samples are never run during the search.

`Scorer` judges a model against FP32 on a part: the metric, the loss and (per sample) its one-sided
upper confidence bound (autoq.measure.confidence). A search trial is screened (successive halving):
where scoring some samples costs only their share, the plan is first judged on random shares of the
search part (SCREEN_SHARES) and stopped there once its loss is over budget even at the lower end of a
SCREEN_CONFIDENCE interval (its loss is then the one on the samples seen); a plan that passes is
scored on the rest, so screening costs it nothing.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from autoq.config import TuneConfig
from autoq.measure.confidence import LossEstimate, paired_loss, samples_needed

SEARCH, CONFIRM = "search", "confirm"
SCREEN_SHARES = (0.125, 0.375)  # shares of the search part a plan is judged on before all of it
SCREEN_CONFIDENCE = 0.99  # a plan stops at a screen when its loss's lower bound at this level is over budget
MIN_SCREEN = 100  # samples a screen needs at least (a smaller share is skipped)


def per_sample_top1(outputs: Tensor, targets: Tensor) -> Tensor:
    """1 where a row's largest output is its target class, else 0."""
    return (outputs.argmax(dim=1) == targets).float()


def per_sample_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Each sample's mean squared error (lower is better)."""
    return (outputs.float() - targets.float().view_as(outputs)).pow(2).flatten(1).mean(1)


# name -> (per-sample score, higher is better); their mean is the metric of the same name
PER_SAMPLE_METRICS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], bool]] = {
    "top1": (per_sample_top1, True),
    "mse": (per_sample_mse, False),
}


def as_scores(value: object, where: str) -> np.ndarray | float:
    """A finite float, or a 1-D float array of per-sample scores, from what an evaluation returned."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().double().numpy() if value.dim() else float(value)
    elif isinstance(value, (list, tuple)):
        value = np.asarray(value, dtype=float)
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            value = float(value)
        elif value.ndim != 1 or value.size == 0:
            raise ValueError(f"{where} returned an array of shape {value.shape}: return one number, or one "
                             f"score per sample (a non-empty 1-D array whose mean is the metric).")
        elif not np.isfinite(value).all():
            bad = int(np.flatnonzero(~np.isfinite(value))[0])
            raise ValueError(f"{where} returned a non-finite score for sample {bad} ({value[bad]}): "
                             f"per-sample scores must be finite.")
        else:
            return value.astype(float)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where} must return a number or a 1-D array of per-sample scores; got "
                        f"{type(value).__name__}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} returned {number}; it must return a finite number.")
    return number


class Evaluation(abc.ABC):
    """Scores of a model on (a subset of) the evaluation samples."""

    n: int | None = None  # samples, when scores are per sample (known after the first call of an eval_fn)
    subsets: bool = False  # whether scoring some samples costs only their share of scoring all

    @abc.abstractmethod
    def run(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray | float:
        """Per-sample scores of `model` on the samples `indices` (None: all), or one number."""


class FunctionEvaluation(Evaluation):
    """The user's eval_fn(model): one number, or per-sample scores (sliced to `indices` here)."""

    def __init__(self, eval_fn: Callable[[nn.Module], object]) -> None:
        if not callable(eval_fn):
            raise TypeError(f"`eval_fn` must be callable as eval_fn(model) -> float or per-sample scores. "
                            f"Got {type(eval_fn).__name__}.")
        self.eval_fn = eval_fn

    def run(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray | float:
        with torch.no_grad():
            scores = as_scores(self.eval_fn(model), "eval_fn")
        if isinstance(scores, float):
            return scores
        if self.n is not None and scores.size != self.n:
            raise ValueError(f"eval_fn returned {scores.size} per-sample scores, but {self.n} before: it must "
                             f"score the same samples, in the same order, every time.")
        self.n = scores.size
        return scores if indices is None else scores[indices]


class DataEvaluation(Evaluation):
    """`metric` over eval_data, computed by autoq, on only the samples asked for.

    metric: a name in PER_SAMPLE_METRICS, or metric(outputs, targets) -> per-sample scores (a 1-D
    tensor, one per row) or one number for the whole set (then no bound can be computed).
    """

    subsets = True

    def __init__(self, eval_data: Iterable, metric: str | Callable[[Tensor, Tensor], object]) -> None:
        if isinstance(metric, str):
            if metric not in PER_SAMPLE_METRICS:
                raise ValueError(f"metric {metric!r} is not one autoq computes per sample "
                                 f"({sorted(PER_SAMPLE_METRICS)}); pass a callable metric(outputs, targets).")
            metric = PER_SAMPLE_METRICS[metric][0]
        if not callable(metric):
            raise TypeError(f"metric must be a name or callable as metric(outputs, targets); got {type(metric)}.")
        self.metric = metric
        inputs, targets, self.batch_size = [], [], 0
        for batch in eval_data:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError("eval_data must yield (inputs, target) pairs; inputs a tensor or a tuple of tensors.")
            batch_inputs = batch[0] if isinstance(batch[0], (tuple, list)) else (batch[0],)
            inputs.append(tuple(batch_inputs))
            targets.append(batch[1])
            self.batch_size = max(self.batch_size, int(batch[1].shape[0]))
        if not targets:
            raise ValueError("eval_data yielded no batch.")
        self.inputs = tuple(torch.cat(parts) for parts in zip(*inputs))
        self.targets = torch.cat(targets)
        self.n = int(self.targets.shape[0])

    def run(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray | float:
        rows = torch.arange(self.n) if indices is None else torch.as_tensor(indices)
        outputs, results = [], []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                output = model(*(tensor[chunk] for tensor in self.inputs))
                outputs.append(output[0] if isinstance(output, (tuple, list)) else output)
                results.append(self.metric(outputs[-1], self.targets[chunk]))
        if all(isinstance(r, Tensor) and r.dim() == 1 and len(r) == len(o) for r, o in zip(results, outputs)):
            return np.concatenate([as_scores(result, "metric") for result in results])  # in the order of rows
        return as_scores(self.metric(torch.cat(outputs), self.targets[rows]), "metric")


@dataclass(frozen=True)
class Judgement:
    """A model's metric and loss against FP32 on one part; `estimate` (with its upper bound) when scores are
    per sample and a confidence is set."""

    metric: float
    loss: float
    estimate: LossEstimate | None
    screened: int | None = None  # samples judged when a screen stopped the plan early (None: all of the part)

    @property
    def bound(self) -> float:
        """The loss as judged: its upper confidence bound, or the point loss when there is none."""
        return self.loss if self.estimate is None else self.estimate.upper


class Scorer:
    """Scores models on the search and confirmation parts and judges them against FP32's scores there."""

    def __init__(self, evaluation: Evaluation, config: TuneConfig) -> None:
        self.evaluation, self.config = evaluation, config
        self.parts: dict[str, np.ndarray | None] = {SEARCH: None}
        self.fp32: dict[str, np.ndarray | float] = {}

    def baseline(self, fp32_model: nn.Module) -> float:
        """Score FP32 on every sample once, split the samples (per-sample scores only) and return the
        FP32 metric on the search part."""
        scores = self.evaluation.run(fp32_model)
        if isinstance(scores, float):
            self.fp32[SEARCH] = scores
            return scores
        self.parts = split(len(scores), self.config.confirm_fraction, self.config.seed)
        self.fp32 = {part: scores[indices] for part, indices in self.parts.items()}
        return float(self.fp32[SEARCH].mean())

    def metric(self, part: str) -> float:
        """FP32's metric on `part` (on every sample without per-sample scores)."""
        fp32 = self.fp32[part if self.per_sample else SEARCH]
        return fp32 if isinstance(fp32, float) else float(fp32.mean())

    @property
    def per_sample(self) -> bool:
        return not isinstance(self.fp32.get(SEARCH), float)

    def size(self, part: str) -> int:
        return 0 if not self.per_sample or part not in self.parts else len(self.parts[part])

    def cost_share(self, part: str) -> float:
        """What judging a model on `part` costs, as a fraction of scoring every sample."""
        total = sum(self.size(p) for p in self.parts)
        return self.size(part) / total if self.evaluation.subsets and total else 1.0

    def judge(self, model: nn.Module, part: str = SEARCH) -> Judgement:
        return self._judgement(self.fp32[part], self.evaluation.run(model, self.parts[part]))

    @property
    def screens(self) -> bool:
        """Whether `screen` can stop a plan early: per-sample scores that cost only the samples scored."""
        return self.evaluation.subsets and self.per_sample

    def screen(self, model: nn.Module) -> Judgement:
        """Judge `model` on the search part by successive halving (see the module's docstring): the
        judgement on all of it, or, with `screened` set, on the random share where it was stopped."""
        indices, fp32 = self.parts[SEARCH], self.fp32[SEARCH]
        if not self.screens:
            return self.judge(model)
        order = np.random.default_rng(self.config.seed).permutation(len(indices))
        scores, done = np.zeros(len(indices)), 0
        for share in SCREEN_SHARES:
            stop = int(len(indices) * share)
            if stop < MIN_SCREEN:
                continue
            chunk = np.sort(order[done:stop])
            scores[chunk], done = self.evaluation.run(model, indices[chunk]), stop
            seen = np.sort(order[:done])
            if self._lower_bound(fp32[seen], scores[seen]) > self.config.max_loss:
                # the loss on the samples seen; the metric on the whole part is the one with that loss against
                # FP32's there, so a resumed study re-judging the metric gets the same loss
                seen_loss = self.config.loss(float(fp32[seen].mean()), float(scores[seen].mean()))
                estimate = self._judgement(fp32[seen], scores[seen]).estimate
                return Judgement(self.config.metric_at(float(fp32.mean()), seen_loss), seen_loss, estimate,
                                 screened=done)
        rest = np.sort(order[done:])
        scores[rest] = self.evaluation.run(model, indices[rest])
        return self._judgement(fp32, scores)

    def _lower_bound(self, fp32: np.ndarray, scores: np.ndarray) -> float:
        """One-sided lower bound on the loss at SCREEN_CONFIDENCE: minus the upper bound of the loss with
        the metric's direction reversed."""
        reversed_loss = paired_loss(fp32, scores, loss_type=self.config.loss_type,
                                    higher_is_better=self.config.higher_is_better is False,
                                    confidence=SCREEN_CONFIDENCE, seed=self.config.seed)
        return -reversed_loss.upper

    def _judgement(self, fp32: np.ndarray | float, scores: np.ndarray | float) -> Judgement:
        if isinstance(scores, float) or isinstance(fp32, float) or self.config.confidence is None:
            metric = scores if isinstance(scores, float) else float(scores.mean())
            return Judgement(metric, self.config.loss(float(np.mean(fp32)), metric), None)
        estimate = paired_loss(fp32, scores, loss_type=self.config.loss_type,
                               higher_is_better=self.config.higher_is_better is not False,
                               confidence=self.config.confidence, seed=self.config.seed)
        return Judgement(float(scores.mean()), estimate.loss, estimate)

    def certifiable(self) -> str | None:
        """Why the confirmation part is too small to certify the budget even for a model identical to
        FP32 (with the samples needed), or None."""
        part = CONFIRM if self.size(CONFIRM) else SEARCH
        if self.config.confidence is None or not self.per_sample:
            return None
        fp32 = self.fp32[part]
        best = paired_loss(fp32, fp32, loss_type=self.config.loss_type, higher_is_better=self.config.higher_is_better is not False,
                           confidence=self.config.confidence)
        if best.upper <= self.config.max_loss:
            return None
        needed = samples_needed(best, self.config.max_loss)
        return (f"the {len(fp32)} {'confirmation' if part == CONFIRM else 'evaluation'} samples cannot certify "
                f"max_loss={self.config.max_loss} at confidence {self.config.confidence} even for a model identical "
                f"to FP32 (upper bound {best.upper:+.4f}); about {needed} would: pass more evaluation data, a larger "
                f"confirm_fraction, a lower confidence or a larger max_loss")


def split(n: int, confirm_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sample indices of the search and confirmation parts: a seeded shuffle, `confirm_fraction` of the
    samples held back (none when 0); each part keeps the samples' original order."""
    order = np.random.default_rng(seed).permutation(n)
    held_back = int(round(n * confirm_fraction))
    if confirm_fraction and not 0 < held_back < n:
        raise ValueError(f"confirm_fraction={confirm_fraction} of {n} evaluation samples leaves a part empty: "
                         f"pass more evaluation data or set confirm_fraction=0 (no confirmation).")
    parts = {SEARCH: np.sort(order[held_back:])}
    if held_back:
        parts[CONFIRM] = np.sort(order[:held_back])
    return parts

