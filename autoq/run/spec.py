"""A run file (TOML): model, data, metric and tune settings of a tuning run, validated up front.

    name = "mobilenet-fashion"          # optional: default is the file name; names the output dir
    output = "autoq-runs/NAME"          # optional: model, report and run record go here
    metric = "top1"                     # top1 | f1 | mse | "module:function" (outputs, targets) -> float
    loss = "cross_entropy"              # QAT training loss: cross_entropy | mse | "module:function"

    [model]                             # one of factory / torchvision
    factory = "autoq_zoo:mobilenet_fashion"   # "pkg.module:callable" or "path/to/file.py:callable"
    args = { resolution = 224 }
    weights = "weights.pth"             # optional state_dict: a path or "package:path/in/package"
    example_batch = 1                   # batch size latency is measured at

    [calib]                             # one of builtin / factory / format; same keys for [eval]
    builtin = "fashion-mnist"
    ...

    [train]                             # optional, same keys as [calib]: enables the QAT recovery arm

    [tune]                              # autoq.TuneConfig fields (strategy = "NAME" applies a preset)
    max_loss = 0.01
    [tune.space]
    kernels = ["x86", "measured"]

Relative paths of files (weights, data files, factory .py files) are relative to the run file;
`output` and sqlite storage URLs are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoq.config import TuneConfig, check_keys
from autoq.measure.metrics import BUILTIN, LOSSES

BUILTIN_DATA = ("fashion-mnist", "mnist-5k", "digits")
FORMATS = ("csv", "parquet", "json", "imagefolder")
PREPROCESS = ("mnist", "imagenet", "none")
DEFAULT_OUTPUT = "autoq-runs"


def _error(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def _require(value: Any, kind: type | tuple[type, ...], where: str, expected: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _error(where, f"must be {expected}. Got {value!r} instead.")
    return value


def _import_path(value: Any, where: str) -> str:
    _require(value, str, where, "an import path 'package.module:callable' or 'path/to/file.py:callable'")
    module, _, name = value.partition(":")
    if not module or not name:
        raise _error(where, f"must look like 'package.module:callable' or 'file.py:callable'. Got {value!r}.")
    return value


@dataclass
class ModelSpec:
    """Where the FP32 model comes from."""

    factory: str | None = None
    torchvision: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    example_batch: int = 1

    def __post_init__(self) -> None:
        where = "[model]"
        if (self.factory is None) == (self.torchvision is None):
            raise _error(where, "give exactly one of 'factory' (an import path) or 'torchvision' (a "
                                "torchvision.models builder name such as 'resnet18').")
        if self.factory is not None:
            _import_path(self.factory, f"{where} factory")
        else:
            _require(self.torchvision, str, f"{where} torchvision", "a torchvision.models builder name")
        _require(self.args, dict, f"{where} args", "a table of keyword arguments")
        if self.weights is not None:
            _require(self.weights, str, f"{where} weights", "a state_dict file path or 'package:path'")
        if _require(self.example_batch, int, f"{where} example_batch", "a positive int") < 1:
            raise _error(f"{where} example_batch", f"must be a positive int. Got {self.example_batch}.")


@dataclass
class DataSpec:
    """Where calibration or evaluation batches of (inputs, targets) come from.

    builtin: 'fashion-mnist' (split train|test), 'mnist-5k' (train|val|test, a fixed 4000/500/500 split)
      or 'digits' (sklearn, one split 'train'), read by autoq.run.datasets; images go through `preprocess`.
    factory: import path of a callable(**args) returning a torch Dataset of (input, target) items,
      a DataLoader, or any iterable of (inputs, targets) batches.
    format + files: Hugging Face `datasets` from local files: csv/parquet/json (`columns` are the
      input features, `label` the target column) or imagefolder (`files` is the folder).
    start / samples: the slice of the dataset used (samples: None = all); batch_size: samples per batch.
    """

    where: str
    builtin: str | None = None
    factory: str | None = None
    format: str | None = None
    files: str | list[str] | None = None
    split: str = "train"
    columns: list[str] = field(default_factory=list)
    label: str = "label"
    preprocess: str = "none"
    resolution: int | None = None
    args: dict[str, Any] = field(default_factory=dict)
    start: int = 0
    samples: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        where = self.where
        sources = [name for name in ("builtin", "factory", "format") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise _error(where, f"give exactly one of 'builtin' {list(BUILTIN_DATA)}, 'factory' (an import "
                                f"path) or 'format' {list(FORMATS)} with 'files'. Got {sources or 'none'}.")
        if self.builtin is not None and self.builtin not in BUILTIN_DATA:
            raise _error(f"{where} builtin", f"must be one of {list(BUILTIN_DATA)}. Got {self.builtin!r}.")
        if self.factory is not None:
            _import_path(self.factory, f"{where} factory")
        if self.format is not None:
            if self.format not in FORMATS:
                raise _error(f"{where} format", f"must be one of {list(FORMATS)}. Got {self.format!r}.")
            if self.files is None:
                raise _error(where, f"format {self.format!r} needs 'files' (a path, glob or list of paths"
                                    f"{'; the image folder' if self.format == 'imagefolder' else ''}).")
            if self.format != "imagefolder" and not self.columns:
                raise _error(where, f"format {self.format!r} needs 'columns': the input feature columns.")
        if self.preprocess not in PREPROCESS:
            raise _error(f"{where} preprocess", f"must be one of {list(PREPROCESS)}. Got {self.preprocess!r}.")
        _require(self.split, str, f"{where} split", "a split name")
        _require(self.columns, list, f"{where} columns", "a list of column names")
        _require(self.args, dict, f"{where} args", "a table of keyword arguments")
        for name in ("start", "batch_size", "samples", "resolution"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < (0 if name == "start" else 1)):
                raise _error(f"{where} {name}", f"must be a {'non-negative' if name == 'start' else 'positive'} "
                                                f"int. Got {value!r}.")


@dataclass
class RunSpec:
    """A whole run file: what to tune (model, data, metric), how (tune), where results go (output)."""

    name: str
    path: Path
    model: ModelSpec
    calib: DataSpec
    eval: DataSpec
    metric: str
    tune: TuneConfig
    output: Path
    train: DataSpec | None = None  # QAT fine-tuning data (None: no QAT)
    loss: str = "cross_entropy"

    @property
    def base(self) -> Path:
        """The run file's folder: relative file paths in the run file start here."""
        return self.path.parent


RUN_KEYS = ["name", "output", "metric", "loss", "model", "calib", "eval", "train", "tune"]


def load_run(path: str | Path, **overrides: Any) -> RunSpec:
    """Read and validate a run file; `overrides` are [tune] settings that win (e.g. from the CLI).

    Every problem is a ValueError naming the file, the key and the allowed values.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError as error:
        raise ValueError(f"run file {str(path)!r} not found.") from error
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from error
    try:
        return _parse(path, data, overrides)
    except (TypeError, ValueError) as error:
        message = str(error)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def _parse(path: Path, data: dict[str, Any], overrides: dict[str, Any]) -> RunSpec:
    check_keys(data, RUN_KEYS, "the run file")
    for section in ("model", "calib", "eval"):
        if section not in data:
            raise _error(f"[{section}]", "missing: the run file needs [model], [calib] and [eval] tables.")
        _require(data[section], dict, f"[{section}]", "a table")
    check_keys(data["model"], [f.name for f in dataclasses.fields(ModelSpec)], "[model]")
    data_keys = [f.name for f in dataclasses.fields(DataSpec) if f.name != "where"]
    for section in ("calib", "eval", "train"):
        if section in data:
            _require(data[section], dict, f"[{section}]", "a table")
            check_keys(data[section], data_keys, f"[{section}]")
    loss = _require(data.get("loss", "cross_entropy"), str, "loss", f"one of {list(LOSSES)} or an import path")
    if loss not in LOSSES:
        _import_path(loss, "loss")
    if "loss" in data and "train" not in data:
        raise _error("loss", "is the QAT training loss, but there is no [train] table: add one or remove 'loss'.")
    metric = _require(data.get("metric", "top1"), str, "metric", f"one of {list(BUILTIN)} or an import path")
    if metric not in BUILTIN:
        _import_path(metric, "metric")
    tune = dict(_require(data.get("tune", {}), dict, "[tune]", "a table"))
    if metric in BUILTIN:
        higher_is_better = BUILTIN[metric][1]
        if tune.get("higher_is_better", higher_is_better) != higher_is_better:
            raise _error("[tune] higher_is_better", f"contradicts metric {metric!r} (higher is "
                                                    f"{'better' if higher_is_better else 'worse'}); remove it.")
        tune["higher_is_better"] = higher_is_better
    tune.update({key: value for key, value in overrides.items() if value is not None})
    name = _require(data.get("name", path.stem), str, "name", "a string")
    output = _require(data.get("output", f"{DEFAULT_OUTPUT}/{name}"), str, "output", "a folder path")
    return RunSpec(
        name=name, path=path, model=ModelSpec(**data["model"]),
        calib=DataSpec(where="[calib]", **data["calib"]), eval=DataSpec(where="[eval]", **data["eval"]),
        metric=metric, tune=TuneConfig.from_dict(tune, "[tune]"), output=Path(output),
        train=DataSpec(where="[train]", **data["train"]) if "train" in data else None, loss=loss,
    )
