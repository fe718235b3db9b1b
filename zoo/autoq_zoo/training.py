"""What the zoo's tasks share: the training loop, the logistic-regression heads and the weight cache.

Trained weights and heads are small files under ``cache_dir`` (default ``$AUTOQ_CACHE`` or
``~/.cache/autoq``), written atomically, so that the second call of a task builder is fast.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoq.files import replacing

logger = logging.getLogger(__name__)

# Bump when training code or hyper-parameters change, so stale cached weights are not reused.
CACHE_VERSION = "1"


def train_classifier(
    build: Callable[[], nn.Module], inputs: Tensor, labels: Tensor, seed: int, *, epochs: int,
    batch_size: int, learning_rate: float, threads: int | None = None,
) -> dict[str, Tensor]:
    """Train ``build()`` from scratch on cross-entropy: Adam with a one-cycle schedule, shuffled
    batches, ``seed`` for both. Keeps the caller's RNG state (and thread count, with ``threads``)."""
    started = time.perf_counter()
    saved_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads or saved_threads)
        try:
            model = build().train()
            optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
            steps_per_epoch = math.ceil(len(labels) / batch_size)
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
            )
            for _ in range(epochs):
                for batch in torch.randperm(len(labels)).split(batch_size):
                    loss = F.cross_entropy(model(inputs[batch]), labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        finally:
            torch.set_num_threads(saved_threads)
    logger.info("trained %s (seed %d) in %.1f s", type(model).__name__, seed, time.perf_counter() - started)
    return model.state_dict()


def logistic_regression_layer(
    features: Tensor, labels: Tensor, inverse_l2: float, seed: int
) -> dict[str, Tensor]:
    """Fit a logistic regression on float64 ``features``; return ``nn.Linear`` weight and bias (float64).

    ``inverse_l2`` is sklearn's ``C``. The layer has one output per class: with two classes,
    sklearn's single row ``w`` (class 1 against class 0) becomes the rows ``-w/2, w/2``, whose
    softmax is the regression's probability.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    classifier = LogisticRegression(C=inverse_l2, max_iter=1000, random_state=seed)
    # Single-threaded BLAS: this small fit is 10-40x faster than with numpy's and scipy's two
    # OpenBLAS pools competing for the cores.
    with threadpool_limits(limits=1):
        classifier.fit(features.numpy(), labels.numpy())
    weight, bias = torch.from_numpy(classifier.coef_), torch.from_numpy(classifier.intercept_)
    if len(weight) == 1:
        weight, bias = torch.cat([-weight, weight]) / 2, torch.cat([-bias, bias]) / 2
    return {"weight": weight, "bias": bias}


def resolve_cache_dir(cache_dir: Path | None) -> Path:
    """The folder of cached weights: ``cache_dir`` if given, else ``$AUTOQ_CACHE`` or ``~/.cache/autoq``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("AUTOQ_CACHE") or Path.home() / ".cache" / "autoq")


def cached(path: Path, build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Load a state_dict from ``path``, or build it and save it there atomically."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    state = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as partial_path:
            torch.save(state, partial_path)
    except OSError as error:
        raise OSError(
            f"Cannot write the autoq_zoo cache file {path} ({error}). Pass a writable cache_dir "
            f"or set AUTOQ_CACHE to a writable directory."
        ) from error
    return state
