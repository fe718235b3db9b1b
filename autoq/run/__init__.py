"""Run files: a whole tuning run (model, data, metric, settings) described in TOML."""

from autoq.run.sources import Job, prepare
from autoq.run.spec import RunSpec, load_run

__all__ = ["Job", "RunSpec", "load_run", "prepare"]
