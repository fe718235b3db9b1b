"""The kernel shape suite (kernels/shapes.toml) and building a dispatch table by timing it."""

from __future__ import annotations

import os
import random
import tomllib
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from autoq.dispatch.layers import LayerShape
from autoq.dispatch.microbench import synthetic_layer, time_libraries
from autoq.dispatch.table import DispatchTable, Entry

_CONV_KEYS = ("in_channels", "kernel", "stride", "spatial", "batch", "groups", "channels_last")
_LINEAR_KEYS = ("rows", "in_features", "out_features")


def default_suite_path() -> Path:
    return Path(str(resources.files("autoq.kernels") / "shapes.toml"))


def load_suite(path: str | os.PathLike | None = None) -> list[LayerShape]:
    """The shapes a suite file describes (the shipped kernels/shapes.toml by default), deduplicated."""
    path = Path(path) if path is not None else default_suite_path()
    try:
        suite = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"Cannot read shape suite {os.fspath(path)!r}: {error}") from error
    rng = random.Random(suite.get("seed", 0))
    max_macs = float(suite.get("max_gmacs", 1.5)) * 1e9
    shapes: dict[str, LayerShape] = {}
    for family in suite.get("family", []):
        kind = family.get("kind")
        keys = _LINEAR_KEYS if kind == "linear" else _CONV_KEYS
        missing = [key for key in (*keys, "samples") if key not in family]
        if kind not in ("conv2d", "linear") or missing:
            raise ValueError(
                f"Shape family {family.get('name')!r} in {os.fspath(path)!r}: kind must be 'conv2d' or "
                f"'linear' (got {kind!r}) and it needs the keys {[*keys, 'samples']} (missing {missing})."
            )
        drawn, attempts = 0, 0
        while drawn < family["samples"] and attempts < 100 * family["samples"]:
            attempts += 1
            shape = _draw(family, rng)
            rows, reduction, columns = shape.gemm()
            if rows * reduction * columns * shape.groups > max_macs or shape.key() in shapes:
                continue
            shapes[shape.key()] = shape
            drawn += 1
    return list(shapes.values())


def _draw(family: dict, rng: random.Random) -> LayerShape:
    if family["kind"] == "linear":
        return LayerShape("linear", rng.choice(family["rows"]), rng.choice(family["in_features"]),
                          rng.choice(family["out_features"]))
    channels = rng.choice(family["in_channels"])
    if family["groups"] == "depthwise":
        groups, out_channels = channels, channels
    else:
        out_channels = rng.choice(family["out_channels"])
        groups = rng.choice([g for g in family["groups"] if channels % g == 0 and out_channels % g == 0] or [1])
    kernel, stride = rng.choice(family["kernel"]), rng.choice(family["stride"])
    spatial = rng.choice(family["spatial"])
    return LayerShape(
        "conv2d", rng.choice(family["batch"]), channels, out_channels, (kernel, kernel), (stride, stride),
        (kernel // 2, kernel // 2), (1, 1), groups, (spatial, spatial), rng.choice(family["channels_last"]),
    )


def bench_shapes(shapes: Sequence[LayerShape], *, threads: int | None = None,
                 progress: Callable[[int, int, Entry], None] | None = None) -> list[Entry]:
    """Time every shape under both libraries (synthetic weights and inputs); microseconds per call."""
    entries = []
    for index, shape in enumerate(shapes):
        module, x = synthetic_layer(shape, seed=index)
        entries.append(Entry(shape, time_libraries(module, x, threads=threads), "microbench"))
        if progress is not None:
            progress(index + 1, len(shapes), entries[-1])
    return entries


def bench_table(shapes: Sequence[LayerShape], *, threads: int | None = None, max_depth: int = 3,
                progress: Callable[[int, int, Entry], None] | None = None) -> DispatchTable:
    """A dispatch table for this CPU: the suite's measurements and the rule learned from them."""
    table = DispatchTable.for_this_machine(bench_shapes(shapes, threads=threads, progress=progress))
    if threads is not None:
        table.threads = threads
    table.refit(max_depth=max_depth)
    return table
