"""Per-layer library choice measured in the whole model: each layer timed inside real runs."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

from torch import nn

from autoq.dispatch.layers import LIBRARIES, LayerShape, layer_shapes, set_layer_engines, weighted_layers
from autoq.dispatch.microbench import time_layers_in_model
from autoq.dispatch.rule import Measurement


class LayerTimer:
    """Chooses each weighted layer's library from its time inside whole-model runs under both.

    The candidate is copied once per library with every layer packed for it; the copies run
    alternately and forward hooks time each layer's segment. Timings are kept per (layer, module
    type, shape): later candidates with the same layers reuse them, while a conv that became a
    ConvReLU (ReLU6 folding) is timed anew. `records()` / `known=` carry them across
    processes (a resumed study does not time them again).
    """

    def __init__(self, known: Iterable[dict] = (), seconds: float = 1.0, threads: int | None = None) -> None:
        self.seconds, self.threads = seconds, threads
        self._timings: dict[tuple[str, str, str], tuple[LayerShape, dict[str, float]]] = {}
        for record in known:
            shape = LayerShape.from_dict(record["shape"])
            self._timings[(record["layer"], record["module"], shape.key())] = (shape, dict(record["micros"]))

    def choose(self, model: nn.Module, example_inputs: tuple) -> dict[str, str]:
        """{layer: fastest library inside the model} for every weighted layer `example_inputs` reach."""
        shapes = layer_shapes(model, example_inputs)
        modules = weighted_layers(model)
        keys = {name: (name, type(modules[name]).__name__, shape.key()) for name, shape in shapes.items()}
        if any(key not in self._timings for key in keys.values()):
            variants = {}
            for library in LIBRARIES:
                variants[library] = copy.deepcopy(model)
                set_layer_engines(variants[library], {name: library for name in shapes})
            measured = time_layers_in_model(variants, example_inputs, seconds=self.seconds, threads=self.threads)
            for name, shape in shapes.items():
                self._timings[keys[name]] = (shape, measured[name])
        return {name: _fastest(self._timings[key][1]) for name, key in keys.items()}

    def records(self) -> list[dict]:
        """Every layer timing as plain data: {'layer', 'module', 'shape', 'micros'} (microseconds)."""
        return [{"layer": layer, "module": module, "shape": shape.to_dict(), "micros": micros}
                for (layer, module, _), (shape, micros) in sorted(self._timings.items())]

    def entries(self) -> list[Measurement]:
        """One table entry per shape: geometric mean over the layers of that shape, source 'tuning'."""
        by_shape: dict[str, list[tuple[LayerShape, dict[str, float]]]] = {}
        for (_, _, key), timing in self._timings.items():
            by_shape.setdefault(key, []).append(timing)
        entries = []
        for timings in by_shape.values():
            micros = {library: math.exp(sum(math.log(t[library]) for _, t in timings) / len(timings))
                      for library in LIBRARIES}
            entries.append(Measurement(timings[0][0], micros, "tuning"))
        return entries


def _fastest(micros: dict[str, float]) -> str:
    return min(micros, key=micros.__getitem__)
