"""autoq: accuracy-aware, speed-measured INT8 quantization tuning for PyTorch on x86 CPUs."""

from autoq.capture import TraceError
from autoq.config import TuneConfig
from autoq.deploy import export
from autoq.dispatch.apply import apply_dispatch
from autoq.dispatch.table import DispatchTable
from autoq.plan import QuantPlan
from autoq.result import TuneResult, load, save
from autoq.search.space import SearchSpace
from autoq.tuner import quantize, tune

__all__ = ["DispatchTable", "QuantPlan", "SearchSpace", "TraceError", "TuneConfig", "TuneResult", "apply_dispatch",
           "export", "load", "quantize", "save", "tune"]
__version__ = "0.2.0"
