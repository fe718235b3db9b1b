"""The kernel shape suite (kernels/shapes.toml) and building a dispatch table by timing it."""

from __future__ import annotations

import math
import os
import random
import tomllib
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from autoq.dispatch.layers import LayerShape
from autoq.dispatch.microbench import float_kernels, synthetic_layer, time_libraries
from autoq.dispatch.rule import DEPTH, Measurement
from autoq.dispatch.table import DispatchTable

_CONV_KEYS = ("in_channels", "kernel", "stride", "spatial", "batch", "groups", "channels_last")
_LINEAR_KEYS = ("rows", "in_features", "out_features")
SECONDS_PER_SHAPE = 0.15
PASSES = 2


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


def bench_shapes(shapes: Sequence[LayerShape], *, threads: int | None = None, seconds: float = SECONDS_PER_SHAPE,
                 passes: int = PASSES, progress: Callable[[int, int, Measurement | None], None] | None = None,
                 ) -> list[Measurement]:
    """Time every shape under both libraries and in FP32 (synthetic weights and inputs); microseconds per call.

    The FP32 time (`Measurement.fp32_micros`) is that of the faster of PyTorch's float kernels for the layer
    (`float_kernels`), timed in the same rotation: what int8 must beat for a layer of this shape to pay.
    The suite is timed `passes` times over and each shape keeps the geometric mean of its passes,
    so a burst of noise on the machine does not decide a shape alone. seconds: effort per shape
    and pass.
    """
    layers = [synthetic_layer(shape, seed=index) for index, shape in enumerate(shapes)]
    floats = [float_kernels(module, x) for module, x in layers]
    log_sums: list[dict[str, float]] = [{} for _ in shapes]
    entries: list[Measurement] = []
    for done in range(passes):
        for index, (shape, (module, x)) in enumerate(zip(shapes, layers)):
            timed = time_libraries(module, x, others=floats[index], threads=threads, seconds=seconds)
            for name, micros in timed.items():
                log_sums[index][name] = log_sums[index].get(name, 0.0) + math.log(micros)
            if done == passes - 1:
                micros = {name: math.exp(total / passes) for name, total in log_sums[index].items()}
                fp32 = min(micros.pop(name) for name in floats[index])
                entries.append(Measurement(shape, micros, "microbench", fp32))
            if progress is not None:
                progress(done * len(shapes) + index + 1, passes * len(shapes),
                         entries[-1] if done == passes - 1 else None)
    return entries


def bench_table(shapes: Sequence[LayerShape], *, threads: int | None = None, max_depth: int = DEPTH,
                seconds: float = SECONDS_PER_SHAPE, passes: int = PASSES,
                progress: Callable[[int, int, Measurement | None], None] | None = None) -> DispatchTable:
    """A dispatch table for this CPU: the suite's measurements and the rule learned from them."""
    entries = bench_shapes(shapes, threads=threads, seconds=seconds, passes=passes, progress=progress)
    table = DispatchTable.for_this_machine(entries)
    if threads is not None:
        table.threads = threads
    table.refit(max_depth=max_depth)
    return table
