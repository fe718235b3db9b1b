"""Dynamic quantization: int8 weights, activations quantized per call at run time (no calibration).

Eager mode (`torch.ao.quantization.quantize_dynamic`), so it needs no graph capture: any model
with Linear, LSTM or GRU modules works, traceable or not. The plan's FP32 fallbacks are module
names; its weight granularity applies to Linear (LSTM/GRU weights are always per tensor, the
only kind PyTorch's dynamic RNN kernels take).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

from torch import nn
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

from autoq.capture import use_base_layer_classes
from autoq.dispatch.engine import quantized_engine
from autoq.dispatch.layers import set_layer_engines
from autoq.plan import QuantPlan

DYNAMIC_LAYER_TYPES = (nn.Linear, nn.LSTM, nn.GRU)
_QCONFIGS = {"per_channel": per_channel_dynamic_qconfig, "per_tensor": default_dynamic_qconfig}


def dynamic_layers(model: nn.Module) -> list[str]:
    """Names of the modules dynamic quantization converts (Linear, LSTM, GRU and their subclasses)."""
    return [name for name, module in model.named_modules() if name and isinstance(module, DYNAMIC_LAYER_TYPES)]


class DynamicBuilder:
    """`build(plan)` returns `model` with its Linear/LSTM/GRU modules dynamically quantized per the plan."""

    recipe = "dynamic"

    def __init__(self, model: nn.Module, example_inputs: tuple) -> None:
        self.example_inputs = example_inputs
        self._model = copy.deepcopy(model).eval()
        use_base_layer_classes(self._model, DYNAMIC_LAYER_TYPES)  # quantize_dynamic maps exact classes only
        self.layers = dynamic_layers(self._model)
        if not self.layers:
            raise ValueError("dynamic quantization needs Linear, LSTM or GRU modules; this model has none.")

    def qconfig_spec(self, plan: QuantPlan, layers: Sequence[str] | None = None) -> dict[str, object]:
        """{module name: qconfig} of the layers `plan` quantizes (or of `layers`, if given)."""
        chosen = [name for name in self.layers if name not in plan.fp32_layers] if layers is None else layers
        modules = dict(self._model.named_modules())
        return {name: (_QCONFIGS[plan.weight_granularity] if isinstance(modules[name], nn.Linear)
                       else default_dynamic_qconfig) for name in chosen}

    def build(self, plan: QuantPlan, layers: Sequence[str] | None = None) -> nn.Module:
        """The int8 model of `plan` (a copy; the builder's model is untouched)."""
        unknown = set(plan.fp32_layers) - set(self.layers)
        if unknown:
            raise ValueError(f"fp32_layers names {sorted(unknown)}, which are not Linear/LSTM/GRU modules of this "
                             f"model. Known layers: {self.layers}")
        with warnings.catch_warnings(), quantized_engine(plan.engine):
            warnings.simplefilter("ignore")
            model = quantize_dynamic(self._model, qconfig_spec=self.qconfig_spec(plan, layers), inplace=False)
        set_layer_engines(model, plan.layer_engines)
        model.meta = {"autoq": {"plan": plan.to_dict(), "summary": {}}}
        return model
