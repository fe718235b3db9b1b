"""Per-layer int8 kernel library choice (FBGEMM vs oneDNN): measured, learned, stored in tables."""

from autoq.dispatch.isa import Int8Path, int8_path
from autoq.dispatch.layers import LIBRARIES, LayerShape, layer_shapes, set_layer_engines
from autoq.dispatch.measured import LayerTimer
from autoq.dispatch.rule import DispatchRule, Measurement
from autoq.dispatch.table import CpuIdentity, DispatchTable, current_cpu, shipped_table

__all__ = [
    "LIBRARIES", "CpuIdentity", "DispatchRule", "DispatchTable", "Int8Path", "LayerShape", "LayerTimer", "Measurement",
    "current_cpu", "int8_path", "layer_shapes", "set_layer_engines", "shipped_table",
]
