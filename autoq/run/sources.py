"""Turn a run file's specs into Python objects: the FP32 model and its data batches (calibration, evaluation, training)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autoq.measure.evaluation import PER_SAMPLE_METRICS, DataEvaluation
from autoq.measure.metrics import BUILTIN, LOSSES, Metric
from autoq.run import datasets as builtin_datasets  # not Hugging Face's `datasets` (_file_batches)
from autoq.run.spec import DataSpec, ModelSpec, RunSpec

Batch = tuple[Tensor, Tensor]


@dataclass
class Job:
    """What `autoq.tune` needs, built from a run file."""

    model: nn.Module
    example_inputs: tuple[Tensor, ...]
    calib: list[Tensor]
    eval_data: list[Batch]  # (inputs, targets) batches the metric is computed on
    metric: str | Metric  # a name autoq computes per sample (PER_SAMPLE_METRICS), or a whole-set metric
    train: list[Batch] | None = None  # QAT fine-tuning batches of (inputs, targets)
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None

    def score(self, model: nn.Module) -> float:
        """The metric of `model` over the whole eval data."""
        scores = DataEvaluation(self.eval_data, self.metric).run(model)
        return scores if isinstance(scores, float) else float(scores.mean())


def prepare(spec: RunSpec) -> Job:
    """Build the model, calibration batches and eval function a run file describes."""
    model = load_model(spec.model, spec.base)
    calib = [inputs for inputs, _ in batches(spec.calib, spec.base)]
    if not calib:
        raise ValueError(f"{spec.path} [calib]: the data source yielded no batch.")
    example_inputs = (calib[0][: spec.model.example_batch],)
    if example_inputs[0].shape[0] < spec.model.example_batch:
        raise ValueError(f"{spec.path} [model] example_batch={spec.model.example_batch} is larger than the "
                         f"first calibration batch ({example_inputs[0].shape[0]} samples); raise [calib] batch_size.")
    if spec.metric in PER_SAMPLE_METRICS:
        metric = spec.metric
    else:
        metric = BUILTIN[spec.metric][0] if spec.metric in BUILTIN else resolve(spec.metric, spec.base, "metric")
    eval_data = list(batches(spec.eval, spec.base))
    if not eval_data:
        raise ValueError(f"{spec.eval.where}: the data source yielded no batch.")
    job = Job(model, example_inputs, calib, eval_data, metric)
    if spec.train is not None:
        job.train = list(batches(spec.train, spec.base))
        if not job.train:
            raise ValueError(f"{spec.path} [train]: the data source yielded no batch.")
        job.loss_fn = LOSSES[spec.loss] if spec.loss in LOSSES else resolve(spec.loss, spec.base, "loss")
    return job


def resolve(path: str, base: Path, where: str) -> Any:
    """The object an import path names: 'package.module:attr' or 'file.py:attr' (relative to base)."""
    module_name, _, attribute = path.partition(":")
    try:
        if module_name.endswith(".py"):
            file = (base / module_name).resolve()
            if not file.is_file():
                raise FileNotFoundError(f"no file {file}")
            module_spec = importlib.util.spec_from_file_location(f"autoq_run_{file.stem}", file)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module  # pickling and dataclasses look classes up here
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attribute)
    except (ImportError, FileNotFoundError, AttributeError) as error:
        raise ValueError(f"{where}: cannot load {path!r}: {type(error).__name__}: {error}") from error


def load_model(spec: ModelSpec, base: Path) -> nn.Module:
    """The FP32 model: factory(**args) or torchvision.models.NAME(**args), then `weights` if given."""
    if spec.factory is not None:
        build = resolve(spec.factory, base, "[model] factory")
    else:
        import torchvision.models

        names = torchvision.models.list_models(module=torchvision.models)
        if spec.torchvision not in names:
            raise ValueError(f"[model] torchvision: {spec.torchvision!r} is not a torchvision.models builder; "
                             f"choose one of {names}.")
        build = torchvision.models.get_model_builder(spec.torchvision)
    model = build(**spec.args)
    if not isinstance(model, nn.Module):
        raise ValueError(f"[model]: {spec.factory or spec.torchvision} returned {type(model).__name__}, "
                         f"not a torch.nn.Module.")
    if spec.weights is not None:
        state = torch.load(package_file(spec.weights, base), map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except RuntimeError as error:
            raise ValueError(f"[model] weights {spec.weights!r} do not fit the model: {error}") from error
    return model.eval()


def package_file(location: str, base: Path) -> Path:
    """A file given as a path (relative to base) or as 'package:path/inside/package' (found, not imported)."""
    package, separator, inner = location.partition(":")
    if separator and "/" not in package and "\\" not in package:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ValueError(f"package {package!r} (for {location!r}) is not installed: pip install it.")
        path = Path(next(iter(found.submodule_search_locations))) / inner
    else:
        path = base / location
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} (for {location!r}) not found.")
    return path


def batches(spec: DataSpec, base: Path) -> Iterator[Batch]:
    """(inputs, targets) batches of a data spec: at most `samples` samples from `start`, in order."""
    if spec.builtin is not None:
        source = _builtin_batches(spec)
    elif spec.factory is not None:
        source = _factory_batches(spec, base)
    else:
        source = _file_batches(spec, base)
    remaining = spec.samples
    for inputs, targets in source:
        if remaining is not None:
            if remaining <= 0:
                return
            inputs, targets = inputs[:remaining], targets[:remaining]
            remaining -= len(inputs)
        yield inputs, targets


def _preprocess(spec: DataSpec, images: Tensor) -> Tensor:
    if spec.preprocess == "mnist":
        return builtin_datasets.mnist_inputs(images)
    if spec.preprocess == "imagenet":
        return builtin_datasets.imagenet_inputs(images, spec.resolution or images.shape[-1])
    return images.float().unsqueeze(1) / 255  # 'none': pixels in [0, 1]


def _builtin_batches(spec: DataSpec) -> Iterator[Batch]:
    if spec.builtin == "fashion-mnist":
        images, labels = builtin_datasets.fashion_mnist(spec.split)
    elif spec.builtin == "mnist-5k":
        images, labels = builtin_datasets.mnist_5k_split(spec.split)
    else:
        if spec.split != "train":
            raise ValueError(f"{spec.where}: builtin 'digits' has one split, 'train'; slice it with start/samples.")
        images, labels = builtin_datasets.digits()
    stop = len(labels) if spec.samples is None else spec.start + spec.samples
    if spec.start >= len(labels):
        raise ValueError(f"{spec.where}: start={spec.start} is past the end of {spec.builtin} "
                         f"{spec.split} ({len(labels)} samples).")
    for first in range(spec.start, min(stop, len(labels)), spec.batch_size):
        last = min(first + spec.batch_size, stop)
        yield _preprocess(spec, images[first:last]), labels[first:last]


def _factory_batches(spec: DataSpec, base: Path) -> Iterator[Batch]:
    data = resolve(spec.factory, base, f"{spec.where} factory")(**spec.args)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        indices = range(spec.start, len(data) if spec.samples is None else min(len(data), spec.start + spec.samples))
        data = torch.utils.data.DataLoader(torch.utils.data.Subset(data, indices), batch_size=spec.batch_size)
    elif spec.start:
        data = _skip(data, spec.start)
    if not isinstance(data, Iterable):
        raise ValueError(f"{spec.where} factory {spec.factory!r} returned {type(data).__name__}: return a "
                         f"torch Dataset of (input, target) items, a DataLoader or an iterable of batches.")
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
            raise ValueError(f"{spec.where} factory {spec.factory!r}: each batch must be an (inputs, targets) "
                             f"pair of tensors. Got {type(batch).__name__}.")
        yield batch[0], batch[1]


def _skip(data: Iterable, samples: int) -> Iterator[Batch]:
    """Drop the first `samples` samples of an iterable of (inputs, targets) batches."""
    for inputs, targets in data:
        if samples >= len(inputs):
            samples -= len(inputs)
            continue
        yield inputs[samples:], targets[samples:]
        samples = 0


def _file_batches(spec: DataSpec, base: Path) -> Iterator[Batch]:
    import datasets

    files = [spec.files] if isinstance(spec.files, str) else list(spec.files)
    files = [str(base / name) for name in files]
    try:
        if spec.format == "imagefolder":
            table = datasets.load_dataset("imagefolder", data_dir=files[0], split=spec.split)
        else:
            table = datasets.load_dataset(spec.format, data_files={spec.split: files}, split=spec.split)
    except Exception as error:  # datasets raises many types for bad files
        raise ValueError(f"{spec.where}: datasets could not load {spec.format} from {files}: "
                         f"{type(error).__name__}: {error}") from error
    wanted = [*spec.columns, spec.label] if spec.format != "imagefolder" else ["image", spec.label]
    missing = [name for name in wanted if name not in table.column_names]
    if missing:
        raise ValueError(f"{spec.where}: columns {missing} not in {files}; it has {table.column_names}.")
    stop = len(table) if spec.samples is None else min(len(table), spec.start + spec.samples)
    for first in range(spec.start, stop, spec.batch_size):
        rows = table[first : min(first + spec.batch_size, stop)]
        if spec.format == "imagefolder":
            inputs = _images(spec, rows["image"])
        else:
            inputs = torch.stack([torch.as_tensor(rows[name], dtype=torch.float32) for name in spec.columns], dim=1)
        yield inputs, torch.as_tensor(rows[spec.label])


def _images(spec: DataSpec, images: list) -> Tensor:
    """PIL images -> float [N, C, H, W] in [0, 1] (resized to `resolution`), then `preprocess`."""
    import numpy as np

    size = spec.resolution
    arrays = []
    for image in images:
        image = image.convert("L" if spec.preprocess == "mnist" else "RGB")
        if size is not None:
            image = image.resize((size, size))
        arrays.append(np.asarray(image, dtype=np.float32) / 255)
    pixels = torch.from_numpy(np.stack(arrays))
    pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    return pixels if spec.preprocess == "none" else builtin_datasets.normalize(pixels, spec.preprocess)

