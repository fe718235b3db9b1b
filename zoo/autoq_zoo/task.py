"""``Task``: a trained FP32 model with its calibration, validation and held-out test data."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# A batch of model inputs or raw inputs: one tensor, or a tuple of tensors with the same rows
# (a tuple of model inputs is passed to the model as separate arguments).
Inputs = Tensor | tuple[Tensor, ...]


def top1_correct(outputs: Tensor, labels: Tensor) -> Tensor:
    """Per sample: 1.0 where the top-1 class of ``outputs`` ``[N, classes]`` is the label, else 0.0."""
    return (outputs.argmax(dim=1) == labels).float()


@dataclass
class Task:
    """A trained FP32 model with calibration, validation and held-out test data.

    ``val`` and ``test`` hold compact *raw* inputs (e.g. uint8 28x28 images, or a tuple of tensors
    such as token ids and attention mask, sliced together) and labels (int64 classes, unless
    ``score`` reads other targets, e.g. pitches in cents); ``preprocess`` turns
    a raw batch into model inputs (``None``: raw batches already are model inputs). A tuple of
    model inputs is passed to the model as separate arguments. ``example_inputs`` (one batch) and
    ``calib`` (batches drawn from the training split, each a tensor or a tuple of input tensors)
    are already model inputs. ``batch_size`` is the default evaluation batch size (samples),
    chosen per task. ``train`` (raw, like ``val``; None where the task has no fine-tunable
    model) is the split the model was trained on, for quantization-aware training:
    ``task.batches("train")``. ``score`` maps a batch's model outputs and labels to per-sample
    scores in [0, 1] (default ``top1_correct``; a task whose labels are not classes brings its own).
    """

    name: str
    model: nn.Module
    example_inputs: tuple[Tensor, ...]
    calib: list[Inputs]
    val: tuple[Inputs, Tensor]
    test: tuple[Inputs, Tensor]
    preprocess: Callable[[Inputs], Inputs] | None
    batch_size: int = 64
    train: tuple[Inputs, Tensor] | None = None  # the training split (raw, like val), where fine-tuning applies
    score: Callable[[Tensor, Tensor], Tensor] = top1_correct  # (outputs, labels) -> per-sample scores

    def batches(self, split: str = "val", batch_size: int | None = None) -> Iterator[tuple[Inputs, Tensor]]:
        """Yield ``(model inputs, labels)`` batches of ``split`` ("val", "test" or, if the task has
        one, "train"), in order."""
        batch_size = self.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of samples; got {batch_size}.")
        raw_inputs, labels = self._split(split)
        for start in range(0, len(labels), batch_size):
            rows = slice(start, start + batch_size)
            if isinstance(raw_inputs, tuple):
                raw_batch = tuple(tensor[rows] for tensor in raw_inputs)
            else:
                raw_batch = raw_inputs[rows]
            yield raw_batch if self.preprocess is None else self.preprocess(raw_batch), labels[rows]

    def accuracy(self, model: nn.Module, split: str = "val", batch_size: int | None = None) -> float:
        """Accuracy of ``model`` on ``split`` ("val" or "test"): the mean per-sample ``score``, in [0, 1]
        (top-1 accuracy unless the task sets ``score``).

        ``model`` must already be in eval mode; it is called under ``torch.no_grad()``.
        """
        return float(self.correct(model, split, batch_size).mean())

    def correct(self, model: nn.Module, split: str = "val", batch_size: int | None = None) -> Tensor:
        """Per sample of ``split``, in order: the task's ``score`` of ``model``'s output (by default 1.0
        where the top-1 class is the label, else 0.0)."""
        scores = []
        with torch.no_grad():
            for inputs, labels in self.batches(split, batch_size):
                outputs = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
                scores.append(self.score(outputs, labels))
        return torch.cat(scores)

    def eval_data(self, split: str = "val") -> list[tuple[Inputs, Tensor]]:
        """``split`` as ``(model inputs, labels)`` batches, preprocessed once: autoq's ``eval_data``, with
        ``metric=task.score``. autoq then runs the model on only the samples it asks for (a search trial
        on its part, a clearly failing plan on a share of it), where ``eval_fn`` scores every sample."""
        return list(self.batches(split))

    def eval_fn(self) -> Callable[[nn.Module], Tensor]:
        """``model ->`` per-sample scores on val (``correct``; their mean is the accuracy), the tuner's
        objective: per-sample scores let autoq confirm its pick on held-back samples with a bound."""
        return functools.partial(self.correct, split="val")

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split == "val":
            return self.val
        if split == "test":
            return self.test
        if split == "train" and self.train is not None:
            return self.train
        splits = "'val', 'test' or 'train'" if self.train is not None else "'val' or 'test' (this task has no train split)"
        raise ValueError(f"Task split must be {splits}; got {split!r}.")
