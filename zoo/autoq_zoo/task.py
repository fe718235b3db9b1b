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


@dataclass
class Task:
    """A trained FP32 model with calibration, validation and held-out test data.

    ``val`` and ``test`` hold compact *raw* inputs (e.g. uint8 28x28 images, or a tuple of tensors
    such as token ids and attention mask, sliced together) and int64 labels; ``preprocess`` turns
    a raw batch into model inputs (``None``: raw batches already are model inputs). A tuple of
    model inputs is passed to the model as separate arguments. ``example_inputs`` (one batch) and
    ``calib`` (batches drawn from the training split, each a tensor or a tuple of input tensors)
    are already model inputs. ``batch_size`` is the default evaluation batch size (samples),
    chosen per task. ``train`` (raw, like ``val``; None where the task has no fine-tunable
    model) is the split the model was trained on, for quantization-aware training:
    ``task.batches("train")``.
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
        """Top-1 accuracy of ``model`` on ``split`` ("val" or "test"), a fraction in [0, 1].

        ``model`` must already be in eval mode; it is called under ``torch.no_grad()``.
        """
        return float(self.correct(model, split, batch_size).mean())

    def correct(self, model: nn.Module, split: str = "val", batch_size: int | None = None) -> Tensor:
        """Per sample of ``split``, in order: 1.0 where ``model``'s top-1 class is the label, else 0.0."""
        scores = []
        with torch.no_grad():
            for inputs, labels in self.batches(split, batch_size):
                logits = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
                scores.append((logits.argmax(dim=1) == labels).float())
        return torch.cat(scores)

    def eval_fn(self) -> Callable[[nn.Module], Tensor]:
        """``model ->`` per-sample top-1 correctness on val (their mean is the accuracy), the tuner's
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
