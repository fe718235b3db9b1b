"""Deployable exports of a tuned int8 model that load with plain PyTorch (Python or C++), no autoq.

- FX plans ('static', 'dynamic', 'qat') -> TorchScript (`model.pt`): the same quantized ops and
  packed weights as the tuned model. TorchScript re-packs every weight for the engine set when it
  loads, so `model.json` lists each layer's kernel library and `run.py` re-packs those layers after
  loading, as the tuned model runs. It does not freeze the module: torch.jit.freeze copies packed
  weights by re-packing them all for the current engine, which would undo the per-layer choice.
- PT2E plans -> an AOTInductor package (`model.pt2`): the converted graph exported at the tuned
  input shapes and compiled ahead of time by Inductor with freezing, as autoq's compiled model is
  (under bf16 autocast for int8-mixed-bf16 plans); `torch._inductor.aoti_load_package` runs it.
- PT2E plans lowered by OpenVINO -> OpenVINO IR (`model.xml` + `model.bin`): the model OpenVINO compiled,
  dynamic batch; run.py needs `openvino` to run it (an AOTInductor package would change the kernels).
- Float plans ('fp32', 'bf16': int8 did not pay) -> the rewritten FP32 model, as an AOTInductor
  package when it was compiled, else TorchScript.
The folder also gets `run.py` (plain torch) and `model.json` (format, engines, input shapes, plan).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autoq.dispatch.engine import quantized_engine
from autoq.dispatch.table import current_cpu
from autoq.model_file.rebuild import synthetic_inputs
from autoq.plan import INDUCTOR, OPENVINO, QuantPlan, recipe_kind
from autoq.recipes.openvino_lowering import OpenVinoLowered
from autoq.recipes.pt2e import Lowered, float32_outputs

MANIFEST = "model.json"
FORMAT = "autoq.export"


@dataclass
class Export:
    """What `export` wrote: the folder, the model file in it, its format ('torchscript' | 'aoti' | 'openvino')
    and size."""

    directory: Path
    model_file: Path
    format: str
    size_bytes: int


class _Deployed(nn.Module):
    """A converted PT2E graph as its compiled twin runs it: under bf16 autocast if the plan says so,
    floating outputs as float32 (exported without autograd)."""

    def __init__(self, graph: nn.Module, mixed_bf16: bool) -> None:
        super().__init__()
        self.int8, self.mixed_bf16 = graph, mixed_bf16  # not `graph`: an exported module's own attribute

    def forward(self, *args: torch.Tensor) -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.mixed_bf16):
            output = self.int8(*args)
        return float32_outputs(output)


def export(model: nn.Module, directory: str | os.PathLike) -> Export:
    """Write `model` (built by autoq: tune, quantize or load) to `directory` as a deployable artifact.

    The folder is written beside its final place and moved there when complete; an existing folder is
    replaced only if it is an earlier autoq export (anything else: ValueError, nothing touched)."""
    meta = getattr(model, "meta", {}).get("autoq")
    if not meta or not meta.get("inputs"):
        raise ValueError("autoq export needs an int8 model built by autoq.tune, autoq.quantize or autoq.load.")
    target = Path(directory)
    if target.exists() and not (target / MANIFEST).is_file():
        raise ValueError(f"{target} exists and is not an autoq export folder: choose a new --out folder.")
    plan = QuantPlan.from_dict(meta["plan"])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the export private to this user
    try:
        if plan.kernels() == INDUCTOR:  # a PT2E plan, or a compiled float plan
            name, kind, capture = "model.pt2", "aoti", "torch.export"
            _aoti(*_uncompiled(model, plan), staging / name)
        elif plan.kernels() == OPENVINO:
            name, kind, capture = "model.xml", "openvino", "torch.export"
            if not isinstance(model, OpenVinoLowered):
                raise ValueError(f"an OpenVINO-lowered plan's model should be OpenVINO's; got {type(model).__name__}.")
            model.save_ir(staging / name)
        else:
            name, kind = "model.pt", "torchscript"
            capture = _torchscript(model, plan, synthetic_inputs(meta["inputs"]), staging / name)
        (staging / MANIFEST).write_text(json.dumps({
            "format": FORMAT, "version": 1, "kind": kind, "file": name, "capture": capture, "engine": plan.engine,
            "layer_engines": plan.layer_engines, "inputs": meta["inputs"], "plan": meta["plan"],
            "cpu": current_cpu().describe(), "torch": str(torch.__version__),
        }, indent=1) + "\n")
        (staging / "run.py").write_text(RUN_PY)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Export(target, target / name, kind, (target / name).stat().st_size)


def _torchscript(model: nn.Module, plan: QuantPlan, inputs: tuple, path: Path) -> str:
    """Save `model` as TorchScript; returns how it was captured: 'script', or 'trace' (the ops run on
    inputs of the tuned shapes, recorded: data-dependent control flow is frozen), with a warning."""
    with warnings.catch_warnings(), quantized_engine(plan.engine):
        warnings.simplefilter("ignore")
        try:
            scripted, capture = torch.jit.script(model), "script"
        except Exception as error:  # scripting fails on Python an eager model or a kept module holds
            scripted, capture, reason = torch.jit.trace(model, inputs, check_trace=False), "trace", error
        scripted.save(str(path))
    if capture == "trace":
        warnings.warn(f"autoq export: torch.jit.script failed ({type(reason).__name__}: {str(reason)[:200]}); "
                      f"the model was traced on inputs of its tuned shapes, so control flow that depends on the "
                      f"inputs is fixed to what those inputs took.", stacklevel=3)
    return capture


def _uncompiled(model: nn.Module, plan: QuantPlan) -> tuple[nn.Module, tuple]:
    """What an Inductor-compiled model compiles, to export ahead of time, and its example inputs: a PT2E
    plan's converted graph, or a compiled float plan's rewritten FP32 model (bf16: under autocast)."""
    if isinstance(model, Lowered):
        return _Deployed(model.graph, plan.mixed_bf16), model.example_inputs
    compiled = getattr(model, "inner", None)  # autoq.measure.fp32's no-autograd wrapper around torch.compile
    if recipe_kind(plan.recipe).precision != "int8" and hasattr(compiled, "_orig_mod"):
        return compiled._orig_mod, synthetic_inputs(model.meta["autoq"]["inputs"])
    raise ValueError(f"a {plan.recipe!r} plan's model should be compiled by Inductor; got {type(model).__name__}.")


def _aoti(module: nn.Module, example_inputs: tuple, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example_inputs, strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs={"freezing": True})


def _swap_into_place(staging: Path, target: Path) -> None:
    """Move the finished folder to `target`; an earlier export there is moved aside first, then removed."""
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, aside / target.name)
        os.replace(staging, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, target)


RUN_PY = '''"""Run an int8 model exported by autoq with plain PyTorch (no autoq; an OpenVINO IR needs openvino).

    python run.py                          time the model on random inputs of its tuned shapes
    python run.py INPUTS.pt OUTPUTS.pt     run it on torch.save'd inputs (a tuple of tensors), save outputs

C++ (libtorch): TorchScript - set the engine in model.json (at::globalContext().setQEngine), then
torch::jit::load; re-pack the layers model.json lists under their library, as load() below does (no
torch::jit::freeze: it re-packs every layer for one engine). AOTInductor - torch::inductor::AOTIModelPackageLoader(\\"model.pt2\\").run(inputs).
"""
import json
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
INFO = json.loads((HERE / "model.json").read_text())


def load():
    """The exported model, with each layer on the kernel library it was tuned with."""
    if INFO["kind"] == "aoti":
        return torch._inductor.aoti_load_package(str(HERE / INFO["file"]))
    if INFO["kind"] == "openvino":
        return load_openvino()
    torch.backends.quantized.engine = INFO["engine"]
    model = torch.jit.load(str(HERE / INFO["file"])).eval()
    for layer, library in INFO["layer_engines"].items():  # TorchScript packed every weight for one engine
        torch.backends.quantized.engine = library
        module = model
        for part in layer.split("."):
            module = getattr(module, part)
        owner = module if isinstance(module._packed_params, torch.ScriptObject) else module._packed_params
        packed = torch.ScriptObject.__new__(torch.ScriptObject)
        packed.__setstate__(owner._packed_params.__getstate__())  # re-packs for the current engine
        owner._packed_params = packed
    torch.backends.quantized.engine = INFO["engine"]
    return model


def load_openvino():
    """The OpenVINO IR compiled for this CPU (bf16 float ops if the plan ran them so), torch tensors in and out."""
    import numpy
    import openvino
    precision = "bf16" if INFO["plan"]["_data"]["mixed_bf16"] else "f32"
    compiled = openvino.Core().compile_model(str(HERE / INFO["file"]), "CPU", {"INFERENCE_PRECISION_HINT": precision})

    def run(*inputs):
        outputs = [torch.from_numpy(numpy.array(o)) for o in compiled([x.numpy() for x in inputs]).to_tuple()]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
    return run


def main():
    model = load()
    if len(sys.argv) == 3:
        with torch.no_grad():
            outputs = model(*torch.load(sys.argv[1], weights_only=True))
        torch.save(outputs, sys.argv[2])
        return
    inputs = [torch.randn(s["shape"]).to(getattr(torch, s["dtype"])) if s["dtype"].startswith(("float", "bfloat"))
              else torch.randint(s.get("low", 0), s.get("high", 1) + 1, s["shape"]) for s in INFO["inputs"]]
    with torch.no_grad():
        for _ in range(5):
            model(*inputs)
        times = []
        for _ in range(50):
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
    print(f"{INFO['kind']} model: median {sorted(times)[len(times) // 2] * 1e3:.3f} ms per call "
          f"on inputs {[s['shape'] for s in INFO['inputs']]}")


if __name__ == "__main__":
    main()
'''
