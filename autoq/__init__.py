"""autoq: accuracy-aware, speed-measured INT8 quantization tuning for PyTorch on x86 CPUs.

The public names load their modules on first use (as Optuna's do), so `import autoq` and the plain
config types stay cheap; `autoq.tune` brings in torch.ao, torchao and Optuna.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["DispatchTable", "QuantPlan", "SearchSpace", "TraceError", "TuneConfig", "TuneResult", "apply_dispatch",
           "export", "load", "quantize", "save", "tune"]
__version__ = "0.2.0"

_MODULES = {"DispatchTable": "autoq.dispatch.table", "QuantPlan": "autoq.plan", "SearchSpace": "autoq.config",
            "TraceError": "autoq.capture", "TuneConfig": "autoq.config", "TuneResult": "autoq.result",
            "apply_dispatch": "autoq.dispatch.apply", "export": "autoq.deploy", "load": "autoq.result",
            "quantize": "autoq.tuner", "save": "autoq.result", "tune": "autoq.tuner"}

if TYPE_CHECKING:
    from autoq.capture import TraceError
    from autoq.config import SearchSpace, TuneConfig
    from autoq.deploy import export
    from autoq.dispatch.apply import apply_dispatch
    from autoq.dispatch.table import DispatchTable
    from autoq.plan import QuantPlan
    from autoq.result import TuneResult, load, save
    from autoq.tuner import quantize, tune


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'autoq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
