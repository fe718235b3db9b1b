"""Selecting which int8 kernel library prepacks weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Temporarily set torch.backends.quantized.engine; weights packed inside keep that library."""
    supported = torch.backends.quantized.supported_engines
    if name not in supported:
        raise ValueError(f"Quantized engine {name!r} is not available in this torch build (supported: {supported}).")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
