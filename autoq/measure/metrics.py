"""Built-in accuracy metrics (metric(outputs, targets) -> float over a whole eval set) and training
losses (for QAT) that run files name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from sklearn.metrics import f1_score
from torch import Tensor

Metric = Callable[[Tensor, Tensor], float]


def top1(outputs: Tensor, targets: Tensor) -> float:
    """Fraction of rows whose largest output is the target class."""
    return float((outputs.argmax(dim=1) == targets).float().mean())


def f1(outputs: Tensor, targets: Tensor) -> float:
    """Macro-averaged F1 of the argmax class (sklearn), in [0, 1]."""
    return float(f1_score(targets.numpy(), outputs.argmax(dim=1).numpy(), average="macro"))


def mse(outputs: Tensor, targets: Tensor) -> float:
    """Mean squared error (lower is better)."""
    return float(torch.nn.functional.mse_loss(outputs.float(), targets.float().view_as(outputs)))


BUILTIN: dict[str, tuple[Metric, bool]] = {  # name -> (metric, higher is better)
    "top1": (top1, True),
    "f1": (f1, True),
    "mse": (mse, False),
}


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {  # run files' `loss` (QAT fine-tunes)
    "cross_entropy": torch.nn.functional.cross_entropy,
    "mse": lambda outputs, targets: torch.nn.functional.mse_loss(outputs, targets.float().view_as(outputs)),
}
