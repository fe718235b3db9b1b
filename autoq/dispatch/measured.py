"""Per-layer library choice measured in place: each layer timed on its real input in the candidate."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from autoq.dispatch.layers import layer_inputs, layer_shape, weighted_layers
from autoq.dispatch.microbench import time_libraries
from autoq.dispatch.table import DispatchTable, Entry


class LayerTimer:
    """Chooses each weighted layer's library by timing it under both, once per shape signature.

    Measurements go into `table` (entries with source 'tuning'), so later candidates with the same
    layer shapes reuse them and the run can export them.
    """

    def __init__(self, table: DispatchTable | None = None, threads: int | None = None) -> None:
        self.table = table if table is not None else DispatchTable.for_this_machine()
        self.threads = threads

    def choose(self, model: nn.Module, example_inputs: tuple) -> dict[str, str]:
        """{layer: fastest library} for every weighted layer `example_inputs` reach."""
        modules = weighted_layers(model)
        choices = {}
        for name, x in layer_inputs(model, example_inputs).items():
            shape = layer_shape(modules[name], x)
            entry = self.table.entries.get(shape.key())
            if entry is None or entry.source != "tuning":
                entry = Entry(shape, time_libraries(modules[name], x, threads=self.threads), "tuning")
                self.table.add([entry])
            choices[name] = entry.library
        return choices

    def tuning_entries(self) -> Iterable[Entry]:
        return [entry for entry in self.table.entries.values() if entry.source == "tuning"]
