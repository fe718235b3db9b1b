"""autoq: accuracy-aware, speed-measured INT8 quantization tuning for PyTorch on x86 CPUs."""

from autoq.capture import TraceError
from autoq.config import TuneConfig
from autoq.plan import QuantPlan
from autoq.result import TuneResult, load
from autoq.search.space import SearchSpace
from autoq.tuner import quantize, tune

__all__ = ["QuantPlan", "SearchSpace", "TraceError", "TuneConfig", "TuneResult", "load", "quantize", "tune"]
__version__ = "0.1.0"
